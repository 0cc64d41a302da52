"""Data parallel under `accelerate launch`: 2 processes x batch 8 == 1 process x batch 16 (CPU, gloo),
for the stage-1 SFT and for stage 2.

accelerate 1.15's `--cpu` flag starts a single process (its multi-CPU launcher needs mpirun), so the
CPU test launches through torch's elastic launcher (`--multi_gpu`) with `device: cpu` in the config:
each rank then builds its Accelerator on the CPU and talks gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.data.sources import Batch
from kdlab.losses import SparseTarget
from kdlab.pipeline.distill import run
from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COMMON = ["threads=1", "stage2.regime=mixed", "stage2.mixed.other=offline", "stage2.steps=12",
          "stage2.checkpoint_every=4", "stage2.batch_size=16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    sets = sum((["--set", c] for c in [*COMMON, f"cache_dir={cache}"]), [])
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "kdlab.cli", "run", str(TINY), "--no-report", "--out", str(out), *sets, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-7), (ra["step"], k)
            else:
                assert va == vb, (ra["step"], k)


def test_two_processes_equal_one_process_and_resume(tmp_path):
    one = run(load_config(TINY, [*COMMON, f"output_dir={tmp_path / 'one'}", f"cache_dir={tmp_path / 'cache1'}"]),
              log=lambda m: None, progress=False)
    two = tmp_path / "two"
    out = _launch(two, tmp_path / "cache2")  # its own cache: stage 1 is built under the launch too
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((two / "done.json").read_text())["processes"] == 2
    # Stage 1 was built by both ranks (data-parallel SFT): the same teacher and student init.
    from safetensors.torch import load_file

    (w1,), (w2,) = (list((tmp_path / c).glob("stage1-*")) for c in ("cache1", "cache2"))
    assert json.loads((w2 / "world.json").read_text())["processes"] == 2
    for who in ("teacher", "student_init"):
        a, b = (load_file(str(w / who / "model.safetensors")) for w in (w1, w2))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    _assert_same_metrics(read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl"))
    # Written once, by rank 0: one log line for the finished run, one row per evaluation step.
    assert out.stderr.count("[done]") == 1
    rows = read_metrics(two / "metrics.jsonl")
    assert len({r["step"] for r in rows}) == len(rows)
    assert sorted(p.name for p in (two / "checkpoints").glob("step-*")) == ["step-00000008", "step-00000012"]
    assert not list((two / "checkpoints").glob(".tmp-*"))

    # Resume at the same world size: roll the run back to its step-8 checkpoint and continue it.
    ckpts = two / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step-00000012")
    (ckpts / "latest").write_text("step-00000008\n")
    (two / "done.json").unlink()
    out = _launch(two, tmp_path / "cache2", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed" in out.stderr and out.stderr.count("resumed") == 1
    _assert_same_metrics(read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl"))


def test_shard_takes_equal_contiguous_slices_of_every_field():
    class FakeAccelerator:
        num_processes, process_index, device = 2, 1, torch.device("cpu")

    d = Distributed(FakeAccelerator())
    B = 6
    ar = torch.arange(B)
    batch = Batch(ar[:, None].repeat(1, 3), torch.ones(B, 3, dtype=torch.bool), ar[:, None].repeat(1, 4),
                  torch.ones(B, 4, dtype=torch.bool), teacher_target=SparseTarget(ar.view(B, 1, 1).repeat(1, 4, 2),
                                                                                  torch.zeros(B, 4, 2)), on_policy=True)
    s = d.shard(batch)
    assert s.prompt_ids[:, 0].tolist() == [3, 4, 5] and s.response_ids[:, 0].tolist() == [3, 4, 5]
    assert s.teacher_target.indices[:, 0, 0].tolist() == [3, 4, 5] and s.on_policy
    with pytest.raises(ValueError, match="stage2.batch_size=7 must be divisible by the number of processes"):
        d.check_batch_size(7, "stage2.batch_size")
    # One process: no accelerate state, every call a no-op.
    single = Distributed(None)
    assert single.shard(batch) is batch and single.world_size == 1 and single.is_main
    # A batch the source sampled for this rank alone is kept as it is.
    local = Batch(*(getattr(s, f) for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")),
                  local=True)
    assert d.shard(local) is local


@pytest.mark.parametrize("regime", ["online_student", "online_teacher"])
def test_online_sources_sample_only_this_ranks_rows(regime):
    """Rank r of W samples B/W rows, and they are rows [r·B/W, (r+1)·B/W) of what one process samples."""
    from transformers import LlamaForCausalLM

    from kdlab.data.sources import OnlineStudentSource, OnlineTeacherSource, SamplingParams
    from kdlab.models import LM, tiny_llama_config
    from kdlab.models.sampling import sample

    torch.manual_seed(0)
    lm = LM(LlamaForCausalLM(tiny_llama_config(16, 16, 1, 2)))
    pool = torch.randint(0, 16, (40, 4), generator=torch.Generator().manual_seed(1))
    pool_mask = torch.ones_like(pool, dtype=torch.bool)
    pool_mask[::3, :2] = False
    rows_sampled = []

    def counting(model, ids, *args, **kwargs):
        rows_sampled.append(len(ids))
        return sample(model, ids, *args, **kwargs)

    params = SamplingParams(max_new_tokens=5, temperature=0.9, top_k=8, eos_token_id=3, sampler=counting)

    def source(shard):
        if regime == "online_teacher":
            return OnlineTeacherSource(lm, pool, pool_mask, 8, 7, params, shard)
        return OnlineStudentSource(pool, pool_mask, 8, 7, params, shard)

    for step in (0, 5):
        whole = source((0, 1)).batch(step, lm)
        parts = [source((r, 4)).batch(step, lm) for r in range(4)]
        assert rows_sampled[-5:] == [8, 2, 2, 2, 2]
        assert all(p.local for p in parts)
        for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
            assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(whole, f)), f
        if regime == "online_teacher":  # the targets come out of the sampling pass
            kept = whole.response_mask
            torch.testing.assert_close(torch.cat([p.teacher_target for p in parts])[kept], whole.teacher_target[kept])
    assert not whole.response_mask.all()  # EOS ended some rows
    with pytest.raises(ValueError, match="batch size 8 is not divisible by the number of processes \\(3\\)"):
        source((0, 3))
