"""stage2.compile_teacher / compile_student: compiled models give the eager losses and gradients (STYLE 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.pipeline.distill import compiled, loss_on_batch, make_loss, make_source, run
from kdlab.pipeline.world import build_world

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _setup(tmp_path, *overrides):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *overrides])
    world = build_world(cfg, log=lambda m: None)
    source, _ = make_source(cfg, world, Path(cfg.output_dir), log=lambda m: None)
    return cfg, world, source, world.load_student_init()


def _assert_same_loss_and_grads(pairs, cfg, source, student, step):
    """Each (trainee, teacher) pair gives the first pair's loss and student gradients on the same batch;
    a compiled model appears twice, so its second call reuses the compiled graph."""
    loss_fn = make_loss(cfg)
    results = []
    for trainee, teacher in pairs:
        batch = source.batch(step, student)
        student.hf.zero_grad(set_to_none=True)
        loss, n = loss_on_batch(trainee, teacher, batch, loss_fn, cfg, None, "cpu")
        (loss / n).backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.hf.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_teacher_gives_the_eager_loss_and_gradients(tmp_path):
    cfg, world, source, student = _setup(tmp_path, "stage2.regime=online_student", "stage2.compile_teacher=true")
    fast = compiled(world.teacher)
    assert fast.hf is not world.teacher.hf and fast.device == world.teacher.device
    _assert_same_loss_and_grads([(student, world.teacher), (student, fast), (student, fast)], cfg, source, student, 3)


def test_compiled_student_gives_the_eager_loss_and_gradients(tmp_path):
    cfg, world, source, student = _setup(tmp_path, "stage2.regime=offline", "stage2.offline.targets=full")
    fast = compiled(student)
    assert fast.hf is not student.hf and list(fast.hf.parameters())[0] is list(student.hf.parameters())[0]
    _assert_same_loss_and_grads([(student, world.teacher), (fast, world.teacher), (fast, world.teacher)],
                                cfg, source, student, 2)


@pytest.mark.parametrize("regime", [["stage2.regime=offline", "stage2.offline.targets=none"],
                                    ["stage2.regime=online_student"]], ids=["offline-live", "on-policy"])
def test_a_run_with_compiled_models_tracks_the_eager_run(tmp_path, regime, monkeypatch):
    """Same seed, same data: the compiled run's metrics follow the eager run's (float reassociation only).
    On-policy, the student's samples come from the compiled decode step as well."""
    import json

    from kdlab.models import decode

    steps_used = []
    make_step = decode._compiled_step
    monkeypatch.setattr(decode, "_compiled_step", lambda hf: steps_used.append(hf) or make_step(hf))
    rows = {}
    for name, extra in (("eager", []), ("compiled", ["stage2.compile_student=true", "stage2.compile_teacher=true"])):
        cfg = load_config(TINY, [f"output_dir={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}",
                                 *regime, "stage2.steps=6", "eval.num_points=3", *extra])
        run(cfg, log=lambda m: None, progress=False)
        assert bool(steps_used) == (name == "compiled" and "stage2.regime=online_student" in regime)
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["eager"]] == [r["step"] for r in rows["compiled"]]
    for a, b in zip(rows["eager"], rows["compiled"]):
        for key in ("proxy_fkl", "golden_fkl", "train_loss"):
            if a[key] is not None:
                assert abs(a[key] - b[key]) < 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])
