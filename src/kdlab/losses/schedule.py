"""TAID's adaptive interpolation parameter t, kept outside the pure loss.

Shing, Misaki, Bao, Yokoi, Akiba, "TAID: Temporally Adaptive Interpolated Distillation for
Efficient Knowledge Transfer in Language Models", ICLR 2025 (arXiv 2501.16937), Algorithm 1, with
the reference setup t_start = 0.4, t_end = 1, momentum β = 0.99, step size α = 5e-4. After the
optimizer step n (n = 1..N) that used t_n and gave the TAID loss J_n:

    δ_n     = (J_{n−1} − J_n) / (J_{n−1} + ε)          relative improvement of the loss
    m_n     = β·m_{n−1} + (1 − β)·δ_n                  its momentum (m_0 = 0)
    Δt      = α · sigmoid(m_n) · (1 − t_n)
    t_{n+1} = min(t_end, max(t_linear(n), t_n + Δt)),   t_linear(n) = t_start + (t_end − t_start)·n/N

t never falls below the linear schedule and moves faster while the loss is improving fast. The
first update only records J_1 (there is no J_0), as the authors' released code does; that code
takes n for t_linear from the trainer's step counter, which may lag this n by one step.
"""

from __future__ import annotations

import math

import torch

from kdlab.losses.divergences import check_unit_interval


class TAIDSchedule:
    """Holds t for :func:`kdlab.losses.taid`; call :meth:`update` once per optimizer step.

    Args:
        total_steps: N, the number of optimizer steps of the run (sets the linear floor).
        t_start: t_1, in [0, 1]. t_end: the ceiling, in [t_start, 1].
        alpha: step size α of the adaptive increment, in [0, 1].
        beta: momentum β of the relative loss change, in [0, 1].
        eps: ε guarding the division by the previous loss (> 0).
        adaptive: False follows t_linear only (the paper's ablation).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        eps: float = 1e-15,
        adaptive: bool = True,
    ):
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps={total_steps!r} is out of range; allowed: an integer >= 1")
        self.t_start = check_unit_interval("t_start", t_start)
        self.t_end = check_unit_interval("t_end", t_end)
        if self.t_end < self.t_start:
            raise ValueError(f"t_end={t_end!r} is out of range; allowed: t_start={t_start!r} <= t_end <= 1")
        self.alpha = check_unit_interval("alpha", alpha)
        self.beta = check_unit_interval("beta", beta)
        if not 0.0 < float(eps) < math.inf:
            raise ValueError(f"eps={eps!r} is out of range; allowed: 0 < eps < inf")
        self.eps = float(eps)
        self.total_steps = total_steps
        self.adaptive = bool(adaptive)
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None
        self.step = 0  # optimizer steps seen by update()

    def t_linear(self, step: int) -> float:
        return self.t_start + (self.t_end - self.t_start) * min(step, self.total_steps) / self.total_steps

    def update(self, loss: float) -> float:
        """Advance t after an optimizer step whose TAID loss (at the current t) was ``loss``.

        ``loss`` is a float or a 0-dim tensor (its value is taken; no graph is kept). With several
        data-parallel ranks, pass the same (all-reduced) value on each so every rank keeps the same t.
        Returns the new t.
        """
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise ValueError(f"loss={value!r} is out of range; allowed: a finite number")
        self.step += 1
        if self.prev_loss is None:
            self.prev_loss = value
            return self.t
        delta = (self.prev_loss - value) / (self.prev_loss + self.eps)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        floor = self.t_linear(self.step)
        if self.adaptive:
            increment = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(floor, self.t + increment))
        else:
            self.t = min(self.t_end, floor)
        self.prev_loss = value
        return self.t

    def state_dict(self) -> dict:
        """JSON-serialisable state (floats, ints, None) for resume."""
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        missing = {"t", "momentum", "prev_loss", "step"} - set(state)
        if missing:
            raise ValueError(f"TAIDSchedule state is missing {sorted(missing)}")
        self.t = check_unit_interval("t", state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"TAIDSchedule(t={self.t:.6g}, step={self.step}/{self.total_steps}, t_start={self.t_start}, "
            f"t_end={self.t_end}, alpha={self.alpha}, beta={self.beta}, adaptive={self.adaptive})"
        )


def _sigmoid(x: float) -> float:
    # Written out because math has no sigmoid; the branch avoids overflow of exp for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
