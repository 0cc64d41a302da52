"""Exact teacher targets from the teacher's final hidden states and output head.

A dense target over a real vocabulary is large (V = 151,936 float32 log-probs are 594 KiB per token),
and a top-k target is a lower bound (:mod:`kdlab.losses.sparse`). The teacher's final hidden state
(after its last norm) is H numbers per token, 25-100x fewer than V at real sizes, and its logits are
recovered exactly as ``hidden @ weight.T (+ bias)`` with the teacher's output head. A
:class:`HiddenTarget` carries both; every loss accepts it where it accepts dense teacher logits:

* the dense losses compute the teacher logits of the counted tokens only, in float32 or better;
* :func:`kdlab.losses.lean_loss` computes them chunk by chunk beside the student's, so neither model's
  tokens x V logits are ever held in full.

The values equal the dense loss on ``hidden @ weight.T`` within float32 round-off (tests pin it for
every loss). Models whose logits are not a plain linear map of the last hidden state (soft-capping,
a logit scale, a biased head) are refused by ``LM.lm_head_weight``, not approximated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class HiddenTarget(NamedTuple):
    """A teacher target as ``logits = hidden @ weight.T + bias``.

    hidden: (B, T, H) the teacher's final hidden states, in its dtype (T5's output scaling applied).
    weight: (V, H) the teacher's output head; bias: (V,) or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def flat_logits(self, rows: Tensor | slice | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Logits (n, V) of the flattened (B*T) positions ``rows`` (None: all), computed in ``dtype``."""
        B, T, H = self.hidden.shape
        flat = self.hidden.reshape(B * T, H)
        if rows is not None:
            flat = flat[rows]
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(flat.to(dtype), self.weight.to(dtype), bias)


def check_hidden(target: HiddenTarget, shape_BxT: tuple[int, int], vocab: int) -> None:
    """Shapes of a hidden-state target against the student's (B, T) and V."""
    h, w = target.hidden, target.weight
    if h.dim() != 3 or tuple(h.shape[:2]) != tuple(shape_BxT):
        raise ValueError(f"HiddenTarget hidden shape={tuple(h.shape)}; allowed: {tuple(shape_BxT)} + (H,)")
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"HiddenTarget weight shape={tuple(w.shape)}; allowed: (V, {h.shape[-1]})")
    if w.shape[0] != vocab:
        raise ValueError(f"HiddenTarget head has V={w.shape[0]} rows but the student has V={vocab}; "
                         "teacher and student must share a vocabulary")
    if target.bias is not None and tuple(target.bias.shape) != (vocab,):
        raise ValueError(f"HiddenTarget bias shape={tuple(target.bias.shape)}; allowed: ({vocab},)")
