"""Losses by name, for configs: ``get("generalized_jsd", beta=0.9)``."""

from __future__ import annotations

import functools
from typing import Callable

from kdlab.losses import divergences
from kdlab.losses.divergences import check_unit_interval

# name -> (function, the parameters it takes; each lies in [0, 1]).
LOSSES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "forward_kl": (divergences.forward_kl, ()),
    "reverse_kl": (divergences.reverse_kl, ()),
    "generalized_jsd": (divergences.generalized_jsd, ("beta",)),
    "tvd": (divergences.tvd, ()),
    "skew_kl": (divergences.skew_kl, ("alpha",)),
    "skew_reverse_kl": (divergences.skew_reverse_kl, ("alpha",)),
    "taid": (divergences.taid, ("t",)),
}


def get(name: str, **params) -> Callable:
    """The loss called ``name`` with ``params`` bound, checked now rather than at the first step.

    ``get("taid")`` may leave ``t`` unbound; pass ``t=schedule.t`` at each call.
    Raises ValueError naming the loss or parameter, the value and what is allowed.
    """
    if name not in LOSSES:
        raise ValueError(f"loss name={name!r} is unknown; allowed values: {sorted(LOSSES)}")
    fn, allowed = LOSSES[name]
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(
                f"parameter {key}={value!r} is not accepted by loss {name!r}; allowed parameters: {list(allowed)}"
            )
        params[key] = check_unit_interval(key, value)
    return functools.partial(fn, **params) if params else fn
