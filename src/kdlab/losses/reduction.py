"""The one reduction every kdlab loss goes through, and the token selection that feeds it.

Per-token values ``BxT`` become a scalar (``"mean"``, ``"sum"``) or stay ``BxT`` (``"none"``).
``"mean"`` divides by the number of counted tokens of the *whole batch* (not per sequence), so
``sum`` over micro-batches or data-parallel ranks divided by the global token count equals the
``mean`` of one big batch: that is how gradient accumulation and DDP stay exact (DESIGN.md, Losses).
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not allowed; allowed values: {REDUCTIONS}")


def token_count(mask_BxT: Tensor | None, shape_BxT: tuple[int, int] | torch.Size) -> int:
    """Number of tokens that count (True in the mask; all of them when the mask is None).

    Summing this over micro-batches / ranks gives the global count that turns
    ``reduction="sum"`` back into the big-batch mean.
    """
    if mask_BxT is None:
        return int(shape_BxT[0]) * int(shape_BxT[1])
    return int(mask_BxT.sum())


def reduce_tokens(per_token_BxT: Tensor, mask_BxT: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reduce per-token loss values over the counted tokens of the whole batch.

    ``"none"`` returns ``BxT`` with exact zeros at masked positions; ``"sum"`` the sum over
    counted tokens; ``"mean"`` that sum divided by the number of counted tokens (1 when there are
    none, so an all-masked batch gives exactly 0 with zero, finite gradients, never NaN).
    """
    check_reduction(reduction)
    if mask_BxT is not None:
        if mask_BxT.shape != per_token_BxT.shape:
            raise ValueError(f"mask shape {tuple(mask_BxT.shape)} != per-token shape {tuple(per_token_BxT.shape)}")
        # torch.where, not multiplication: inf * 0 = NaN would leak from a masked position.
        per_token_BxT = torch.where(mask_BxT, per_token_BxT, torch.zeros_like(per_token_BxT))
    if reduction == "none":
        return per_token_BxT
    return per_token_BxT.sum() * reduction_weight(token_count(mask_BxT, per_token_BxT.shape), reduction)


def reduction_weight(count: int, reduction: str) -> float:
    """The factor a scalar reduction applies to the sum of the counted tokens' values:
    1 / count for ``"mean"`` (1 when nothing counts, so the result is 0, not NaN), 1 for ``"sum"``."""
    if reduction == "mean":
        return 1.0 / max(count, 1)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"reduction={reduction!r} has no scalar weight; allowed values: ('mean', 'sum')")


def check_mask(mask_BxT: Tensor | None, shape_BxT: tuple[int, int]) -> None:
    if mask_BxT is None:
        return
    if mask_BxT.dtype != torch.bool:
        raise ValueError(f"mask dtype={mask_BxT.dtype} is not allowed; allowed: torch.bool (True = token counts)")
    if tuple(mask_BxT.shape) != tuple(shape_BxT):
        raise ValueError(f"mask shape={tuple(mask_BxT.shape)} does not match the logits' (B, T)={tuple(shape_BxT)}")


def counted_rows(mask_BxT: Tensor | None) -> Tensor | None:
    """Flat indices (into B*T) of the tokens that count, or None when every token counts.

    Losses are computed on these rows only, so whatever sits at masked positions (padding,
    garbage, inf) never enters a value or a gradient, and padded tokens cost nothing. None avoids
    copying the ``(B*T)xV`` logits in the common all-True case.
    """
    if mask_BxT is None or bool(mask_BxT.all()):
        return None
    return mask_BxT.reshape(-1).nonzero().squeeze(1)


def take_rows(x_NxD: Tensor, rows: Tensor | None) -> Tensor:
    """Rows of a flattened ``(B*T)xD`` tensor selected by :func:`counted_rows`."""
    return x_NxD if rows is None else x_NxD.index_select(0, rows)


def place_rows(values_N: Tensor, rows: Tensor | None, shape_BxT: tuple[int, int]) -> Tensor:
    """Inverse of :func:`take_rows` for per-token values: exact zeros at the rows not taken."""
    if rows is None:
        return values_N.reshape(shape_BxT)
    n = int(shape_BxT[0]) * int(shape_BxT[1])
    return values_N.new_zeros(n).index_put((rows,), values_N).reshape(shape_BxT)
