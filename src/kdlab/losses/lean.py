"""The memory-lean path: any kdlab loss from the student's final hidden states and LM head.

The student's logits for all tokens, (tokens x V), are the largest tensor of distillation (8k
tokens x 128k vocabulary in float32 is 4 GiB, and autograd keeps several of its size). Here they
are never materialised in full, neither in forward nor in backward: the counted tokens are cut
into chunks; each chunk's logits are computed, differentiated through the loss alone, and the
logits gradient is folded straight into the gradients of the hidden states, the LM-head weight
and bias, then dropped. Peak extra memory is O(chunk_size x V) instead of O(tokens x V).

With ``reduction="mean"`` or ``"sum"`` every token's upstream gradient is the same known weight,
so the gradients are computed during forward (as Liger-Kernel's fused linear losses do) and
backward only scales them: no recomputation, one pass over the logits. With ``"none"`` the
per-token upstream gradients are only known in backward, which then recomputes each chunk's
logits (the trade of activation checkpointing). Forward without grad computes values only.

This is the one chunking wrapper: it calls the public loss functions themselves on each chunk
(with ``reduction="none"``), so any loss with the kdlab signature gets the lean path for free and
chunked == unchunked by construction (tests/test_losses_lean.py pins it for every loss).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.divergences import compute_dtype
from kdlab.losses.reduction import (
    check_mask,
    check_reduction,
    counted_rows,
    place_rows,
    reduce_tokens,
    reduction_weight,
)
from kdlab.losses.hidden import HiddenTarget, check_hidden
from kdlab.losses.registry import get
from kdlab.losses.sparse import SparseTarget, check_sparse

# chunk_loss(start, end, logits_cxV) -> per-token values (c,) for counted tokens start..end-1
ChunkLoss = Callable[[int, int, Tensor], Tensor]


def _chunk_values(hidden_NxH, weight_VxH, bias_V, chunk_loss: ChunkLoss, chunk_size: int) -> Tensor:
    """Per-token values, chunk by chunk, without gradients."""
    n = hidden_NxH.shape[0]
    parts = [
        chunk_loss(s, min(s + chunk_size, n), F.linear(hidden_NxH[s : s + chunk_size], weight_VxH, bias_V))
        for s in range(0, n, chunk_size)
    ]
    return torch.cat(parts) if parts else hidden_NxH.new_zeros(0, dtype=compute_dtype(hidden_NxH.dtype))


def _chunk_grads(hidden_NxH, weight_VxH, bias_V, chunk_loss, chunk_size, upstream, needs):
    """Gradients of Σ_i upstream_i · loss_i w.r.t. hidden, weight and bias, one chunk at a time.

    Each chunk's logits are (re)computed, differentiated through the loss alone, and the logits
    gradient is folded at once into the parameter gradients: dh = dz·W, dW += dzᵀ·h, db += Σ dz.
    ``upstream`` is a tensor (N,) or a float applied to every token. Returns the per-token values
    too (they come for free).
    """
    need_h, need_w, need_b = needs
    acc = compute_dtype(weight_VxH.dtype)  # accumulate weight/bias grads over chunks in >= float32
    grad_h = torch.zeros_like(hidden_NxH) if need_h else None
    grad_w = torch.zeros(weight_VxH.shape, dtype=acc, device=weight_VxH.device) if need_w else None
    grad_b = torch.zeros(bias_V.shape, dtype=acc, device=bias_V.device) if need_b else None
    n = hidden_NxH.shape[0]
    values = []
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_cxH = hidden_NxH[start:end]
        with torch.enable_grad():
            logits_cxV = F.linear(h_cxH, weight_VxH, bias_V).detach().requires_grad_()
            vals = chunk_loss(start, end, logits_cxV)
            up = upstream[start:end].to(vals.dtype) if isinstance(upstream, Tensor) else torch.full_like(vals, upstream)
            (grad_logits,) = torch.autograd.grad(vals, logits_cxV, up)
        values.append(vals.detach())
        grad_logits = grad_logits.to(weight_VxH.dtype)
        if need_h:
            grad_h[start:end] = grad_logits @ weight_VxH
        if need_w:
            grad_w.addmm_(grad_logits.t().to(acc), h_cxH.to(acc))
        if need_b:
            grad_b += grad_logits.sum(dim=0).to(acc)
    values_N = torch.cat(values) if values else hidden_NxH.new_zeros(0, dtype=compute_dtype(hidden_NxH.dtype))
    grad_w = None if grad_w is None else grad_w.to(weight_VxH.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias_V.dtype)
    return values_N, grad_h, grad_w, grad_b


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """loss(hidden_NxH @ weight_VxH.T + bias_V) over the counted tokens, one chunk at a time.

    ``token_weight=None``: returns the per-token values (N,); backward recomputes each chunk
    (the upstream gradient per token is only known then). ``token_weight=w`` (a scalar
    reduction, w = 1/count or 1): returns Σ_i w·loss_i and, when a gradient is needed, computes the
    gradients during forward, so backward only scales them: one pass over the logits, not two.
    """

    @staticmethod
    def forward(ctx, hidden_NxH, weight_VxH, bias_V, chunk_loss, chunk_size, token_weight):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.eager = token_weight is not None
        if not ctx.eager:
            ctx.save_for_backward(hidden_NxH, weight_VxH, bias_V)
            ctx.chunk_loss, ctx.chunk_size = chunk_loss, chunk_size
            return _chunk_values(hidden_NxH, weight_VxH, bias_V, chunk_loss, chunk_size)
        if any(needs):
            values, *grads = _chunk_grads(hidden_NxH, weight_VxH, bias_V, chunk_loss, chunk_size, token_weight, needs)
            ctx.save_for_backward(*grads)
        else:
            values = _chunk_values(hidden_NxH, weight_VxH, bias_V, chunk_loss, chunk_size)
        return values.sum() * token_weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.eager:
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        else:
            hidden_NxH, weight_VxH, bias_V = ctx.saved_tensors
            _, *grads = _chunk_grads(
                hidden_NxH, weight_VxH, bias_V, ctx.chunk_loss, ctx.chunk_size, grad_out, ctx.needs_input_grad[:3]
            )
        return (*grads, None, None, None)


def lean_loss(
    loss: str | Callable,
    hidden_BxTxH: Tensor,
    lm_head_weight_VxH: Tensor,
    teacher: Tensor | SparseTarget,
    mask_BxT: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    reduction: str = "mean",
    temperature: float = 1.0,
    lm_head_bias_V: Tensor | None = None,
    **params,
) -> Tensor:
    """``loss(hidden @ W.T + b, teacher, mask, ...)`` without materialising the full logits.

    Args:
        loss: a name for :func:`kdlab.losses.get` or a callable with the kdlab loss signature.
        hidden_BxTxH: the student's final hidden states (after the final norm), H = hidden size.
        lm_head_weight_VxH, lm_head_bias_V: the student's LM head; gradients flow to them and to
            the hidden states (the teacher is a constant here).
        teacher: dense teacher logits (B, T, V), a SparseTarget (B, T, K) or a HiddenTarget (the teacher's
            hidden states (B, T, H') and head (V, H'), exact: its logits are made per chunk too).
        mask_BxT: True = the token counts; only counted tokens are computed, ``chunk_size`` at a time.
        chunk_size: tokens per chunk; peak extra memory ~ a few chunk_size x V float32 tensors.
        reduction, temperature, params: as for the loss itself.
    Values and gradients equal the dense path ``loss(F.linear(hidden, W, b), teacher, mask, ...)``.
    """
    check_reduction(reduction)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} is out of range; allowed: an integer >= 1")
    if isinstance(loss, str):
        fn = get(loss, **params)
    elif callable(loss):
        fn = functools.partial(loss, **params) if params else loss
    else:
        raise ValueError(f"loss={loss!r} is not allowed; allowed: a loss name or a callable")
    if hidden_BxTxH.dim() != 3 or lm_head_weight_VxH.dim() != 2 or hidden_BxTxH.shape[-1] != lm_head_weight_VxH.shape[-1]:
        raise ValueError(
            f"hidden shape={tuple(hidden_BxTxH.shape)}, lm_head_weight shape={tuple(lm_head_weight_VxH.shape)}; "
            "allowed: (B, T, H) and (V, H)"
        )
    B, T, H = hidden_BxTxH.shape
    V = lm_head_weight_VxH.shape[0]
    if lm_head_bias_V is not None and tuple(lm_head_bias_V.shape) != (V,):
        raise ValueError(f"lm_head_bias shape={tuple(lm_head_bias_V.shape)}; allowed: ({V},)")
    check_mask(mask_BxT, (B, T))
    if isinstance(teacher, SparseTarget):
        check_sparse(teacher, (B, T), V)
        K = teacher.indices.shape[-1]
        flat_teacher = SparseTarget(teacher.indices.reshape(B * T, K), teacher.logprobs.reshape(B * T, K))
    elif isinstance(teacher, HiddenTarget):  # exact; its logits are made chunk by chunk beside the student's
        check_hidden(teacher, (B, T), V)
        flat_teacher = teacher  # flat_logits takes rows of the flattened (B*T) positions
    elif isinstance(teacher, Tensor) and tuple(teacher.shape) == (B, T, V):
        flat_teacher = teacher.reshape(B * T, V)
    else:
        raise ValueError(
            f"teacher {type(teacher).__name__} of shape {tuple(getattr(teacher, 'shape', ()))}; "
            f"allowed: logits of shape {(B, T, V)}, a SparseTarget or a HiddenTarget"
        )

    rows = counted_rows(mask_BxT)
    every_token = rows is None
    if every_token:
        rows = torch.arange(B * T, device=hidden_BxTxH.device)
    hidden_NxH = hidden_BxTxH.reshape(B * T, H).index_select(0, rows)

    def chunk_loss(start: int, end: int, logits_cxV: Tensor) -> Tensor:
        # Teacher rows are taken per chunk (a full gather would copy the tokens x V teacher), as a
        # view when every token counts.
        r = slice(start, end) if every_token else rows[start:end]
        if isinstance(flat_teacher, SparseTarget):
            target = SparseTarget(flat_teacher.indices[r][None], flat_teacher.logprobs[r][None])
        elif isinstance(flat_teacher, HiddenTarget):
            target = flat_teacher.flat_logits(r, compute_dtype(logits_cxV.dtype))[None]
        else:
            target = flat_teacher[r][None]
        return fn(logits_cxV[None], target, None, reduction="none", temperature=temperature)[0]

    head = (hidden_NxH, lm_head_weight_VxH, lm_head_bias_V, chunk_loss, chunk_size)
    if reduction == "none":
        values_N = _ChunkedLMHeadLoss.apply(*head, None)
        return reduce_tokens(place_rows(values_N, rows, (B, T)), mask_BxT, reduction)
    # Scalar reductions weigh every counted token alike: the weight of the shared reduction.
    return _ChunkedLMHeadLoss.apply(*head, reduction_weight(rows.numel(), reduction))
