"""The memory-lean path: any kdlab loss from the student's final hidden states and LM head.

The student's logits for all tokens, (tokens x V), are the largest tensor of distillation (8k
tokens x 128k vocabulary in float32 is 4 GiB, and autograd keeps several of its size). Here they
are never materialised in full, neither in forward nor in backward: the counted tokens are cut
into chunks; forward computes each chunk's logits, the loss on them and drops them; backward
recomputes each chunk's logits, takes the gradient of the chunk's loss with respect to them and
folds it straight into the gradients of the hidden states, the LM-head weight and bias.
Peak extra memory is then O(chunk_size x V) instead of O(tokens x V), at the price of computing
each chunk's logits twice (the same trade as activation checkpointing).

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
from kdlab.losses.reduction import check_mask, check_reduction, counted_rows, place_rows, reduce_tokens
from kdlab.losses.registry import get
from kdlab.losses.sparse import SparseTarget, check_sparse

# chunk_loss(start, end, logits_cxV) -> per-token values (c,) for counted tokens start..end-1
ChunkLoss = Callable[[int, int, Tensor], Tensor]


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """per_token_N = chunk_loss(hidden_NxH @ weight_VxH.T + bias_V), one chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, hidden_NxH, weight_VxH, bias_V, chunk_loss: ChunkLoss, chunk_size: int):
        n = hidden_NxH.shape[0]
        out_N = None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            values = chunk_loss(start, end, F.linear(hidden_NxH[start:end], weight_VxH, bias_V))
            if out_N is None:
                out_N = values.new_empty(n)
            out_N[start:end] = values
        if out_N is None:  # no counted token at all
            out_N = hidden_NxH.new_zeros(0, dtype=compute_dtype(hidden_NxH.dtype))
        ctx.save_for_backward(hidden_NxH, weight_VxH, bias_V)
        ctx.chunk_loss, ctx.chunk_size = chunk_loss, chunk_size
        return out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        hidden_NxH, weight_VxH, bias_V = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = compute_dtype(weight_VxH.dtype)  # accumulate weight/bias grads over chunks in >= float32
        grad_h = torch.zeros_like(hidden_NxH) if need_h else None
        grad_w = torch.zeros(weight_VxH.shape, dtype=acc, device=weight_VxH.device) if need_w else None
        grad_b = torch.zeros(bias_V.shape, dtype=acc, device=bias_V.device) if need_b else None
        n = hidden_NxH.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h_cxH = hidden_NxH[start:end]
            with torch.enable_grad():
                logits_cxV = F.linear(h_cxH, weight_VxH, bias_V).detach().requires_grad_()
                values = ctx.chunk_loss(start, end, logits_cxV)
                (grad_logits,) = torch.autograd.grad(values, logits_cxV, grad_N[start:end].to(values.dtype))
            grad_logits = grad_logits.to(weight_VxH.dtype)
            if need_h:
                grad_h[start:end] = grad_logits @ weight_VxH
            if need_w:
                grad_w.addmm_(grad_logits.t().to(acc), h_cxH.to(acc))
            if need_b:
                grad_b += grad_logits.sum(dim=0).to(acc)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight_VxH.dtype),
            None if grad_b is None else grad_b.to(bias_V.dtype),
            None,
            None,
        )


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
        teacher: dense teacher logits (B, T, V) or a SparseTarget (B, T, K).
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
    elif isinstance(teacher, Tensor) and tuple(teacher.shape) == (B, T, V):
        flat_teacher = teacher.reshape(B * T, V)
    else:
        raise ValueError(
            f"teacher {type(teacher).__name__} of shape {tuple(getattr(teacher, 'shape', ()))}; "
            f"allowed: logits of shape {(B, T, V)} or a SparseTarget"
        )

    rows = counted_rows(mask_BxT)
    if rows is None:
        rows = torch.arange(B * T, device=hidden_BxTxH.device)
    hidden_NxH = hidden_BxTxH.reshape(B * T, H).index_select(0, rows)

    def chunk_loss(start: int, end: int, logits_cxV: Tensor) -> Tensor:
        # Teacher rows are gathered per chunk: a full gather would copy the (tokens x V) teacher.
        r = rows[start:end]
        if isinstance(flat_teacher, SparseTarget):
            target = SparseTarget(flat_teacher.indices[r][None], flat_teacher.logprobs[r][None])
        else:
            target = flat_teacher[r][None]
        return fn(logits_cxV[None], target, None, reduction="none", temperature=temperature)[0]

    values_N = _ChunkedLMHeadLoss.apply(hidden_NxH, lm_head_weight_VxH, lm_head_bias_V, chunk_loss, chunk_size)
    per_token_BxT = place_rows(values_N, rows, (B, T))
    return reduce_tokens(per_token_BxT, mask_BxT, reduction)
