"""Float64 references of the conformance suite, written from the formulas with explicit probabilities.

P = teacher, Q = student, per position over the vocabulary. Nothing here uses kdlab.losses' log-space
kernels, so running the suite on kdlab's own losses is a cross-check, not a tautology.

Conventions: 0·log(0/x) = 0 (an atom the first argument gives no mass adds nothing, whatever the
second gives it), log-probabilities come from ``z − logsumexp(z)`` so that a logit of −1e4 keeps a
finite log-probability where its probability underflows to 0, and KL(a ‖ b) = +inf where a > 0 = b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Family:
    """A divergence the suite knows: its name on the command line, kdlab's loss of the same formula
    (a name of kdlab.losses.names.LOSS_PARAMS), its parameter (or None) and that parameter's default."""

    name: str
    loss: str
    formula: str
    param: str | None = None
    default: float | None = None


FKL, RKL, GJSD, TVD, SKEW_KL, SKEW_RKL = "fkl", "rkl", "gjsd", "tvd", "skew_kl", "skew_rkl"

# The one table of families: --family's allowed values, the formulas below, the kdlab loss to compare with.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(FKL, "forward_kl", "KL(P‖Q) = Σ P·(log P − log Q)"),
    Family(RKL, "reverse_kl", "KL(Q‖P) = Σ Q·(log Q − log P)"),
    Family(GJSD, "generalized_jsd",
           "β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD, arXiv 2306.13649 Eq. 1); β=0: KL(P‖Q), β=1: KL(Q‖P)",
           "beta", 0.5),
    Family(TVD, "tvd", "½·Σ |P − Q|"),
    Family(SKEW_KL, "skew_kl", "KL(P ‖ α·P + (1−α)·Q) (DistiLLM, arXiv 2402.03898)", "alpha", 0.1),
    Family(SKEW_RKL, "skew_reverse_kl", "KL(Q ‖ (1−α)·P + α·Q) (DistiLLM)", "alpha", 0.1),
)}


def log_probs(z_BxTxV: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / τ) in float64, written out: z − max − log Σ exp(z − max)."""
    z = z_BxTxV.double() / temperature
    shifted = z - z.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v·(log a_v − log b_v) over the last dim, with atoms a_v = 0 left out."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(dim=-1)


def mixture_kls(P: Tensor, log_p: Tensor, Q: Tensor, log_q: Tensor, w: float) -> tuple[Tensor, Tensor]:
    """(KL(P ‖ M), KL(Q ‖ M)) for M = w·P + (1 − w)·Q, the mixture taken in probability space."""
    log_m = (w * P + (1 - w) * Q).log()
    return kl(P, log_p, log_m), kl(Q, log_q, log_m)


def per_token(family: str, z_s: Tensor, z_t: Tensor, param: float | None = None, temperature: float = 1.0) -> Tensor:
    """The family's value at every position (B, T), float64, from student logits z_s and teacher logits z_t."""
    log_q, log_p = log_probs(z_s, temperature), log_probs(z_t, temperature)
    Q, P = log_q.exp(), log_p.exp()
    if family == FKL:
        return kl(P, log_p, log_q)
    if family == RKL:
        return kl(Q, log_q, log_p)
    if family == GJSD:
        beta = param
        if beta == 0.0:  # GKD's endpoint definitions: the limits of JSD_β / β and JSD_β / (1 − β)
            return kl(P, log_p, log_q)
        if beta == 1.0:
            return kl(Q, log_q, log_p)
        kl_pm, kl_qm = mixture_kls(P, log_p, Q, log_q, beta)
        return beta * kl_pm + (1 - beta) * kl_qm
    if family == TVD:
        return 0.5 * (P - Q).abs().sum(dim=-1)
    if family == SKEW_KL:
        return mixture_kls(P, log_p, Q, log_q, param)[0]
    if family == SKEW_RKL:
        return mixture_kls(Q, log_q, P, log_p, param)[0]  # M = α·Q + (1 − α)·P
    raise KeyError(f"family={family!r}; allowed: {sorted(FAMILIES)}")


def token_mean(per_token_BxT: Tensor, mask_BxT: Tensor) -> Tensor:
    """Sum over the counted tokens of the whole batch divided by their number (kdlab's reduction)."""
    return torch.where(mask_BxT, per_token_BxT, torch.zeros_like(per_token_BxT)).sum() / mask_BxT.sum()


def teacher_entropy(z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """H(P) per position: what a cross-entropy H(P, Q) adds to KL(P ‖ Q)."""
    log_p = log_probs(z_t, temperature)
    return -kl(log_p.exp(), log_p, torch.zeros_like(log_p))


# ---------------------------------------------------------------------------------------------------------
# Known wrong formulas, used only to name what a failing loss computes instead (the diagnosis in a reason).


def log_space_mixture_jsd(z_s: Tensor, z_t: Tensor, beta: float) -> Tensor:
    """JSD_β with the "mixture" taken in log space, log M = β·log P + (1 − β)·log Q (an unnormalised
    geometric mean, not a mixture): TRL issue #2202, fixed by TRL PR #2204."""
    log_q, log_p = log_probs(z_s), log_probs(z_t)
    log_m = beta * log_p + (1 - beta) * log_q
    return beta * kl(log_p.exp(), log_p, log_m) + (1 - beta) * kl(log_q.exp(), log_q, log_m)


def reversed_beta_jsd(z_s: Tensor, z_t: Tensor, beta: float) -> Tensor:
    """β·KL(P‖M') + (1−β)·KL(Q‖M') with M' = β·Q + (1−β)·P: TRL's mixture before PR #3043, so that
    β = 0 gave KL(Q‖P) and β = 1 gave KL(P‖Q), the opposite of the GKD paper."""
    log_q, log_p = log_probs(z_s), log_probs(z_t)
    P, Q = log_p.exp(), log_q.exp()
    log_m = (beta * Q + (1 - beta) * P).log()
    return beta * kl(P, log_p, log_m) + (1 - beta) * kl(Q, log_q, log_m)
