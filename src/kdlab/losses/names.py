"""The losses' names and parameters, without torch: the table the config validates `loss.name`
against (kdlab.config stays importable without torch). kdlab.losses.registry binds each name to its
function; adding a loss is its function in kdlab.losses.divergences and its line here."""

# name -> the parameters the loss takes (each lies in [0, 1]). A loss's name is its function's name in
# kdlab.losses.divergences. `t` (TAID) comes from its schedule at each step; the others from `loss.<param>`.
LOSS_PARAMS: dict[str, tuple[str, ...]] = {
    "forward_kl": (),
    "reverse_kl": (),
    "generalized_jsd": ("beta",),
    "tvd": (),
    "skew_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
    "taid": ("t",),
    "ab_divergence": ("alpha", "beta"),
    "adaptive_kl": ("mu",),
}

# Sequence-level losses: they need the sampled responses (and their sampling log-probs), not only two
# distributions per position, so the stage-2 loop calls them directly (kdlab.losses.minillm).
MINILLM = "minillm"
SEQUENCE_LOSSES = (MINILLM,)

LOSS_NAMES = tuple(LOSS_PARAMS) + SEQUENCE_LOSSES

# How a teacher's (or any reference's) distributions are held, for offline targets and evaluation caches.
# "full", "hidden" (final hidden states + output head) and "none" (the live model) are exact; "topk" keeps the
# k largest log-probs, a lower bound of the KL; "auto" picks the first exact one that fits the memory budget.
TARGET_STORAGES = ("auto", "full", "hidden", "topk", "none")

