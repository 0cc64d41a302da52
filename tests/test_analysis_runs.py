"""Run and sweep verdicts from run directories: grouping seeds into conditions, labels, summaries."""

import json

import numpy as np
import pytest
import yaml

from kdlab.analysis import MetricsError, analyse_run, analyse_sweep, find_runs
from kdlab.analysis import synthetic as syn


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    syn.write_sweep(root)
    return root


def test_find_runs_accepts_runs_and_sweeps(sweep, tmp_path):
    runs = find_runs([sweep])
    assert len(runs) == 9 and all((r / "metrics.jsonl").is_file() for r in runs)
    assert find_runs(runs[0]) == [runs[0]]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        find_runs(tmp_path)


def test_analyse_run_reports_both_detectors(sweep):
    hacked = analyse_run(sweep / "offline_256x8-seed0")
    assert hacked["condition"] == "offline 256×8" and hacked["seed"] == "0" and hacked["regime"] == "offline"
    assert hacked["golden"]["detected"] and hacked["golden"]["kind"] == "hacking"
    # The synthetic golden minimum sits at the evaluation nearest 0.75 of the log-step range.
    steps = syn.log_steps(8000, 30)
    k = int(np.argmin(np.abs(np.log(np.maximum(steps, 1)) - 0.75 * np.log(8000))))
    assert abs(int(np.flatnonzero(steps == hacked["golden"]["onset_step"])[0]) - k) <= 1
    assert hacked["proxy_deviation"]["detected"]
    json.dumps(hacked)  # JSON-ready, no numpy scalars

    healthy = analyse_run(sweep / "online_student-seed1")
    assert healthy["golden"]["kind"] == "none" and not healthy["proxy_deviation"]["detected"]
    overfit = analyse_run(sweep / "offline_128x1-seed2")
    assert overfit["golden"]["kind"] == "overfitting" and not overfit["golden"]["detected"]


def test_sweep_aggregates_seeds_per_condition(sweep):
    summary = analyse_sweep([sweep])
    assert summary["n_runs"] == 9
    by_name = {c["condition"]: c for c in summary["conditions"]}
    assert set(by_name) == {"offline 256×8", "offline 128×1", "online_student"}
    hack = by_name["offline 256×8"]
    assert sorted(hack["seeds"]) == ["0", "1", "2"]
    assert hack["golden"]["detected"] == 3 and hack["golden"]["n"] == 3
    assert "hacking in 3/3 seeds" in hack["verdict"] and "onset median" in hack["verdict"]
    assert by_name["online_student"]["golden"]["detected"] == 0
    assert by_name["offline 128×1"]["golden"]["kinds"] == {"overfitting": 3}
    assert set(summary["regimes"]) == {"offline", "online_student"}
    assert summary["regimes"]["offline"]["golden"]["n"] == 6
    assert summary["thresholds"]["golden"]["z"] == 3.0


def _copy_run(src, dst, config):
    """The same curves under another config, as a tool that writes no `condition` field would."""
    rows = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in ("condition", "seed")} for r in rows]
    return syn.write_run(dst, rows, config)


def test_conditions_from_explicit_field_config_or_directory(sweep, tmp_path):
    src = sweep / "offline_256x8-seed0"
    # 1. An explicit `condition` in config.yaml wins over everything.
    a = _copy_run(src, tmp_path / "a", {"condition": "my-cond", "seed": 1, "stage2": {"regime": "offline"}})
    # 2. No config at all: the directory name without its seed suffix.
    _copy_run(src, tmp_path / "b" / "lr3e-4_seed4", None)
    _copy_run(src, tmp_path / "b" / "lr3e-4_seed5", None)
    summary = analyse_sweep([a, tmp_path / "b"])
    labels = {r["run"]: r["condition"] for r in summary["runs"]}
    assert labels == {"a": "my-cond", "lr3e-4_seed4": "lr3e-4", "lr3e-4_seed5": "lr3e-4"}
    seeds = {r["run"]: r["seed"] for r in summary["runs"]}
    assert seeds == {"a": "1", "lr3e-4_seed4": "4", "lr3e-4_seed5": "5"}
    assert {c["condition"]: len(c["runs"]) for c in summary["conditions"]} == {"my-cond": 1, "lr3e-4": 2}


def _copy_as_default_named(src, dst, config):
    """A run as `kdlab sweep` writes it: config `name` left at its default "run", which the
    pipeline also writes into every metrics row as `condition`."""
    rows = [dict(json.loads(line), condition="run") for line in (src / "metrics.jsonl").read_text().splitlines()]
    return syn.write_run(dst, rows, dict(config, name="run"))


def test_default_named_grid_is_grouped_by_config(sweep, tmp_path):
    src = sweep / "online_student-seed0"
    for loss in ("forward_kl", "reverse_kl"):
        for seed in (0, 1):
            _copy_as_default_named(src, tmp_path / f"loss-{loss}_seed-{seed}",
                                   {"seed": seed, "output_dir": f"runs/{loss}-{seed}",
                                    "stage2": {"regime": "online_student", "loss": loss}})
    _copy_as_default_named(src, tmp_path / "offline", {"seed": 0, "stage2": {
        "regime": "offline", "loss": "forward_kl", "offline": {"num_prompts": 64, "generations_per_prompt": 32}}})
    summary = analyse_sweep([tmp_path])
    groups = {c["condition"]: sorted(c["runs"]) for c in summary["conditions"]}
    assert groups == {
        "online_student (loss=forward_kl)": ["loss-forward_kl_seed-0", "loss-forward_kl_seed-1"],
        "online_student (loss=reverse_kl)": ["loss-reverse_kl_seed-0", "loss-reverse_kl_seed-1"],
        "offline 64×32": ["offline"],
    }


def test_one_name_with_different_settings_is_split(sweep, tmp_path):
    src = sweep / "online_student-seed0"
    for lr in (1e-3, 1e-4):
        _copy_run(src, tmp_path / f"lr{lr}", {"name": "mine", "seed": 0, "stage2": {"regime": "offline", "lr": lr}})
    labels = sorted(c["condition"] for c in analyse_sweep([tmp_path])["conditions"])
    assert labels == ["mine (lr=0.0001)", "mine (lr=0.001)"]


def test_run_without_golden_and_with_train_proxy(tmp_path):
    rng = np.random.default_rng(3)
    run = syn.hacking_run(rng, steps=syn.log_steps(8000, 30), departure=0.4, onset_frac=0.75, sigma=0.01)
    rows = syn.run_rows(run, golden=False)
    for row, truth in zip(rows, run.proxy.truth):
        row["train_proxy_fkl"] = float(0.9 * truth) if row["step"] < 900 else float(0.9 * truth * 0.5)
    d = syn.write_run(tmp_path / "nogold", rows, {"seed": 0, "stage2": {"regime": "offline"}})
    out = analyse_run(d)
    assert out["golden"] is None and out["golden_col"] is None
    assert out["proxy_deviation"]["detected"]
    assert out["train_proxy_deviation"] is not None and not out["train_proxy_deviation"]["detected"]
    assert "golden: no oracle" in out["verdict"] and "generalisation gap" in out["notes"][0]


def test_bad_config_is_a_clear_error(sweep, tmp_path):
    d = _copy_run(sweep / "online_student-seed0", tmp_path / "bad", None)
    (d / "config.yaml").write_text("stage2: [unclosed\n")
    with pytest.raises(MetricsError, match=r"config.yaml.*not valid YAML"):
        analyse_run(d)
    (d / "config.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(MetricsError, match="mapping"):
        analyse_run(d)


def test_analysis_and_report_never_import_training_code():
    """They read run directories only (DESIGN.md): importing them must not pull in torch or the
    pipeline, so reports can be written where no training stack is installed."""
    import subprocess
    import sys

    code = ("import sys, kdlab.analysis, kdlab.report, kdlab.report.plots, kdlab.report.html; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('kdlab.pipeline', "
            "'kdlab.models', 'kdlab.losses', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _as_sweep_writes_it(src, dst, config):
    """A run as `kdlab sweep` writes it: the full config with the default name "run"."""
    rows = [dict(json.loads(line), condition="run") for line in (src / "metrics.jsonl").read_text().splitlines()]
    return syn.write_run(dst, rows, dict(config, name="run"))


def test_a_grid_over_loss_name_gives_one_condition_per_loss(sweep, tmp_path):
    """Bug 1: `kdlab sweep --grid loss.name=forward_kl,reverse_kl` was reported as ONE condition with
    "0/2 seeds": every key named `name` was dropped from the grouping, so both runs (seed 0 each)
    fell into one condition and counted as two seeds."""
    for loss, src in (("forward_kl", "offline_256x8-seed0"), ("reverse_kl", "online_student-seed0")):
        _as_sweep_writes_it(sweep / src, tmp_path / f"name-{loss}", {
            "seed": 0, "output_dir": str(tmp_path / f"name-{loss}"),
            "loss": {"name": loss, "beta": 0.5}, "world": {"task": None, "seed": 0},
            "stage2": {"regime": "offline", "offline": {"num_prompts": 256, "generations_per_prompt": 8}}})
    summary = analyse_sweep([tmp_path])
    conditions = {c["condition"]: c for c in summary["conditions"]}
    assert sorted(conditions) == ["offline 256×8 (loss.name=forward_kl)", "offline 256×8 (loss.name=reverse_kl)"]
    for c in conditions.values():
        assert c["seeds"] == ["0"] and c["golden"]["n"] == 1
    assert conditions["offline 256×8 (loss.name=forward_kl)"]["golden"]["detected"] == 1  # the hacking curves
    assert "1/1 seed" in conditions["offline 256×8 (loss.name=forward_kl)"]["verdict"]


def test_world_task_name_splits_conditions(sweep, tmp_path):
    for task in ("xsum", "wmt14_en_de"):
        _as_sweep_writes_it(sweep / "online_student-seed0", tmp_path / task, {
            "seed": 0, "world": {"task": {"name": task}}, "stage2": {"regime": "online_student"}})
    labels = sorted(c["condition"] for c in analyse_sweep([tmp_path])["conditions"])
    assert labels == ["online_student (task.name=wmt14_en_de)", "online_student (task.name=xsum)"]


def test_a_repeated_seed_is_counted_once(sweep, tmp_path):
    """Bug 1: two identical seed-0 runs (the same settings run twice) were counted as two seeds."""
    config = {"seed": 0, "stage2": {"regime": "offline", "offline": {"num_prompts": 256, "generations_per_prompt": 8}}}
    for name in ("first", "again"):
        _as_sweep_writes_it(sweep / "offline_256x8-seed0", tmp_path / name, config)
    _as_sweep_writes_it(sweep / "offline_256x8-seed1", tmp_path / "other-seed", dict(config, seed=1))
    (condition,) = analyse_sweep([tmp_path])["conditions"]
    assert condition["seeds"] == ["0", "1"]
    assert condition["golden"]["n"] == 2 and condition["golden"]["detected"] == 2
    assert "hacking in 2/2 seeds" in condition["verdict"]
    assert condition["notes"] == ["runs again, first share seed 0: counted once"]
