"""Token-level distillation divergences between a teacher P and a student Q.

Every public loss has the signature (DESIGN.md, "Losses (contract)")::

    loss(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, **params)

``teacher`` is dense logits ``BxTxV``, a :class:`~kdlab.losses.sparse.SparseTarget` (top-k: a lower
bound) or a :class:`~kdlab.losses.hidden.HiddenTarget` (the teacher's hidden states and head: exact).
``temperature`` τ divides both sides' logits (for a sparse target see ``sparse.py``: the cached
log-probs are taken to be at τ already). The value is computed per counted token, in float32 or
better (bf16/fp16 are upcast, float64 stays float64), in log space throughout, and reduced by the one
shared :func:`~kdlab.losses.reduction.reduce_tokens`. The result is in that compute dtype.

Logits may be −inf (vocabulary entries masked out); such entries have probability 0 and the
convention 0·log 0 = 0 holds in values and gradients. Gradients flow to the student and, for dense
teacher logits that require grad, to the teacher as well (pass detached teacher logits to train
the student only; TAID's stop-gradient is on the student side only, as in the paper).

Each loss is a thin wrapper over a row kernel ``(log_q_NxA, log_p_NxA) -> N`` that works on any
common support of A atoms: the full vocabulary (dense) or top-k + rest bucket (sparse).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from kdlab.losses.reduction import check_mask, check_reduction, counted_rows, place_rows, reduce_tokens, take_rows
from kdlab.losses.hidden import HiddenTarget, check_hidden
from kdlab.losses.sparse import SparseTarget, bucket_log_probs, check_sparse

NEG_INF = float("-inf")

RowKernel = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Log-space building blocks shared by every kernel.


def _kl_rows(log_a_NxA: Tensor, log_b_NxA: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_i a_i (log a_i − log b_i) per row, with 0·log(0/x) = 0.

    Atoms with a_i = 0 (log a_i = −inf) are zeroed before the product, so they stay out of the
    value AND the gradient: −inf − (−inf) would otherwise be NaN, and NaN·0 stays NaN in backward.
    (masked_fill_ in place on the fresh difference, rather than torch.where, saves one (N, A)
    tensor; autograd allows it because subtraction saves nothing for backward.)
    """
    diff = log_a_NxA - log_b_NxA
    diff.masked_fill_(log_a_NxA == NEG_INF, 0.0)
    return (log_a_NxA.exp() * diff).sum(dim=-1)


def _log_mixture(log_a_NxA: Tensor, log_b_NxA: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b) in log space: logsumexp of (log w + log a, log(1 − w) + log b).

    Never mix log-probs linearly (w·log a + (1−w)·log b is the log of a geometric mean, a classic
    bug). The endpoints return an input unchanged, so skew KL at α = 0 is exactly KL. Atoms where
    both inputs are −inf stay −inf with a zero (not NaN) gradient: logaddexp's gradient there is
    exp(−inf − (−inf)) = NaN, so its inputs are made finite first and its output reset after.
    """
    if w == 1.0:
        return log_a_NxA
    if w == 0.0:
        return log_b_NxA
    x_a = log_a_NxA + math.log(w)
    x_b = log_b_NxA + math.log1p(-w)
    both = (x_a == NEG_INF) & (x_b == NEG_INF)
    # In place on fresh tensors (add saves nothing; logaddexp saves its inputs, not its output).
    x_a.masked_fill_(both, 0.0)
    x_b.masked_fill_(both, 0.0)
    return torch.logaddexp(x_a, x_b).masked_fill_(both, NEG_INF)


# --------------------------------------------------------------------------------------------
# Row kernels: (log_q student, log_p teacher) on A common atoms -> per-row value.


def forward_kl_rows(log_q_NxA: Tensor, log_p_NxA: Tensor) -> Tensor:
    return _kl_rows(log_p_NxA, log_q_NxA)


def reverse_kl_rows(log_q_NxA: Tensor, log_p_NxA: Tensor) -> Tensor:
    return _kl_rows(log_q_NxA, log_p_NxA)


class _GeneralizedJSDRows(torch.autograd.Function):
    """β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M) per row, M = β·P + (1 − β)·Q, 0 < β < 1, with the gradient
    written out rather than taped op by op: 3-5x faster forward + backward on CPU, and it keeps one
    (N, A) tensor per input that needs a gradient instead of about six (peak memory about halved).

    As a function of free log q and log p (exact: the log_softmax before the kernel normalises),
    the log m part of both KLs is −Σ m·log m, whose derivative cancels the "+1" of ∂(q·log q):

        ∂/∂log q_i = (1 − β)·q_i·(log q_i − log m_i),   ∂/∂log p_i = β·p_i·(log p_i − log m_i),

    the value's own summands, which is all backward keeps. An atom of probability 0 has summand 0,
    so it adds 0 to the value and to the gradient, also where both sides are 0. Not twice
    differentiable (once_differentiable: double backward raises).
    """

    @staticmethod
    def forward(ctx, log_q_NxA: Tensor, log_p_NxA: Tensor, beta: float) -> Tensor:
        # No gradient flows through log m here, so logaddexp needs no guard (−inf, −inf -> −inf).
        log_m_NxA = torch.logaddexp(log_p_NxA + math.log(beta), log_q_NxA + math.log1p(-beta))
        terms_q_NxA = _kl_summands(log_q_NxA, log_m_NxA)
        terms_p_NxA = _kl_summands(log_p_NxA, log_m_NxA, out=log_m_NxA)  # log m's last use: reuse it
        need_q, need_p = ctx.needs_input_grad[:2]
        ctx.save_for_backward(terms_q_NxA if need_q else None, terms_p_NxA if need_p else None)
        ctx.beta = beta
        return beta * terms_p_NxA.sum(dim=-1) + (1.0 - beta) * terms_q_NxA.sum(dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N: Tensor):
        terms_q_NxA, terms_p_NxA = ctx.saved_tensors
        beta = ctx.beta
        grad_q = None if terms_q_NxA is None else terms_q_NxA * ((1.0 - beta) * grad_N).unsqueeze(-1)
        grad_p = None if terms_p_NxA is None else terms_p_NxA * (beta * grad_N).unsqueeze(-1)
        return grad_q, grad_p, None


def _kl_summands(log_a_NxA: Tensor, log_b_NxA: Tensor, out: Tensor | None = None) -> Tensor:
    """a_i·(log a_i − log b_i), 0 where a_i = 0 (the terms of :func:`_kl_rows`), without autograd.

    For b a mixture that contains a (log b_i finite wherever log a_i is), the difference is −inf or
    NaN exactly where a_i = 0, so one nan_to_num_ pass (+inf left alone) zeroes those atoms, ~40%
    cheaper than comparing with −inf and masked_fill_. A NaN input still reaches the result via a_i.
    """
    diff_NxA = torch.sub(log_a_NxA, log_b_NxA, out=out).nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)
    return diff_NxA.mul_(log_a_NxA.exp())


def generalized_jsd_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, beta: float) -> Tensor:
    if beta == 0.0:  # GKD's endpoint convention: forward KL (the limit of JSD_β / β)
        return _kl_rows(log_p_NxA, log_q_NxA)
    if beta == 1.0:  # reverse KL (the limit of JSD_β / (1 − β))
        return _kl_rows(log_q_NxA, log_p_NxA)
    return _GeneralizedJSDRows.apply(log_q_NxA, log_p_NxA, beta)


def tvd_rows(log_q_NxA: Tensor, log_p_NxA: Tensor) -> Tensor:
    return 0.5 * (log_p_NxA.exp() - log_q_NxA.exp()).abs().sum(dim=-1)


def skew_kl_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, alpha: float) -> Tensor:
    return _kl_rows(log_p_NxA, _log_mixture(log_p_NxA, log_q_NxA, alpha))


def skew_reverse_kl_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, alpha: float) -> Tensor:
    # (1 − α)·P + α·Q written as a mixture with weight α on Q.
    return _kl_rows(log_q_NxA, _log_mixture(log_q_NxA, log_p_NxA, alpha))


def taid_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, t: float) -> Tensor:
    # Interpolating normalised log-probs equals interpolating logits: softmax is shift invariant
    # per row. The endpoints skip the arithmetic so that t = 1 is exactly forward KL and −inf
    # logits never meet 0·(−inf).
    student_sg = log_q_NxA.detach()  # stop-gradient on the student side of the target (as in TAID)
    if t == 1.0:
        log_target = log_p_NxA
    elif t == 0.0:
        log_target = student_sg
    else:
        log_target = torch.log_softmax((1.0 - t) * student_sg + t * log_p_NxA, dim=-1)
    return _kl_rows(log_target, log_q_NxA)


def ab_divergence_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, alpha: float, beta: float) -> Tensor:
    """D_AB^(α,β)(P ‖ Q) per row (see :func:`ab_divergence`), with its limits at α = 0 or β = 0."""
    a, b = alpha, beta
    if a == 0.0 and b == 0.0:  # ½ Σ (log Q − log P)²; atoms where both are 0 contribute nothing
        d = log_q_NxA - log_p_NxA
        d = d.masked_fill((log_q_NxA == NEG_INF) & (log_p_NxA == NEG_INF), 0.0)
        return 0.5 * (d * d).sum(dim=-1)
    if b == 0.0:  # (1/α) Σ P^α (log P − log Q) − (1/α²) Σ (P^α − Q^α);  α = 1: KL(P ‖ Q)
        pa, qa = (a * log_p_NxA).exp(), (a * log_q_NxA).exp()
        diff = (log_p_NxA - log_q_NxA).masked_fill(log_p_NxA == NEG_INF, 0.0)
        return (pa * diff).sum(dim=-1) / a - (pa - qa).sum(dim=-1) / (a * a)
    if a == 0.0:  # the mirror image: (1/β) Σ Q^β (log Q − log P) − (1/β²) Σ (Q^β − P^β);  β = 1: KL(Q ‖ P)
        qb, pb = (b * log_q_NxA).exp(), (b * log_p_NxA).exp()
        diff = (log_q_NxA - log_p_NxA).masked_fill(log_q_NxA == NEG_INF, 0.0)
        return (qb * diff).sum(dim=-1) / b - (qb - pb).sum(dim=-1) / (b * b)
    s = a + b
    cross = (a * log_p_NxA + b * log_q_NxA).exp()
    return -(cross - (a / s) * (s * log_p_NxA).exp() - (b / s) * (s * log_q_NxA).exp()).sum(dim=-1) / (a * b)


def adaptive_kl_rows(log_q_NxA: Tensor, log_p_NxA: Tensor, mu: float) -> Tensor:
    """AKL per row (see :func:`adaptive_kl`): g_head·KL(P ‖ Q) + g_tail·KL(Q ‖ P), weights without gradient."""
    with torch.no_grad():
        p_sorted, order = log_p_NxA.exp().sort(dim=-1, descending=True)
        q_sorted = log_q_NxA.exp().gather(-1, order)
        tail = p_sorted.cumsum(dim=-1) > mu
        tail[:, 0] = False  # the teacher's top token is always in the head
        gap = (p_sorted - q_sorted).abs()
        head_gap = gap.masked_fill(tail, 0.0).sum(dim=-1)
        total = gap.sum(dim=-1)
        # identical rows have no gap: both KLs are 0 there, any weights give 0 (½ keeps it finite)
        g_head = torch.where(total > 0, head_gap / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return g_head * _kl_rows(log_p_NxA, log_q_NxA) + (1.0 - g_head) * _kl_rows(log_q_NxA, log_p_NxA)


# --------------------------------------------------------------------------------------------
# Parameter checks (one message format everywhere: the parameter, the value, the allowed range).


def check_unit_interval(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; allowed: 0 <= {name} <= 1") from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}={value!r} is out of range; allowed: 0 <= {name} <= 1")
    return v


def check_temperature(temperature: float) -> float:
    try:
        v = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature={temperature!r} is not a number; allowed: 0 < temperature < inf") from None
    if not 0.0 < v < math.inf:
        raise ValueError(f"temperature={temperature!r} is out of range; allowed: 0 < temperature < inf")
    return v


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# The one driver: counted rows -> log-probs on common atoms -> row kernel -> shared reduction.


def _log_softmax_tempered(logits_NxV: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    if temperature == 1.0:  # upcast inside log_softmax: no extra full-size copy
        return torch.log_softmax(logits_NxV, dim=-1, dtype=dtype)
    return torch.log_softmax(logits_NxV.to(dtype) / temperature, dim=-1)


def token_divergence(
    row_kernel: RowKernel,
    student_logits_BxTxV: Tensor,
    teacher: Tensor | SparseTarget | HiddenTarget,
    mask_BxT: Tensor | None,
    reduction: str,
    temperature: float,
) -> Tensor:
    """Apply ``row_kernel`` to every counted token and reduce; what every public loss calls."""
    check_reduction(reduction)
    temperature = check_temperature(temperature)
    if student_logits_BxTxV.dim() != 3:
        raise ValueError(f"student logits shape={tuple(student_logits_BxTxV.shape)}; allowed: (B, T, V)")
    B, T, V = student_logits_BxTxV.shape
    check_mask(mask_BxT, (B, T))
    dtype = compute_dtype(student_logits_BxTxV.dtype)
    rows = counted_rows(mask_BxT)
    z_s = take_rows(student_logits_BxTxV.reshape(B * T, V), rows)
    if isinstance(teacher, SparseTarget):
        check_sparse(teacher, (B, T), V)
        K = teacher.indices.shape[-1]
        z_s = z_s.to(dtype) if temperature == 1.0 else z_s.to(dtype) / temperature
        log_q, log_p = bucket_log_probs(
            z_s,
            take_rows(teacher.indices.reshape(B * T, K), rows),
            take_rows(teacher.logprobs.reshape(B * T, K), rows),
        )
    elif isinstance(teacher, Tensor):
        if teacher.shape != student_logits_BxTxV.shape:
            raise ValueError(
                f"teacher logits shape={tuple(teacher.shape)} does not match the student's "
                f"{tuple(student_logits_BxTxV.shape)}; allowed: the same (B, T, V), or a SparseTarget"
            )
        log_q = _log_softmax_tempered(z_s, temperature, dtype)
        log_p = _log_softmax_tempered(take_rows(teacher.reshape(B * T, V), rows), temperature, dtype)
    elif isinstance(teacher, HiddenTarget):  # exact: the teacher's logits of the counted tokens only
        check_hidden(teacher, (B, T), V)
        log_q = _log_softmax_tempered(z_s, temperature, dtype)
        log_p = _log_softmax_tempered(teacher.flat_logits(rows, dtype), temperature, dtype)
    else:
        raise ValueError(f"teacher of type {type(teacher).__name__}; allowed: a (B, T, V) tensor, a SparseTarget "
                         "or a HiddenTarget")
    per_token_BxT = place_rows(row_kernel(log_q, log_p), rows, (B, T))
    return reduce_tokens(per_token_BxT, mask_BxT, reduction)


# --------------------------------------------------------------------------------------------
# Public losses.


def forward_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0):
    """Forward KL, KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v)), P = teacher, Q = student.

    Mass-covering ("mean-seeking"); the standard token-level distillation loss (Hinton et al.
    2015) and the main loss of the teacher-hacking study (Tiapkin et al. 2025).
    """
    return token_divergence(forward_kl_rows, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def reverse_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0):
    """Reverse KL, KL(Q ‖ P) = Σ_v Q(v) (log Q(v) − log P(v)), Q = student, P = teacher.

    Mode-seeking; MiniLLM (Gu et al. 2024, arXiv 2306.08543) optimises its sequence-level version,
    GKD (Agarwal et al. 2024) uses it token-wise as JSD at β = 1.
    """
    return token_divergence(reverse_kl_rows, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def generalized_jsd(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, beta=0.5):
    """Generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, arXiv 2306.13649, Sec. 3):

        JSD_β(P ‖ Q) = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M),   M = β·P + (1 − β)·Q,

    P = teacher, Q = student, log M = logsumexp(log β + log P, log(1 − β) + log Q).
    β = 0.5 is the symmetric JSD. The formula vanishes at both ends; GKD (and TRL) define
    β = 0 as forward KL(P ‖ Q) and β = 1 as reverse KL(Q ‖ P), the limits of JSD_β/β and
    JSD_β/(1 − β), and so does kdlab, exactly. Note the jump in value at the endpoints.
    """
    beta = check_unit_interval("beta", beta)

    def kernel(log_q, log_p):
        return generalized_jsd_rows(log_q, log_p, beta)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def tvd(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0):
    """Total variation distance, ½ Σ_v |P(v) − Q(v)|, in [0, 1], symmetric.

    One of the step-wise divergences of f-DISTILL (Wen et al. 2023, ACL).
    """
    return token_divergence(tvd_rows, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def skew_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, alpha=0.1):
    """Skew KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898): KL(P ‖ α·P + (1 − α)·Q), P = teacher.

    α = 0 is forward KL exactly; the mixture keeps the target finite where Q is ~0. α = 0.1 in
    the paper.
    """
    alpha = check_unit_interval("alpha", alpha)

    def kernel(log_q, log_p):
        return skew_kl_rows(log_q, log_p, alpha)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def skew_reverse_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, alpha=0.1):
    """Skew reverse KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898): KL(Q ‖ (1 − α)·P + α·Q), Q = student.

    α = 0 is reverse KL exactly. α = 0.1 in the paper.
    """
    alpha = check_unit_interval("alpha", alpha)

    def kernel(log_q, log_p):
        return skew_reverse_kl_rows(log_q, log_p, alpha)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def taid(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, t):
    """TAID loss (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation", arXiv 2501.16937):

        KL(P_t ‖ Q),   P_t = softmax((1 − t)·sg(z_s) + t·z_t),

    a forward KL towards a target interpolated between the (stop-gradient) student and the
    teacher logits. t = 1 is forward KL exactly; t = 0 gives 0. ``t`` comes from a
    :class:`~kdlab.losses.schedule.TAIDSchedule`, kept outside this pure function.
    """
    t = check_unit_interval("t", t)

    def kernel(log_q, log_p):
        return taid_rows(log_q, log_p, t)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def ab_divergence(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, alpha=0.5,
                  beta=0.5):
    """α-β divergence of ABKD (Wang et al. 2025, "ABKD: Pursuing a Proper Allocation of the Probability Mass in
    Knowledge Distillation via α-β-Divergence", ICML, arXiv 2505.04560, Eq. 5; the family of Cichocki, Cruces
    and Amari 2011, Entropy 13(1), Eq. 4), P = teacher, Q = student:

        D_AB^(α,β)(P ‖ Q) = −1/(αβ) Σ_v ( P^α Q^β − α/(α+β) P^(α+β) − β/(α+β) Q^(α+β) ),

    with its limits (1/α) Σ P^α log(P/Q) − (1/α²) Σ (P^α − Q^α) at β = 0 (α = 1, β = 0: forward KL exactly),
    the mirror image at α = 0 (α = 0, β = 1: reverse KL exactly) and ½ Σ (log P − log Q)² at α = β = 0.
    α = β = ½ is 4 (1 − Σ √(PQ)), twice the squared Hellinger distance. kdlab takes α, β in [0, 1] (the
    paper's grid lies there); α controls the hardness concentration and β the confidence concentration
    (paper, Sec. 4). The general case is a difference of terms scaled by 1/(αβ): in float32 it loses digits
    as αβ → 0; the limits are exact.
    """
    alpha, beta = check_unit_interval("alpha", alpha), check_unit_interval("beta", beta)

    def kernel(log_q, log_p):
        return ab_divergence_rows(log_q, log_p, alpha, beta)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)


def adaptive_kl(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean", temperature=1.0, mu=0.5):
    """Adaptive KL (AKL) of Wu et al. 2025, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation
    for Large Language Models", COLING, arXiv 2404.02657, Eqs. 9-11: at each position the teacher's tokens,
    sorted by P, form a head (cumulative P up to ``mu``, the top token always included) and a tail; with the
    gaps ε_head = Σ_head |P − Q| and ε_tail = Σ_tail |P − Q|,

        AKL = g_head·KL(P ‖ Q) + g_tail·KL(Q ‖ P),   g_head = ε_head / (ε_head + ε_tail),  g_tail = 1 − g_head,

    forward KL (which fits the head first) where the head's gap dominates, reverse KL (the tail) elsewhere.
    The weights carry no gradient (the authors' code computes them from detached probabilities). ``mu`` = 0.5
    in the paper. On a top-k target the rest bucket is one tail atom.
    """
    mu = check_unit_interval("mu", mu)

    def kernel(log_q, log_p):
        return adaptive_kl_rows(log_q, log_p, mu)

    return token_divergence(kernel, student_logits_BxTxV, teacher, mask_BxT, reduction, temperature)
