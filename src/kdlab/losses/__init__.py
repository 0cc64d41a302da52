"""kdlab.losses: token-level distillation divergences, TAID, reductions, sparse targets, lean path.

Every loss: ``loss(student_logits_BxTxV, teacher, mask_BxT=None, *, reduction="mean",
temperature=1.0, **params)`` with ``teacher`` dense logits, a :class:`SparseTarget` (top-k, a lower
bound) or a :class:`HiddenTarget` (the teacher's hidden states and head, exact).
See DESIGN.md ("Losses (contract)") and each function's docstring for formula, direction and source.
"""

# The names below load on first use (PEP 562): importing the package, or its torch-free table of
# loss names (kdlab.losses.names, which the config reads), does not import torch.
import importlib

_SOURCE = {
    "ab_divergence": "divergences", "adaptive_kl": "divergences", "forward_kl": "divergences", "generalized_jsd": "divergences", "reverse_kl": "divergences",
    "skew_kl": "divergences", "skew_reverse_kl": "divergences", "taid": "divergences",
    "token_divergence": "divergences", "tvd": "divergences",
    "lean_loss": "lean",
    "delta_target": "delta",
    "minillm_surrogate": "minillm", "sample_teacher_mixed": "minillm", "sequence_reverse_kl_estimate": "minillm",
    "REDUCTIONS": "reduction", "reduce_tokens": "reduction", "token_count": "reduction",
    "LOSSES": "registry", "get": "registry",
    "SparseTarget": "sparse",
    "HiddenTarget": "hidden",
    "TAIDSchedule": "schedule",
}

__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCE))
