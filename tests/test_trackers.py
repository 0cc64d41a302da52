"""Trackers: metrics.jsonl always; TensorBoard and W&B (offline) mirrors when configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import load_config
from kdlab.pipeline.distill import run
from kdlab.pipeline.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_wandb_offline_mirror_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'cache'}", "stage2.steps=6",
                             "trackers.tensorboard=true", "trackers.wandb=true", "trackers.wandb_mode=offline"])
    run_dir = run(cfg, log=lambda m: None, progress=False)
    rows = read_metrics(run_dir / "metrics.jsonl")
    scalars = _tensorboard_scalars(run_dir / "tensorboard")
    for key in ("train_loss", "proxy_fkl", "golden_fkl", "tokens"):
        expected = {r["step"]: r[key] for r in rows if r[key] is not None}
        assert scalars[key].keys() == expected.keys(), key
        for step, value in expected.items():
            assert scalars[key][step] == pytest.approx(value, rel=1e-6), (key, step)  # float32 in event files
    assert "regime" not in scalars  # strings are not scalars
    # W&B offline: a local run directory with the run's data file, no network used.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("run-*.wandb")), sorted(p.name for p in (run_dir / "wandb").rglob("*"))[:20]
    assert wandb.run is None  # finished at the end of the run


def test_resume_rewinds_tensorboard_to_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    common = [f"cache_dir={tmp_path / 'cache'}", "stage2.steps=12", "stage2.checkpoint_every=4",
              "trackers.tensorboard=true"]
    run_dir = run(load_config(TINY, [f"output_dir={tmp_path / 'r'}", *common]), log=lambda m: None, progress=False)
    before = _tensorboard_scalars(run_dir / "tensorboard")["proxy_fkl"]
    # Roll back to the step-8 checkpoint, as a kill after it would leave the run, and resume.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-00000012")
    (run_dir / "checkpoints" / "latest").write_text("step-00000008\n")
    (run_dir / "done.json").unlink()
    run(load_config(TINY, [f"output_dir={tmp_path / 'r'}", *common]), resume=True, log=lambda m: None, progress=False)
    after = _tensorboard_scalars(run_dir / "tensorboard")["proxy_fkl"]
    assert after.keys() == before.keys()  # the redone evaluations replace the old ones, none is doubled
    assert after == pytest.approx(before)
