"""TeacherHackingMonitor inside real trainers: TRL's GKDTrainer (the example script) and a plain Trainer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.integrations import TeacherHackingMonitor, TeacherHackingWarning, log_spaced_steps
from kdlab.metrics import sequence_fkl
from kdlab.models import LM

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("monitor_gkd", ROOT / "examples" / "monitor_gkd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monitor_inside_trl_gkd_trainer(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("tensorboard")
    out = tmp_path / "gkd"
    trainer, monitor = _example().main(["--out", str(out), "--steps", "12", "--tiny-oracle", "--eval-prompts", "16",
                                        "--num-points", "8", "--report-to", "tensorboard"])
    steps = log_spaced_steps(12, 8)
    assert [r["step"] for r in monitor.history] == steps
    # The last measurement is the student the trainer ends with, measured against the cached teacher.
    final = sequence_fkl(LM(trainer.model), monitor.caches["proxy"])
    assert monitor.history[-1]["proxy_fkl"] == pytest.approx(final.mean, rel=1e-5)
    assert monitor.history[-1]["proxy_fkl"] < monitor.history[0]["proxy_fkl"], "GKD must approach the teacher"
    assert all(r["golden_fkl"] > 0 and r["golden_fkl_se"] > 0 for r in monitor.history)
    # Through the trainer's own loggers: its log history and its TensorBoard event files.
    logged = [h["step"] for h in trainer.state.log_history if "teacher_hacking/proxy_fkl" in h]
    assert logged == steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/teacher_hacking/proxy_fkl", "train/teacher_hacking/golden_fkl"} <= tags, sorted(tags)
    # The monitor's JSONL is a metrics file `kdlab detect` reads.
    jsonl = out / "teacher_hacking_monitor.jsonl"
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == steps
    res = subprocess.run([sys.executable, "-m", "kdlab.cli", "detect", str(jsonl), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) >= {"golden", "proxy_deviation"}


class _FiresAt:
    """A stand-in proxy detector that flags hacking once `n` measurements after step 0 exist."""

    def __init__(self, n: int, onset_index: int):
        self.n, self.onset_index = n, onset_index

    def __call__(self, steps, proxy, proxy_se=None, **kw):
        from types import SimpleNamespace

        later = [s for s in steps if s > 0]
        fire = len(later) >= self.n
        return SimpleNamespace(detected=fire, onset_step=later[self.onset_index] if fire else None, reason="test")


def test_stop_on_hacking_in_a_plain_trainer_restores_the_pre_onset_weights(tmp_path):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    student = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 12, (64, 8), generator=g)
    train = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    prompts = torch.randint(0, 12, (8, 3), generator=g)
    detector = _FiresAt(n=5, onset_index=2)
    monitor = TeacherHackingMonitor(teacher, (prompts, torch.ones_like(prompts, dtype=torch.bool)), max_new_tokens=4,
                                    num_points=10, stop_on_hacking=True, detect_proxy=detector)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=student, args=args, train_dataset=train)
    monitor.attach(trainer)
    with pytest.warns(TeacherHackingWarning, match="teacher hacking detected"):
        trainer.train()
    steps = [r["step"] for r in monitor.history]
    later = [s for s in steps if s > 0]
    assert len(later) == 5 and trainer.state.global_step == later[-1] < 30, "training must stop at the detection"
    onset = later[2]
    best = max(s for s in steps if s < onset)
    assert monitor.best_step == best and monitor.best_checkpoint == tmp_path / "t" / "teacher_hacking_monitor" / "best"
    assert json.loads((monitor.best_checkpoint / "step.json").read_text())["step"] == best
    assert not list(monitor.best_checkpoint.parent.glob("step-*")), "only the best snapshot is kept"
    # The model the trainer holds now is the best one: its proxy is the one measured at that step.
    row = next(r for r in monitor.history if r["step"] == best)
    assert sequence_fkl(LM(trainer.model), monitor.caches["proxy"]).mean == pytest.approx(row["proxy_fkl"], rel=1e-5)
    assert trainer.state.log_history[-2].get("teacher_hacking/hacking_detected") == 1.0


def test_reference_samples_end_at_the_tokenizer_eos_and_every_eos_the_teacher_lists():
    """A chat teacher lists several EOS ids (Llama 3: three); the monitor's reference responses end at any
    of them and at the tokenizer's, which comes first (it pads finished rows)."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    teacher = LM(LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2)))
    teacher.hf.generation_config.eos_token_id = [5, 6]
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    monitor = TeacherHackingMonitor(teacher, [[3, 4], [7, 8, 9]], tokenizer=tokenizer, max_new_tokens=4)
    assert monitor.eos_token_id == (1, 5, 6)
    teacher.hf.generation_config.eos_token_id = 1  # the same id twice is listed once
    assert TeacherHackingMonitor(teacher, [[3, 4]], tokenizer=tokenizer, max_new_tokens=4).eos_token_id == (1,)
    assert TeacherHackingMonitor(teacher, [[3, 4]], max_new_tokens=4).eos_token_id == (1,)
