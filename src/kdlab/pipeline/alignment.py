"""Gradient alignment: an oracle-free early warning of teacher hacking (issue 16, item 4).

At an evaluation step, after the training batch's backward pass and before the optimizer step,

    cos_fresh  = cos(∇θ L(train batch), ∇θ L(fresh prompts, fresh teacher samples))
    cos_golden = cos(∇θ L(train batch), ∇θ L(fresh prompts, fresh oracle samples, oracle targets))

with L the run's own distillation loss. While the student learns what generalises, the training
gradient points where a gradient on new data points (cos > 0); a cosine that decays towards 0 or
turns negative means the step fits what is particular to the training set's own teacher samples —
the mechanism of teacher hacking on a fixed offline dataset (Tiapkin et al. 2025, §4). `cos_golden`
needs the oracle and says where the ground truth would move the student.

The fresh batches come from their own random streams ("grad-align-teacher", "grad-align-oracle",
functions of (seed, step)), and the training gradients are put back before the optimizer step, so a
run with the measurement follows the same trajectory as one without it (tested).
"""

from __future__ import annotations

import time

import torch

from kdlab.data.sources import OnlineTeacherSource


class _FreshTeacher(OnlineTeacherSource):
    stream = "grad-align-teacher"


class _FreshOracle(OnlineTeacherSource):
    stream = "grad-align-oracle"


def flat_grad(params) -> torch.Tensor:
    """All gradients as one float64 vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                      for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


class GradientAlignment:
    """Measures the cosines above. `references` maps a name ("fresh", "golden") to a batch source
    whose `batch(step)` answers fresh prompts with that reference model's samples and logits."""

    def __init__(self, references: dict):
        self.references = references

    @classmethod
    def for_world(cls, world, pool_ids, pool_mask, batch_size: int, seed: int, params) -> "GradientAlignment":
        refs = {"fresh": _FreshTeacher(world.teacher, pool_ids, pool_mask, batch_size, seed, params)}
        if world.oracle is not None:
            refs["golden"] = _FreshOracle(world.oracle, pool_ids, pool_mask, batch_size, seed, params)
        return cls(refs)

    def measure(self, step: int, params: list, loss_of) -> dict:
        """`params`: the trained parameters, holding the training batch's gradients now;
        `loss_of(batch)`: the run's loss on a batch (mean per token). Returns the metrics row's fields
        and leaves the training gradients exactly as they were."""
        t0 = time.perf_counter()
        saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
        g_train = flat_grad(params)
        out = {}
        for name, source in self.references.items():
            for p in params:
                p.grad = None
            loss_of(source.batch(step)).backward()
            out[f"grad_cos_{name}"] = cosine(g_train, flat_grad(params))
        for p, g in zip(params, saved):
            p.grad = g
        out["grad_align_seconds"] = time.perf_counter() - t0
        return out
