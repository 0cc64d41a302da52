"""Losses by name, for configs: ``get("generalized_jsd", beta=0.9)``."""

from __future__ import annotations

import functools
from typing import Callable

from kdlab.losses import divergences
from kdlab.losses.divergences import check_unit_interval
from kdlab.losses.names import LOSS_PARAMS

# name -> (function, the parameters it takes; each lies in [0, 1]), from the torch-free table of names.
LOSSES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    name: (getattr(divergences, name), params) for name, params in LOSS_PARAMS.items()
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
