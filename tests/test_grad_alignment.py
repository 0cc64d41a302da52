"""Gradient alignment (issue 16, item 4): the cosine between the training batch's gradient and a
gradient on fresh data, logged at each evaluation, without changing the run's trajectory."""

from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.config import load_config
from kdlab.pipeline.alignment import GradientAlignment, cosine, flat_grad
from kdlab.pipeline.distill import run
from kdlab.pipeline.rundir import read_metrics

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_cosine_against_gradients_known_in_closed_form():
    """A linear model y = w·x with squared loss: ∇ = 2 (w·x − t) x, so the cosine between the gradients
    of two one-point batches is ±cos(x1, x2). The training gradients are left as they were."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    x1, x2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, -1.0])
    ((w @ x1 - 3.0) ** 2).backward()  # w·x1 = 2 < 3: the gradient is −2 x1
    before = w.grad.clone()

    class Fresh:
        def batch(self, step):
            return (x2, -5.0)  # w·x2 = −2 > −5: the gradient is +6 x2

    out = GradientAlignment({"fresh": Fresh()}).measure(0, [w], lambda b: (w @ b[0] - b[1]) ** 2)
    expected = -float(x1 @ x2 / (x1.norm() * x2.norm()))
    assert out["grad_cos_fresh"] == pytest.approx(expected, abs=1e-6)  # float32 gradients
    assert torch.equal(w.grad, before)
    assert cosine(flat_grad([w]), flat_grad([w])) == pytest.approx(1.0)


def test_logged_at_evaluations_and_the_trajectory_is_unchanged(tmp_path):
    common = [f"cache_dir={tmp_path / 'cache'}", "stage2.steps=12", "eval.num_points=4", "threads=1"]
    plain = run(load_config(TINY, [f"output_dir={tmp_path / 'plain'}", *common]), log=lambda m: None, progress=False)
    aligned = run(load_config(TINY, [f"output_dir={tmp_path / 'aligned'}", "eval.grad_alignment=true", *common]),
                  log=lambda m: None, progress=False)
    a, b = read_metrics(plain / "metrics.jsonl"), read_metrics(aligned / "metrics.jsonl")
    assert [r["proxy_fkl"] for r in a] == [r["proxy_fkl"] for r in b], "measuring must not change training"
    later = [r for r in b if r["step"] > 0]
    assert later and all(-1 <= r["grad_cos_fresh"] <= 1 and -1 <= r["grad_cos_golden"] <= 1 for r in later)
    assert all(r["grad_align_seconds"] > 0 for r in later)
    assert "grad_cos_fresh" not in b[0]  # step 0: no training batch yet
    assert all(np.isfinite(r["lr_sum"]) for r in b) and b[0]["lr_sum"] == 0.0
