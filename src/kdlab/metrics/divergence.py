"""Sequence-level divergences between a reference model A and a student S, with standard errors.

Definitions (docs/DESIGN.md, "Metric definitions"), for eval prompts x and responses y = y_1..y_R:

    fkl(A, S) = E_x E_{y~A(·|x)} Σ_t KL( A(·|x,y<t) ‖ S(·|x,y<t) )
    rkl(A, S) = E_x E_{y~S(·|x)} Σ_t KL( S(·|x,y<t) ‖ A(·|x,y<t) )

By the chain rule, Σ_t of the full-vocabulary KL at each visited prefix, averaged over y ~ A, is the
sequence-level KL(A(·|x) ‖ S(·|x)). The usual Monte-Carlo estimator, log A(y|x) − log S(y|x) for
y ~ A, has the same mean; summing the exact per-position KL instead is its Rao-Blackwellisation
(the inner expectation over each y_t is done exactly), so its variance is never larger. The
per-position KL comes from ``kdlab.losses`` (``forward_kl`` = KL(teacher ‖ student), ``reverse_kl``
= KL(student ‖ teacher), with the reference in the teacher slot), so metrics and losses cannot drift.

Standard errors: the eval set is a sample of prompts, and the samples of one prompt are not
independent of each other given the population of prompts, so the SE is computed from per-prompt
averages (a cluster-robust SE; with one sample per prompt it is the plain SE over sequences). With a
single prompt it falls back to the SE over that prompt's samples (then it is conditional on x).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from kdlab.losses import HiddenTarget, SparseTarget, forward_kl, lean_loss, reverse_kl
from kdlab.models import LM, check_vocab_compatible

__all__ = ["DivergenceEstimate", "sample_responses", "sequence_kl_sums", "sequence_rkl"]


@dataclass(frozen=True)
class DivergenceEstimate:
    """A sequence-level divergence estimate.

    mean: average over sequences of the per-sequence sum s_i = Σ_t KL_t (nats per sequence).
    se: its standard error (cluster-robust over prompts, see the module docstring).
    per_token: Σ_i s_i / Σ_i n_i, the KL per response token (n_i = tokens in sequence i).
    per_token_se: SE of that ratio by the delta method, sqrt(Var(s − r·n) / k) / n̄ over the k clusters.
    n: number of sequences (prompts × samples per prompt).
    """

    mean: float
    se: float
    per_token: float
    per_token_se: float
    n: int

    @classmethod
    def from_sums(cls, kl_sums_N: Tensor, token_counts_N: Tensor, samples_per_prompt: int = 1) -> "DivergenceEstimate":
        """Estimate from per-sequence sums; rows ``i*m .. i*m+m-1`` are the m samples of prompt i."""
        s = kl_sums_N.detach().double().cpu()
        c = token_counts_N.detach().double().cpu()
        N, m = s.numel(), samples_per_prompt
        if N == 0:
            raise ValueError("no sequences to estimate from (N = 0)")
        if m < 1 or N % m:
            raise ValueError(f"samples_per_prompt={m} must be >= 1 and divide the number of sequences N={N}")
        k = N // m
        if k == 1:  # one prompt: its samples are iid given x
            s_k, c_k = s, c
        else:  # per-prompt averages are the independent units
            s_k, c_k = s.view(k, m).mean(1), c.view(k, m).mean(1)
        units = s_k.numel()
        mean = float(s.mean())
        se = float(s_k.std(unbiased=True) / math.sqrt(units)) if units > 1 else math.nan
        total_tokens = float(c.sum())
        if total_tokens == 0:
            return cls(mean, se, math.nan, math.nan, N)
        r = float(s.sum()) / total_tokens
        # Delta method for a ratio of means: Var(S̄/C̄) ≈ Var(s − r·c) / (units · C̄²).
        resid = s_k - r * c_k
        per_token_se = (
            float(resid.std(unbiased=True) / (math.sqrt(units) * c_k.mean())) if units > 1 else math.nan
        )
        return cls(mean, se, r, per_token_se, N)

    def to_dict(self, prefix: str = "") -> dict:
        """Flat dict for metrics.jsonl, e.g. ``to_dict("proxy_fkl")`` -> proxy_fkl, proxy_fkl_se, ..."""
        d = asdict(self)
        if not prefix:
            return d
        return {prefix if k == "mean" else f"{prefix}_{k}": v for k, v in d.items()}


@contextmanager
def eval_mode(*lms):
    """Evaluate in eval mode (dropout off in models that have it), then restore each model's mode."""
    modes = [lm.hf.training for lm in lms]
    for lm in lms:
        lm.hf.eval()
    try:
        yield
    finally:
        for lm, was_training in zip(lms, modes):
            lm.hf.train(was_training)


def _rows(target, sl: slice, device):
    if isinstance(target, SparseTarget):
        return SparseTarget(target.indices[sl].long().to(device), target.logprobs[sl].to(device))
    if isinstance(target, HiddenTarget):
        return HiddenTarget(target.hidden[sl].to(device), target.weight, target.bias)
    return target[sl].to(device)


@torch.no_grad()
def sequence_kl_sums(
    student: LM,
    reference: "LM | Tensor | SparseTarget",
    prompt_ids_NxP: Tensor,
    prompt_mask_NxP: Tensor | None,
    response_ids_NxR: Tensor,
    response_mask_NxR: Tensor | None = None,
    *,
    direction: str = "forward",
    batch_size: int = 64,
    lean: bool | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of the per-position KL on given (prompt, response) pairs.

    Returns ``(kl_sums_N, token_counts_N)`` (float64, int64, on CPU):
    ``direction="forward"``: s_i = Σ_t KL(A_t ‖ S_t); ``"reverse"``: s_i = Σ_t KL(S_t ‖ A_t),
    where A_t is the reference's next-token distribution at response position t and S_t the
    student's. ``reference`` is a model (one forward pass per batch) or its precomputed per-position
    targets for these N rows: dense log-probs/logits ``NxRxV``, a ``HiddenTarget`` (hidden states and
    head: exact) or a ``SparseTarget`` (top-k: a lower bound).
    ``lean`` (default: when the reference is a ``HiddenTarget``) computes both models' logits
    ``chunk_size`` tokens at a time from their hidden states (``kdlab.losses.lean_loss``), never holding
    B×R×V for either; a live reference then gives its hidden states too. A student (or live reference)
    whose logits are not ``hidden @ lm_head.T`` is run densely instead. The values are the same.
    Their expectation is the sequence KL only if the responses come from the right model
    (A for forward, S for reverse); on other responses (e.g. training data) they are the divergence
    along those responses. Wrap in :meth:`DivergenceEstimate.from_sums` for the mean and SE.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction={direction!r}; allowed: 'forward', 'reverse'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kl = forward_kl if direction == "forward" else reverse_kl
    N, R = response_ids_NxR.shape
    if isinstance(reference, LM):
        check_vocab_compatible(reference, student, names=("reference", "student"))
    elif isinstance(reference, Tensor):  # a SparseTarget's width is K; the loss checks its indices
        check_vocab_compatible(reference.shape[-1], student, names=("reference", "student"))
    if response_mask_NxR is None:
        response_mask_NxR = torch.ones(N, R, dtype=torch.bool, device=response_ids_NxR.device)
    if prompt_mask_NxP is None:
        prompt_mask_NxP = torch.ones_like(prompt_ids_NxP, dtype=torch.bool)
    if lean is None:
        lean = isinstance(reference, HiddenTarget)
    lean_student = lean and student.has_linear_head
    live_hidden = lean and isinstance(reference, LM) and reference.has_linear_head
    dev = student.device
    if isinstance(reference, HiddenTarget):  # move the shared head once, not per batch
        bias = None if reference.bias is None else reference.bias.to(dev)
        reference = HiddenTarget(reference.hidden, reference.weight.to(dev), bias)
    sums, counts = [], []
    with eval_mode(student, *([reference] if isinstance(reference, LM) else [])):
        for start in range(0, N, batch_size):
            sl = slice(start, min(start + batch_size, N))
            args = (prompt_ids_NxP[sl], prompt_mask_NxP[sl], response_ids_NxR[sl], response_mask_NxR[sl])
            if not isinstance(reference, LM):
                target = _rows(reference, sl, dev)
            elif live_hidden:
                target = HiddenTarget(reference.response_hidden(*args).to(dev), reference.lm_head_weight.to(dev))
            else:
                target = reference.response_logits(*args).to(dev)
            mask = response_mask_NxR[sl].to(dev).bool()
            if lean_student:
                per_token_BxR = lean_loss(kl, student.response_hidden(*args), student.lm_head_weight, target, mask,
                                          reduction="none", chunk_size=chunk_size)
            else:
                per_token_BxR = kl(student.response_logits(*args), target, mask, reduction="none")
            sums.append(per_token_BxR.double().sum(-1).cpu())
            counts.append(mask.sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


@torch.no_grad()
def sample_responses(
    lm: LM,
    prompt_ids_NxP: Tensor,
    prompt_mask_NxP: Tensor | None = None,
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``samples_per_prompt`` responses per prompt, in batches of ``batch_size`` sequences.

    Returns ``(prompt_ids_MxP, prompt_mask_MxP, response_ids_MxR, response_mask_MxR)`` with
    M = N·m and row ``i*m + j`` = sample j of prompt i (the layout DivergenceEstimate clusters by).
    """
    from kdlab.models.sampling import sample

    m = samples_per_prompt
    if m < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {m}")
    if prompt_mask_NxP is None:
        prompt_mask_NxP = torch.ones_like(prompt_ids_NxP, dtype=torch.bool)
    ids, mask = prompt_ids_NxP.repeat_interleave(m, 0), prompt_mask_NxP.repeat_interleave(m, 0)
    responses, masks = [], []
    for start in range(0, ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        y = sample(lm, ids[sl], mask[sl], max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_token_id=eos_token_id, generator=generator)
        responses.append(y.response_ids_BxR)
        masks.append(y.response_mask_BxR)
    return ids, mask, torch.cat(responses), torch.cat(masks)


def sequence_rkl(
    student: LM,
    reference: LM,
    prompt_ids_NxP: Tensor,
    prompt_mask_NxP: Tensor | None = None,
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    eos_token_id: int | tuple[int, ...] | None = None,
    batch_size: int = 64,
    lean: bool = False,
) -> DivergenceEstimate:
    """rkl = E_x E_{y~S} Σ_t KL(S_t ‖ A_t) on fresh student samples (they change as S trains).

    Costs one student sampling pass and one forward pass of each model. ``temperature`` only
    changes how y is drawn; the KL is always between the models' own (T = 1) distributions. ``lean``
    computes both models' logits chunk by chunk from their hidden states (see `sequence_kl_sums`).
    """
    with eval_mode(student, reference):
        rows = sample_responses(student, prompt_ids_NxP, prompt_mask_NxP, samples_per_prompt=samples_per_prompt,
                                max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id,
                                generator=generator, batch_size=batch_size)
        sums, counts = sequence_kl_sums(student, reference, *rows, direction="reverse", batch_size=batch_size,
                                        lean=lean)
    return DivergenceEstimate.from_sums(sums, counts, samples_per_prompt)
