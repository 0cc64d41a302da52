"""MiniLLM's sequence-level reverse KL by policy gradient (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large
Language Models", ICLR, arXiv 2306.08543, Sec. 2.2, Eqs. 2-5).

The objective is the reverse KL between whole responses, student q_θ against teacher p:

    L(θ) = KL(q_θ ‖ p) = E_{y~q_θ} [ Σ_t log q_θ(y_t | y_<t) − log p(y_t | y_<t) ].

Its gradient, with r_t = log p(y_t | y_<t) − log q_θ(y_t | y_<t) and R_{t+1} = Σ_{t'>t} r_t', splits into a
single-step part, computed exactly over the vocabulary at each sampled prefix, and a long-term part that needs the
policy gradient (Eq. 3):

    ∇L = E_y Σ_t [ ∇ KL(q_θ(· | y_<t) ‖ p(· | y_<t))  −  R_{t+1} ∇ log q_θ(y_t | y_<t) ].

:func:`minillm_surrogate` returns the per-token surrogate whose gradient at one sampled response is that estimate:
KL_t(q ‖ p) (with gradient, at the sampled prefix) − sg(R_{t+1}) · log q_θ(y_t) (R without gradient). Its value is
not the KL; :func:`sequence_reverse_kl_estimate` gives the estimate Σ_t −r_t of the sequence KL itself.

The paper's two other devices are options here:
- teacher-mixed sampling (Eq. 4): responses drawn from p̃ = α·p + (1 − α)·q_θ, each term reweighted by the
  importance weight of its token, w_t = q_θ(y_t) / p̃(y_t), clipped to [0, clip] (`weights="token"`, the paper's
  approximation, biased) or by the whole response's weight Π_t q_θ(y_t) / p̃(y_t) (`weights="sequence"`, unbiased);
- length normalisation (Eq. 5): R_{t+1} averaged over the tokens after t instead of summed (biased; it keeps long
  responses from dominating).
With student samples, `weights="sequence"` (or none) and no length normalisation, the estimate is unbiased: the test
averages it over every response of a small vocabulary and compares with the gradient of the exact sequence KL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.divergences import _kl_rows, compute_dtype

WEIGHTS = ("none", "token", "sequence")


def _token_logprobs(log_BxTxV: Tensor, ids_BxT: Tensor) -> Tensor:
    return log_BxTxV.gather(-1, ids_BxT.unsqueeze(-1)).squeeze(-1)


def minillm_surrogate(student_logits_BxTxV: Tensor, teacher_logits_BxTxV: Tensor, response_ids_BxT: Tensor,
                      mask_BxT: Tensor | None = None, *, behaviour_logprobs_BxT: Tensor | None = None,
                      weights: str = "none", clip: float = 3.0, length_norm: bool = False) -> Tensor:
    """Per-token surrogate (B×T, zero at masked positions) whose summed gradient is MiniLLM's estimate of
    ∇ KL_seq(q_θ ‖ p) from the sampled responses `response_ids_BxT` (see the module docstring).

    `behaviour_logprobs_BxT`: log p̃(y_t) of the distribution the responses were drawn from (teacher-mixed
    sampling); None = the student itself (no reweighting). `weights`: 'none', 'token' (clipped per-token ratio,
    the paper's) or 'sequence' (the whole response's ratio, unbiased). The teacher gets no gradient."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; allowed: {WEIGHTS}")
    if student_logits_BxTxV.shape != teacher_logits_BxTxV.shape:
        raise ValueError(f"student {tuple(student_logits_BxTxV.shape)} and teacher {tuple(teacher_logits_BxTxV.shape)} "
                         "logits differ in shape")
    dtype = compute_dtype(student_logits_BxTxV.dtype)
    B, T, V = student_logits_BxTxV.shape
    mask = torch.ones(B, T, dtype=torch.bool, device=response_ids_BxT.device) if mask_BxT is None else mask_BxT.bool()
    log_q = torch.log_softmax(student_logits_BxTxV.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV.to(dtype).detach(), dim=-1)
    lq_tok = _token_logprobs(log_q, response_ids_BxT)  # log q_θ(y_t), with gradient
    with torch.no_grad():
        r = torch.where(mask, _token_logprobs(log_p, response_ids_BxT) - lq_tok, 0.0)  # r_t
        # R_{t+1} = Σ_{t' > t} r_t': a reversed cumulative sum, shifted by one
        after = r.flip(-1).cumsum(-1).flip(-1) - r
        if length_norm:
            n_after = mask.flip(-1).cumsum(-1).flip(-1) - mask.to(torch.long)
            after = torch.where(n_after > 0, after / n_after.clamp_min(1), 0.0)
        w = torch.ones_like(r)
        if behaviour_logprobs_BxT is not None and weights != "none":
            log_ratio = torch.where(mask, lq_tok - behaviour_logprobs_BxT.to(dtype), 0.0)
            if weights == "token":
                w = log_ratio.exp().clamp(max=clip)
            else:
                w = log_ratio.sum(-1, keepdim=True).exp().expand_as(r)
    single = _kl_rows(log_q.reshape(B * T, V), log_p.reshape(B * T, V)).view(B, T)  # KL(q_t ‖ p_t), with gradient
    per_token = w * (single - after * lq_tok)
    return torch.where(mask, per_token, torch.zeros_like(per_token))


@torch.no_grad()
def sequence_reverse_kl_estimate(student_logits_BxTxV: Tensor, teacher_logits_BxTxV: Tensor, response_ids_BxT: Tensor,
                                 mask_BxT: Tensor | None = None) -> Tensor:
    """Σ_t log q(y_t) − log p(y_t) per response (B): an unbiased estimate of KL_seq(q ‖ p) on student samples."""
    log_q = torch.log_softmax(student_logits_BxTxV.double(), dim=-1)
    log_p = torch.log_softmax(teacher_logits_BxTxV.double(), dim=-1)
    d = _token_logprobs(log_q, response_ids_BxT) - _token_logprobs(log_p, response_ids_BxT)
    return (d if mask_BxT is None else torch.where(mask_BxT.bool(), d, 0.0)).sum(-1)


@torch.no_grad()
def sample_teacher_mixed(student_step, teacher_step, prompt_BxP: Tensor, max_new_tokens: int, alpha: float,
                         generator: torch.Generator | None = None, return_teacher_logits: bool = False):
    """Responses drawn token by token from p̃ = α·p + (1 − α)·q (MiniLLM's teacher-mixed sampling, Eq. 4), and
    log p̃(y_t) of each drawn token (the behaviour log-probs for the importance weights).

    `student_step(ids_BxL)` and `teacher_step(ids_BxL)` return next-token logits B×V for the sequences so far
    (e.g. ``lambda ids: lm.hf(input_ids=ids).logits[:, -1]``). With `return_teacher_logits`, also the teacher's
    logits at every response position (B×R×V): the distillation targets, without a second teacher forward."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; allowed: 0 <= alpha <= 1")
    ids = prompt_BxP
    out, logps, teacher_logits = [], [], []
    for _ in range(max_new_tokens):
        q = torch.softmax(student_step(ids).double(), dim=-1)
        z_t = teacher_step(ids)
        if return_teacher_logits:
            teacher_logits.append(z_t)
        p = torch.softmax(z_t.double(), dim=-1)
        mix = alpha * p + (1.0 - alpha) * q
        nxt = torch.multinomial(mix, 1, generator=generator)
        out.append(nxt)
        logps.append(mix.gather(-1, nxt).log())
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    if return_teacher_logits:
        return torch.cat(out, dim=1), torch.cat(logps, dim=1), torch.stack(teacher_logits, dim=1)
    return torch.cat(out, dim=1), torch.cat(logps, dim=1)
