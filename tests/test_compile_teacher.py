"""stage2.compile_teacher: the torch.compile'd teacher gives the eager teacher's live targets (STYLE 10)."""

from __future__ import annotations

from pathlib import Path

import torch

from kdlab.config import load_config
from kdlab.pipeline.distill import compiled_teacher, loss_on_batch, make_loss, make_source
from kdlab.pipeline.world import build_world

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_compiled_teacher_gives_the_eager_loss_and_gradients(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                             "stage2.regime=online_student", "stage2.compile_teacher=true"])
    world = build_world(cfg, log=lambda m: None)
    source, _ = make_source(cfg, world, Path(cfg.output_dir), log=lambda m: None)
    student = world.load_student_init()
    loss_fn = make_loss(cfg)
    fast = compiled_teacher(world.teacher)
    assert fast.hf is not world.teacher.hf and fast.device == world.teacher.device
    grads = []
    for teacher in (world.teacher, fast, fast):  # twice compiled: the second call reuses the graph
        batch = source.batch(3, student)
        student.hf.zero_grad(set_to_none=True)
        loss, n = loss_on_batch(student, teacher, batch, loss_fn, cfg, None, "cpu")
        (loss / n).backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.hf.parameters()]))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
