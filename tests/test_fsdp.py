"""FSDP checkpoints hold the optimizer state: a sharded (FSDP2) run resumes exactly, under FSDP or in one
process. Real FSDP2 (`fully_shard`) on 2 CPU processes with gloo, through the two `Distributed` calls
`distill.run` makes (`checkpoint_views` to save, `load_checkpoint` on --resume), with an accelerator
stand-in that reports an FSDP launch: accelerate's FSDP plugin itself needs GPUs, so the wrapping by
accelerate is the one part not run here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_checkpoint_resumes_exactly_under_fsdp_and_in_one_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["gathered_on_this_rank"] and not r1["gathered_on_this_rank"]  # gathered onto rank 0 only
    assert r0["before"] == r1["before"] and r0["uninterrupted"] == r1["uninterrupted"]
    assert r0["before"][-1] < r0["before"][0], "the run must be learning for the comparison to mean anything"
    # Every parameter's Adam moments were saved, after 3 steps.
    assert r0["saved_state_entries"] == r0["parameters"] and r0["adam_steps"] == [3]
    # Resumed under FSDP: the same losses as the run that never stopped.
    assert r0["resumed_fsdp"] == pytest.approx(r0["uninterrupted"], rel=1e-6, abs=1e-7)
    assert r1["resumed_fsdp"] == r0["resumed_fsdp"]
    # The checkpoint is a single process's: one unsharded process continues the same run.
    assert r0["resumed_one_process"] == pytest.approx(r0["uninterrupted"], rel=1e-5, abs=1e-6)
    assert r0["state"] == {"step": 3, "tokens": 0}
