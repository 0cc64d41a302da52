"""kdlab.losses: token-level distillation divergences, TAID, reductions, sparse targets, lean path.

Every loss: ``loss(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean",
temperature=1.0, **params)`` with ``teacher`` dense logits, a :class:`SparseTarget` (top-k, a lower
bound) or a :class:`HiddenTarget` (the teacher's hidden states and head, exact).
See DESIGN.md ("Losses (contract)") and each function's docstring for formula, direction and source.
"""

from kdlab.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    taid,
    token_divergence,
    tvd,
)
from kdlab.losses.hidden import HiddenTarget
from kdlab.losses.lean import lean_loss
from kdlab.losses.reduction import REDUCTIONS, reduce_tokens, token_count
from kdlab.losses.registry import LOSSES, get
from kdlab.losses.sparse import SparseTarget
from kdlab.losses.schedule import TAIDSchedule

__all__ = [
    "HiddenTarget",
    "LOSSES",
    "REDUCTIONS",
    "SparseTarget",
    "TAIDSchedule",
    "forward_kl",
    "generalized_jsd",
    "get",
    "lean_loss",
    "reduce_tokens",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "taid",
    "token_count",
    "token_divergence",
    "tvd",
]
