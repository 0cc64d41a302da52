"""What one `kdlab run` leaves on disk, checked as a user on a shared machine meets it: file modes
under umask 022, a checkpoint transformers can load, log output without carriage returns, and a
re-run that names the config fields that differ. One tiny run (CPU, ~30 s) serves every test."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab import record

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def kdlab(*args) -> subprocess.CompletedProcess:
    # stderr is a pipe, as when a user sends the output to a file; umask 022 as on most machines.
    # Bytes, decoded by hand: text=True would translate a carriage return into a newline.
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True,
                          timeout=600, preexec_fn=lambda: os.umask(0o022))
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    out = root / "run"
    proc = kdlab("run", str(TINY), "--out", str(out), "--set", "stage2.steps=8", "--set", f"cache_dir={root / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, proc


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_file_of_the_run_is_readable_by_colleagues(finished):
    """Bug 8: report.html, summary.json, config.yaml, world.json and done.json were 0600 and
    offline_data/ 0700 under umask 0022 (tempfile's private modes); safetensors files too."""
    root, out, _ = finished
    for name in (record.CONFIG, record.METRICS, record.SUMMARY, record.REPORT, record.WORLD, record.DONE):
        assert _mode(out / name) == 0o644, name
    for tree in (out / record.OFFLINE_DATA, out / record.PER_PROMPT, out / record.CHECKPOINTS, out / record.PLOTS,
                 root / "cache"):
        assert _mode(tree) == 0o755, tree
    for p in [*out.rglob("*"), *(root / "cache").rglob("*")]:  # every file and directory, at any depth
        assert _mode(p) == (0o755 if p.is_dir() else 0o644), p


def test_the_distilled_student_loads_with_transformers(finished):
    """Bug 7: `AutoModelForCausalLM.from_pretrained(checkpoints/step-N)` failed: no config.json with
    a model_type. The loaded weights must be the checkpoint's own."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdlab.pipeline.rundir import latest_checkpoint, read_checkpoint

    _, out, _ = finished
    ckpt = latest_checkpoint(out / record.CHECKPOINTS)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == "llama" and model.config.hidden_size == 16  # tiny.yaml's student
    weights, _, _ = read_checkpoint(ckpt)
    state = model.state_dict()
    assert set(weights) == set(state)
    for name, value in weights.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def test_no_carriage_returns_when_output_is_not_a_terminal(finished):
    """Bug 12: with output sent to a file, the stage-2 progress bar still wrote carriage-return lines."""
    _, _, proc = finished
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "step 8/8" in proc.stderr  # a plain progress line per evaluation instead


def test_rerun_with_another_config_names_the_fields(finished):
    """Bug 11: re-running into an existing run directory answered "config.yaml differs" without
    naming the fields that differ."""
    root, out, _ = finished
    before = (out / record.CONFIG).read_text()
    proc = kdlab("run", str(TINY), "--out", str(out), "--resume", "--set", "stage2.steps=8",
                 "--set", f"cache_dir={root / 'cache'}", "--set", "stage2.lr=0.002", "--set", "loss.name=reverse_kl")
    assert proc.returncode == 1
    assert "2 field(s)" in proc.stderr
    assert "stage2.lr: 0.003 -> 0.002" in proc.stderr and "loss.name: 'forward_kl' -> 'reverse_kl'" in proc.stderr
    assert (out / record.CONFIG).read_text() == before
