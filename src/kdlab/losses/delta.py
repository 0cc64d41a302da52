"""Delta-KD's target (Cao et al. 2025, "Delta Knowledge Distillation for Large Language Models", arXiv 2509.14526).

The student is trained towards its own pretrained distribution shifted by what supervised fine-tuning did to the
teacher, rather than towards the teacher itself:

    π*(v) ∝ π_s0(v) · (π_t(v) / π_t0(v))^α,   i.e.   log π* = log π_s0 + α (log π_t − log π_t0) + const,

π_t the fine-tuned teacher, π_t0 the teacher before its fine-tuning, π_s0 the student before distillation. α = 1 is
the paper's shift; α = 0 keeps the student where it started. Any kdlab loss then compares the student with π*
(forward KL(π* ‖ π_θ) in the paper). Computed in log space: the result is a log-probability tensor (normalised),
usable wherever dense teacher logits are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.divergences import compute_dtype


def delta_target(teacher_logits_BxTxV: Tensor, teacher_base_logits_BxTxV: Tensor, student_base_logits_BxTxV: Tensor,
                 alpha: float = 1.0) -> Tensor:
    """log π* = log_softmax(log π_s0 + α (log π_t − log π_t0)), in float32 or better; −inf entries of the fine-tuned
    teacher stay −inf (the shift never revives a token the teacher rules out)."""
    shapes = {tuple(t.shape) for t in (teacher_logits_BxTxV, teacher_base_logits_BxTxV, student_base_logits_BxTxV)}
    if len(shapes) != 1:
        raise ValueError(f"delta_target: the teacher, teacher-base and student-base logits must have one shape, "
                         f"got {sorted(shapes)}")
    dtype = compute_dtype(teacher_logits_BxTxV.dtype)
    log_t = torch.log_softmax(teacher_logits_BxTxV.to(dtype), dim=-1)
    log_t0 = torch.log_softmax(teacher_base_logits_BxTxV.to(dtype), dim=-1)
    log_s0 = torch.log_softmax(student_base_logits_BxTxV.to(dtype), dim=-1)
    shift = (log_t - log_t0).masked_fill(log_t == float("-inf"), float("-inf")) if alpha else torch.zeros_like(log_t)
    return torch.log_softmax(log_s0 + alpha * shift, dim=-1)
