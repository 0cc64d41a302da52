"""Deliberately broken distillation losses: one per public bug, each a correct loss with that bug put back.

tests/test_conformance.py runs kdlab's conformance suite on every one and checks that the case meant for
its bug FAILS, and that the correct losses here (and kdlab's) pass every case. That is the evidence that
the suite catches each bug. The correct losses use kdlab's calling convention and formulas
(DESIGN.md, "Losses (contract)"), written again here so that a broken copy differs from its correct
original in the one line the bug is about.

P = teacher, Q = student, per position; KL(a ‖ b) = Σ a·(log a − log b) with 0·log(0/x) = 0.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from kdlab.losses import SparseTarget

NEG_INF = float("-inf")

# --------------------------------------------------------------------------------------------------------
# Correct building blocks (the originals the copies break).

def kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per position; atoms with a = 0 exactly (log a = −inf) are left out of value and gradient."""
    diff = (log_a - log_b).masked_fill(log_a == NEG_INF, 0.0)
    return (log_a.exp() * diff).sum(dim=-1)

def log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b) by logaddexp in log space: an underflowing probability keeps its finite log.
    Where both are −inf the result is −inf with a zero (not NaN) gradient."""
    x_a = log_a + torch.log(torch.tensor(w, dtype=log_a.dtype))
    x_b = log_b + torch.log1p(torch.tensor(-w, dtype=log_b.dtype))
    both = (x_a == NEG_INF) & (x_b == NEG_INF)
    return torch.logaddexp(x_a.masked_fill(both, 0.0), x_b.masked_fill(both, 0.0)).masked_fill(both, NEG_INF)

def reduce_mean(per_token_BxT: Tensor, mask_BxT: Tensor | None) -> Tensor:
    """Mean over the counted tokens of the whole batch; 0 (with a zero gradient) when none counts."""
    if mask_BxT is None:
        mask_BxT = torch.ones(per_token_BxT.shape, dtype=torch.bool)
    kept = torch.where(mask_BxT, per_token_BxT, torch.zeros_like(per_token_BxT))
    return kept.sum() / max(int(mask_BxT.sum()), 1)

def jsd_rows(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """GKD's JSD_β (arXiv 2306.13649 Eq. 1), M = β·P + (1−β)·Q; β = 0: KL(P‖Q), β = 1: KL(Q‖P)."""
    if beta == 0.0:
        return kl_rows(log_p, log_q)
    if beta == 1.0:
        return kl_rows(log_q, log_p)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)

def correct_jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean", temperature=1.0,
                beta=0.5):
    """The correct generalised JSD every JSD copy below starts from."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    return reduce_mean(jsd_rows(log_q, log_p, beta), mask_BxT)

def correct_reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                       temperature=1.0):
    """KL(Q ‖ P), the correct original of the reverse-KL copies."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    return reduce_mean(kl_rows(log_q, log_p), mask_BxT)

def correct_forward_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                       temperature=1.0):
    """KL(P ‖ Q), the correct original of the forward-KL copies."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    return reduce_mean(kl_rows(log_p, log_q), mask_BxT)

# --------------------------------------------------------------------------------------------------------
# The broken copies.

def log_space_mixture_jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                          temperature=1.0, beta=0.5):
    """TRL #2202 (fixed by TRL PR #2204): the mixture interpolated log-probabilities,
    log M = β·log P + (1−β)·log Q, a geometric mean, instead of log(β·P + (1−β)·Q). (TRL's code of the time
    also put β on the student, the separate bug of PR #3043; this copy keeps today's convention so that only
    the log-space mixture is wrong.)"""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    if beta in (0.0, 1.0):
        return reduce_mean(jsd_rows(log_q, log_p, beta), mask_BxT)
    log_m = beta * log_p + (1 - beta) * log_q  # BUG: mixes log-probabilities
    return reduce_mean(beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m), mask_BxT)

def reversed_beta_jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                      temperature=1.0, beta=0.5):
    """TRL before PR #3043: M = β·Q + (1−β)·P (β on the student) with the KL weights of the paper and no
    endpoint branches, so β = 0 gives KL(Q‖P) and β = 1 gives KL(P‖Q): β means the opposite of GKD's."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    log_m = log_mixture(log_q, log_p, beta)  # BUG: weight β on the student
    return reduce_mean(beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m), mask_BxT)

SAMPLING_TEMPERATURE = 0.9  # GKDConfig's default generation temperature

def sampling_temperature_with_ce(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean"):
    """TRL PR #5731 (TRL's signature): GKD's Liger path computed 0.5·CE(student, labels) + 0.5·JSD, Liger's
    default weights, and divided the logits by the generation temperature (``args.temperature``, 0.9) rather
    than the divergence's. Here the ``temperature`` argument is ignored in favour of the sampling one."""
    mask = labels != -100
    tau = SAMPLING_TEMPERATURE  # BUG: not `temperature`
    log_q = torch.log_softmax(student_logits / tau, dim=-1)
    log_p = torch.log_softmax(teacher_logits / tau, dim=-1)
    jsd = reduce_mean(jsd_rows(log_q, log_p, beta), mask)
    nll = -torch.log_softmax(student_logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return 0.5 * reduce_mean(nll, mask) + 0.5 * jsd  # BUG: the hard-label term

def per_sequence_mean_fkl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                          temperature=1.0):
    """TRL #4719 / ms-swift PR #10165, in the loss: each sequence's tokens averaged first, then the sequences,
    so a token of a short response weighs more than one of a long response, and neither gradient
    accumulation nor data-parallel ranks with unequal token counts reproduce the big batch. (The trainer-side
    form of the bug, equal weights for micro-batches of unequal token counts, is the same arithmetic.)"""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    per = torch.where(mask_BxT, kl_rows(log_p, log_q), 0.0)
    n = mask_BxT.sum(dim=1)
    rows = n > 0
    if not rows.any():
        return per.sum()
    return (per.sum(dim=1)[rows] / n[rows]).mean()  # BUG: mean of per-sequence means

def batch_size_normalised_fkl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                              temperature=1.0):
    """Per-batch normalisation (TRL #4719's "batchmean"; HF's KLDivLoss(reduction="batchmean")): the sum over
    tokens divided by the number of rows B, so ranks or micro-batches with unequal token counts per row are
    weighted wrongly (ms-swift PR #10165)."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    per = torch.where(mask_BxT, kl_rows(log_p, log_q), 0.0)
    return per.sum() / per.shape[0]  # BUG: divides by B, not the token count

def nan_mixture_jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                    temperature=1.0, beta=0.5):
    """Liger #769 (NaN loss from LigerFusedLinearJSDLoss; fix proposed in Liger PR #862): the mixture taken as
    log(β·P + (1−β)·Q) of probabilities, −inf where both underflow to 0 while their log-probs are finite, so
    0·(log P − log M) = 0·inf = NaN; and a mean that divides by the token count, 0/0 on an all-masked batch."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    if beta in (0.0, 1.0):
        return reduce_mean(jsd_rows(log_q, log_p, beta), mask_BxT)
    log_m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()  # BUG: log of an underflowing sum
    per = beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)
    return torch.where(mask_BxT, per, 0.0).sum() / mask_BxT.sum()  # BUG: 0/0 with no token

CLAMP = 1e-4

def clamped_beta_jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                     temperature=1.0, beta=0.5):
    """ms-swift #10078: the interior formula JSD_β used at the endpoints too, β clamped into
    [CLAMP, 1 − CLAMP] to keep the logs finite, so β = 1 gives ≈ CLAMP·KL(Q‖P) ≈ 0 instead of KL(Q‖P)
    (and β = 0 ≈ 0 instead of KL(P‖Q)): the jump at the ends is lost, the endpoints stop training."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    beta = min(max(beta, CLAMP), 1 - CLAMP)  # BUG: no endpoint branches
    log_m = log_mixture(log_p, log_q, beta)
    return reduce_mean(beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m), mask_BxT)

def detached_advantage_rkl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                           temperature=1.0):
    """miles #2362: the (top-k) reverse KL of each position, detached, applied as an advantage penalty on the
    sampled token, A_t·∇log q(a_t) with a_t ~ q. Its value is the exact reverse KL (straight-through), its
    expected gradient is A_t·Σ_a q(a)·∇log q(a) = A_t·∇Σ_a q(a) = 0. The top-k is incidental to the bug: this
    copy uses the whole vocabulary so that only the gradient is wrong."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    kl_t = kl_rows(log_q, log_p).detach()  # BUG: a detached, action-independent signal
    sampled = torch.multinomial(log_q.detach().exp().reshape(-1, log_q.shape[-1]), 1).reshape(log_q.shape[:-1])
    log_q_sampled = log_q.gather(-1, sampled[..., None])[..., 0]
    per = kl_t + kl_t * (log_q_sampled - log_q_sampled.detach())  # value kl_t, gradient kl_t·∇log q(a_t)
    return reduce_mean(per, mask_BxT)

TOPK = 3

def truncated_reverse_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0):
    """ms-swift #10079: reverse KL summed over the teacher's top-k tokens only, Σ_{v∈S} q_v·(log q_v − log p_v)
    with full-vocabulary q and p, without MOPD's correction (−q_v + p_v per token) or a tail bucket. It is 0
    at student == teacher, but not minimal there: its gradient is q_j·(1[j ∈ S] − Q(S)) ≠ 0.
    ``teacher`` is a kdlab SparseTarget (indices, log-probs at the temperature in use) or dense logits."""
    log_q = torch.log_softmax(student_logits_BxTxV / temperature, dim=-1)
    if not isinstance(teacher, SparseTarget):
        teacher = SparseTarget.from_logits(teacher, TOPK, temperature=temperature)
    log_q_k = log_q.gather(-1, teacher.indices)
    per = (log_q_k.exp() * (log_q_k - teacher.logprobs.to(log_q.dtype))).sum(dim=-1)  # BUG: no tail, no correction
    return reduce_mean(per, mask_BxT)

def detached_student_fkl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, *, reduction="mean",
                         temperature=1.0):
    """Atropos #456: the teacher's signal never reached the loss's graph (distillation as a no-op). Here the
    value is the right forward KL but is computed from detached student logits, so no gradient flows."""
    log_q = torch.log_softmax(student_logits_BxTxV.detach() / temperature, dim=-1)  # BUG: detached
    log_p = torch.log_softmax(teacher_logits_BxTxV / temperature, dim=-1)
    return reduce_mean(kl_rows(log_p, log_q), mask_BxT)

# --------------------------------------------------------------------------------------------------------
# The table the tests read: each copy, how the suite calls it, and the case(s) meant to catch its bug.

class Bug(NamedTuple):
    loss: Callable
    source: str
    adapter: str
    family: str
    param: float | None
    meant: tuple[str, ...]
    topk: int | None = None

BUGS: dict[str, Bug] = {
    "log_space_mixture": Bug(log_space_mixture_jsd, "TRL #2202", "kdlab", "gjsd", 0.5, ("jsd_mixture",)),
    "reversed_beta": Bug(reversed_beta_jsd, "TRL PR #3043", "kdlab", "gjsd", 0.1, ("endpoints",)),
    "sampling_temperature_with_ce": Bug(sampling_temperature_with_ce, "TRL PR #5731", "trl", "gjsd", 0.5,
                                        ("temperature",)),
    "per_sequence_mean": Bug(per_sequence_mean_fkl, "TRL #4719 / ms-swift PR #10165", "kdlab", "fkl", None,
                             ("accumulation", "ranks", "normalisation")),
    "batch_size_normalised": Bug(batch_size_normalised_fkl, "TRL #4719 / ms-swift PR #10165", "kdlab", "fkl", None,
                                 ("accumulation", "ranks", "normalisation")),
    "nan_mixture": Bug(nan_mixture_jsd, "Liger #769", "kdlab", "gjsd", 0.5, ("all_masked", "extreme_logits")),
    "clamped_beta": Bug(clamped_beta_jsd, "ms-swift #10078", "kdlab", "gjsd", 0.5, ("endpoints",)),
    "detached_advantage": Bug(detached_advantage_rkl, "miles #2362", "kdlab", "rkl", None, ("expected_gradient",)),
    "truncated_reverse_kl": Bug(truncated_reverse_kl, "ms-swift #10079", "kdlab", "rkl", None, ("stationary",),
                                topk=TOPK),
    "detached_student": Bug(detached_student_fkl, "Atropos #456", "kdlab", "fkl", None, ("noop",)),
}

# The correct originals: (loss, family, param) that must pass every case.
CORRECT = {
    "jsd-0.1": (correct_jsd, "gjsd", 0.1),
    "jsd-0.5": (correct_jsd, "gjsd", 0.5),
    "jsd-0.9": (correct_jsd, "gjsd", 0.9),
    "jsd-0": (correct_jsd, "gjsd", 0.0),
    "jsd-1": (correct_jsd, "gjsd", 1.0),
    "forward_kl": (correct_forward_kl, "fkl", None),
    "reverse_kl": (correct_reverse_kl, "rkl", None),
}

