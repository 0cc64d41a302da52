"""bench/vs_trl.py's presets stay runnable (issue 23): their --smoke forms run on the CPU as a user runs
them (a subprocess), and the JSON is checked against numbers recomputed here: the step times against
tokens/s and the FLOP fractions, the FLOPs against the Linear weights of the models the script built, the
parameter counts against sum(p.numel()) of those models."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdlab

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "vs_trl.py"


def run_smoke(tmp_path: Path, preset: str, configs: list[str]) -> tuple[dict, str, Path]:
    root, out = tmp_path / "root", tmp_path / "out.json"
    # the kdlab this test imports, for the script and its children
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(Path(kdlab.__file__).parents[1]),
                                                      os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", preset, "--smoke", "--configs", ",".join(configs),
                           "--root", str(root), "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, root


def linear_forward_flops(hf, positions: int, keys: float, logits: int) -> float:
    """Matmul FLOPs of a forward, from the model itself: 2 per weight of every Linear in the decoder layers
    per position, attention scores and values 4 x keys x hidden per layer and position, the output head
    (the embedding matrix when tied) per logit position."""
    cfg = hf.config
    layer_weights = sum(m.weight.numel() for m in hf.model.layers.modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * keys * cfg.hidden_size * cfg.num_hidden_layers
    return positions * (2 * layer_weights + attention) + logits * 2 * hf.get_output_embeddings().weight.numel()


def check(data: dict, stdout: str, root: Path, preset: str, configs: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    meta, rows = data["meta"], data["results"]
    w = meta["workload"]
    assert data["failures"] == [] and data["skipped"] == []
    assert meta["preset"] == preset and meta["smoke"] and w["device"] == "cpu"
    assert [r["config"] for r in rows] == configs

    # the parameter counts reported are those of the models built, whose shapes are the workload's
    models = {who: AutoModelForCausalLM.from_pretrained(root / who) for who in ("teacher", "student")}
    for who, hf in models.items():
        n = sum(p.numel() for p in hf.parameters())
        assert meta["params"][who] == n
        assert f"{who}: {n:,} parameters" in stdout
        shape, cfg = w[who], hf.config
        assert cfg.model_type == w["arch"]
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.intermediate_size, cfg.tie_word_embeddings) == (
            shape["hidden"], shape["layers"], shape["heads"], shape["kv_heads"], shape["intermediate"], shape["tied"])

    B, P, R = w["batch"], w["prompt"], w["response"]
    n, causal = B * (P + R), (P + R + 1) / 2
    ref = meta["flop_reference"]["per_s"]
    assert ref > 0 and meta["flop_reference"]["kind"] == "limit"
    for r in rows:
        # the FLOPs of a step, from the models' own Linear weights
        want = {"student forward + backward": 3 * linear_forward_flops(models["student"], n, causal, B * R)}
        if r["targets"] == "none":
            want["teacher forward"] = linear_forward_flops(models["teacher"], n, causal, B * R)
        if r["regime"] == "online_student":
            want["sampling"] = (linear_forward_flops(models["student"], B * P, (P + 1) / 2, B)
                                + sum(linear_forward_flops(models["student"], B, P + t + 1, B) for t in range(R - 1)))
        assert r["flops_per_step"].keys() == want.keys()
        for k, v in want.items():
            assert r["flops_per_step"][k] == pytest.approx(v, rel=1e-12), k
        flops = sum(want.values())
        assert r["flop_bound_s"] == pytest.approx(flops / ref, rel=1e-9)
        for side in ("kdlab", "trl"):
            steps = r[f"{side}_steps_s"]
            assert len(steps) == w["steps"] - w["warmup"] - 1 and all(s > 0 for s in steps)
            median = statistics.median(steps)
            assert r[f"{side}_median_s"] == median
            assert r[f"{side}_tokens_per_s"] == pytest.approx(B * R / median, rel=1e-9)
            assert r[f"{side}_fraction_of_limit"] == pytest.approx(flops / ref / median, rel=1e-9)
            assert r[f"{side}_peak_rss_mb"] > 0
            # both tools trained: their loss, backward and optimizer ran in the timed steps
            phases = r[f"{side}_phases_s"]
            assert all(phases[p] > 0 for p in ("student forward + loss", "backward", "optimizer step"))
            if r["regime"] == "online_student":
                assert phases["sampling"] > 0
        assert r["speedup"] == pytest.approx(r["trl_median_s"] / r["kdlab_median_s"], rel=1e-12)
        # kdlab's cached targets skip the teacher; its live rows run it (TRL always does)
        assert (r["kdlab_phases_s"]["teacher forward"] > 0) == (r["targets"] == "none")
        assert r["trl_phases_s"]["teacher forward"] > 0


def test_124m_smoke(tmp_path):
    configs = ["off_fkl_cached", "off_fkl_live", "on_jsd", "on_jsd_auto"]
    data, stdout, root = run_smoke(tmp_path, "124m", configs)
    check(data, stdout, root, "124m", configs)
    assert data["meta"]["precision"] in ("fp32", "bf16") and "auto" in data["meta"]["precision_reason"]
    # the defaults row: a run configured for 1500 steps (the default --auto-steps), stopped after its timed steps;
    # 'auto' decides after its 2 + 5 eager steps, from the priors (a fresh root): 20 s per model against
    # milliseconds a step, so eager; TRL's column is its on_jsd run of the same repeat
    auto = data["results"][-1]
    from kdlab.pipeline.autocompile import PROBE, WARMUP

    (line,) = auto["kdlab_compile_auto"]
    assert line.startswith("[compile auto] ") and f"{1500 - WARMUP - PROBE} steps left" in line
    assert ": eager (" in line and "priors" in line
    assert auto["trl_reused_from"] == "on_jsd" and auto["trl_steps_s"] == data["results"][2]["trl_steps_s"]
    assert f"kdlab {line}" in stdout


def test_qwen_smoke(tmp_path):
    data, stdout, root = run_smoke(tmp_path, "qwen-0.5b-1.5b", ["off_fkl_live"])
    check(data, stdout, root, "qwen-0.5b-1.5b", ["off_fkl_live"])
    assert data["meta"]["precision"] == "bf16"  # the preset's, kept by --smoke (bf16 autocast on the CPU)
