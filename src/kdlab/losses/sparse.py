"""Sparse (top-k) teacher targets and the "rest" bucket that makes every divergence exact.

An offline dataset over a large vocabulary caches only the teacher's top-k log-probs per position.
kdlab compares the two distributions on the same K+1 atoms:

* atoms 1..K: the cached indices, with the teacher's cached log-probs and the student's log-probs
  ``log q_i`` at the same indices;
* atom K+1, the *rest* bucket: the teacher's tail mass ``1 − Σ_i p_i`` (clamped at 0) against the
  student's mass outside the K indices, ``log Σ_{j ∉ top-k} q_j`` (a logsumexp over the other
  logits, exact, not ``1 − Σ q_i`` which cancels catastrophically when the top-k holds almost all
  the mass).

Every divergence is then the divergence between these two (K+1)-atom distributions: well defined
for any k and *exactly* the dense value when k = V (then the rest bucket is empty and is dropped).
For the f-divergences (forward/reverse KL, JSD, skew KL, TVD) merging atoms can only lower the
value (data processing), so k < V gives a lower bound of the full-vocabulary loss. TAID builds its
interpolated target on the same atoms, which is not the bucketed full-vocabulary target, so for
TAID only k = V is exact. The teacher atoms are renormalised (a no-op unless rounding made the
cached top-k sum above 1). The teacher's tail mass is only known as 1 − Σ p_i, so it carries an
absolute rounding error of about one ulp of 1: a tiny tail loses relative precision, which
reverse-type losses (Q(rest)·log(Q(rest)/P(rest))) feel most.

Temperature: the cached log-probs are taken to be the teacher's distribution *at the temperature
in use* (make them with ``SparseTarget.from_logits(logits, k, temperature=τ)``); the loss's
``temperature`` then divides the student's logits only. A tempered tail cannot be recovered from
a top-k cache, so kdlab does not pretend to re-temper it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


class SparseTarget(NamedTuple):
    """Teacher top-k target: ``indices`` (B, T, K) integer (int64; narrower integer types, as
    caches store them, are converted), distinct per position; ``logprobs`` (B, T, K) float, the
    teacher's log-probabilities at those indices (at the loss temperature)."""

    indices: Tensor
    logprobs: Tensor

    @classmethod
    def from_logits(cls, teacher_logits_BxTxV: Tensor, k: int, temperature: float = 1.0) -> "SparseTarget":
        """Top-k of ``log_softmax(teacher_logits / temperature)``, in float32 or better.

        The normaliser is taken as max + log1p(Σ_{v ≠ argmax} exp(z_v − max)): with log_softmax in float32 a
        confident teacher's log-normaliser 25 + 7e-10 rounds to 25.0, its top log-prob to exactly 0 and the rest
        bucket's mass to exactly 0, which made every top-k reverse KL +inf (found by `kdlab conformance --topk`).
        The sum without the top term keeps those 7e-10 (a float32 number), with no float64 copy of the logits."""
        vocab = teacher_logits_BxTxV.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= V={vocab}")
        dtype = torch.promote_types(teacher_logits_BxTxV.dtype, torch.float32)
        z = teacher_logits_BxTxV.to(dtype) / temperature
        top = z.topk(k, dim=-1)
        peak = top.values[..., :1]
        others = torch.exp(z - peak).scatter_(-1, top.indices[..., :1], 0.0)  # every term but the top one
        # (z − peak) − log1p(...), in that order: peak + log1p(...) would round the 7e-10 away again
        return cls(top.indices, (top.values - peak) - torch.log1p(others.sum(dim=-1, keepdim=True)))


def check_sparse(target: SparseTarget, shape_BxT: tuple[int, int], vocab: int) -> None:
    """Shapes and dtypes of a sparse target (cheap; index values are checked per counted row)."""
    idx, lp = target.indices, target.logprobs
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"SparseTarget.indices dtype={idx.dtype} is not allowed; allowed: an integer dtype")
    if not lp.is_floating_point():
        raise ValueError(f"SparseTarget.logprobs dtype={lp.dtype} is not allowed; allowed: a float dtype")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != tuple(shape_BxT) or idx.shape != lp.shape:
        raise ValueError(
            f"SparseTarget shapes indices={tuple(idx.shape)}, logprobs={tuple(lp.shape)} do not match; "
            f"allowed: both (B, T, K) with (B, T)={tuple(shape_BxT)}"
        )
    if not 1 <= idx.shape[-1] <= vocab:
        raise ValueError(f"SparseTarget K={idx.shape[-1]} is out of range; allowed: 1 <= K <= V={vocab}")


def _check_indices(indices_NxK: Tensor, vocab: int) -> None:
    # Only the counted rows are checked: padding may hold any index.
    if indices_NxK.numel() == 0:
        return
    lo, hi = int(indices_NxK.min()), int(indices_NxK.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"SparseTarget.indices range [{lo}, {hi}] is out of range; allowed: [0, {vocab - 1}]")
    ordered = indices_NxK.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("SparseTarget.indices repeat an index within a position; allowed: distinct indices")


def _logsumexp_maybe_empty(x_NxV: Tensor) -> Tensor:
    """logsumexp over the last dim that returns −inf for an all −inf row with a zero gradient.

    ``torch.logsumexp`` of an all −inf row has a NaN gradient (softmax of nothing), which would
    reach the student even when the upstream gradient is zero.
    """
    peak = x_NxV.detach().amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (x_NxV - peak).exp().sum(dim=-1, keepdim=True)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    return torch.where(empty, torch.full_like(total, NEG_INF), safe.log() + peak)


def bucket_log_probs(student_logits_NxV: Tensor, indices_NxK: Tensor, logprobs_NxK: Tensor) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs on the K (+1 rest) atoms; see the module docstring.

    ``student_logits_NxV`` is already divided by the temperature and in the compute dtype.
    Returns ``(log_q_NxA, log_p_NxA)`` with A = K + 1, or A = K when K = V (no tail).
    """
    vocab, k = student_logits_NxV.shape[-1], indices_NxK.shape[-1]
    indices_NxK = indices_NxK.long()  # gather/scatter index with int64; a no-op for int64
    _check_indices(indices_NxK, vocab)
    log_norm = torch.logsumexp(student_logits_NxV, dim=-1, keepdim=True)
    log_q = student_logits_NxV.gather(-1, indices_NxK) - log_norm
    log_p = logprobs_NxK.to(student_logits_NxV.dtype)
    if k < vocab:
        tail_logits = student_logits_NxV.scatter(-1, indices_NxK, NEG_INF)
        log_q = torch.cat([log_q, _logsumexp_maybe_empty(tail_logits) - log_norm], dim=-1)
        # Teacher tail mass 1 − Σ p_i, clamped at 0 (rounding can push Σ p_i a hair above 1).
        tail_p = (-torch.expm1(torch.logsumexp(log_p, dim=-1, keepdim=True))).clamp_min(0.0)
        log_p = torch.cat([log_p, tail_p.log()], dim=-1)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_q, log_p
