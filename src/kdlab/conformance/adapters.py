"""How the suite calls a user's loss: one adapter per calling convention.

Every adapter turns ``(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT)`` into the loss's own call
and returns the scalar the loss returns, untouched: the suite measures the loss's normalisation itself
(suite.py, case ``normalisation``) rather than trusting a name like "batchmean". What an adapter fills in
(labels, the default reduction, the parameter and temperature names) goes into ``assumptions``, and the
report prints it.

- ``kdlab``: kdlab's contract, ``loss(student_logits_BxTxV, teacher, mask_BxT, *, reduction="mean",
  temperature=τ, **params)`` (DESIGN.md, "Losses (contract)"); with ``--topk K`` the teacher is a
  :class:`~kdlab.losses.sparse.SparseTarget` of its top-K log-probs.
- ``trl``: ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
  temperature=1.0, reduction="batchmean")``; the mask becomes labels with -100 at masked positions.
- ``torchtune``: ``loss(student_logits, teacher_logits, labels)`` on flattened ``(B·T, V)`` logits, as
  torchtune's KD recipes call ``torchtune.modules.loss.ForwardKLLoss`` (a class is instantiated with no
  arguments); no temperature argument.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label that marks a masked position for TRL and torchtune
ADAPTERS = ("kdlab", "trl", "torchtune")


class ConformanceInputError(ValueError):
    """The loss cannot be loaded or called as the adapter calls it (the CLI's exit code 2)."""


def load_loss(spec: str) -> tuple[Callable, str]:
    """``MODULE:ATTR[.ATTR...]`` (or ``path/to/file.py:ATTR``) -> (the callable, its display name).

    A class is instantiated with no arguments (torchtune's losses are ``nn.Module`` classes); a static
    method reached through its class (``trl.experimental.gkd:GKDTrainer.generalized_jsd_loss``) is the
    plain function.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConformanceInputError(f"target {spec!r} is not MODULE:FUNCTION (e.g. kdlab.losses:forward_kl)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConformanceInputError(f"no file {module_name}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module  # dataclasses and pickling look the module up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConformanceInputError:
        raise
    except Exception as err:  # an ImportError, or anything the module raises while importing
        raise ConformanceInputError(f"cannot import {module_name}: {type(err).__name__}: {err}") from None
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConformanceInputError(f"{module_name} has no attribute {attr_path!r} ({part!r} is missing)")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:
            raise ConformanceInputError(f"cannot instantiate {spec} with no arguments: {type(err).__name__}: {err}") from None
    if not callable(obj):
        raise ConformanceInputError(f"{spec} is a {type(obj).__name__}, not a callable")
    return obj, spec


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """The call's parameters (an nn.Module's forward's, without self); {} when Python cannot tell."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}


def _accepts(params: dict[str, inspect.Parameter], name: str) -> bool:
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def detect_adapter(fn: Callable) -> str:
    """The adapter a signature implies: ``labels`` with ``beta`` -> trl, ``labels`` -> torchtune, a third
    parameter named like a mask, or ``reduction`` and ``temperature`` -> kdlab."""
    params = parameters(fn)
    names = list(params)
    if "labels" in names:
        return "trl" if "beta" in names else "torchtune"
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if (len(positional) >= 3 and "mask" in positional[2].lower()) or {"reduction", "temperature"} <= set(names):
        return "kdlab"
    shown = ", ".join(names) if names else "unknown"
    raise ConformanceInputError(f"cannot tell the calling convention from the signature ({shown}); "
                                f"give --adapter {'|'.join(ADAPTERS)}")


class Adapter:
    """Calls a loss as the suite needs it. ``param`` (β or α) and ``temperature`` are passed only when the
    loss takes them (``takes_param`` / ``takes_temperature``); None means "leave the loss's default"."""

    name = ""

    def __init__(self, fn: Callable, param_name: str | None, temperature_arg: str | None, topk: int | None):
        self.fn = fn
        self.params = parameters(fn)
        self.param_name = param_name
        self.takes_param = param_name is not None and _accepts(self.params, param_name)
        if temperature_arg is None and "temperature" in self.params:
            temperature_arg = "temperature"
        self.temperature_arg = temperature_arg if temperature_arg and _accepts(self.params, temperature_arg) else None
        self.takes_temperature = self.temperature_arg is not None
        self.topk = topk
        self.assumptions: list[str] = []
        if temperature_arg and not self.takes_temperature:
            raise ConformanceInputError(f"--temperature-arg {temperature_arg}: the loss takes no argument of that name")
        if self.takes_temperature:
            self.assumptions.append(f"the distillation temperature is the argument {self.temperature_arg!r}")
        else:
            self.assumptions.append("no temperature argument: the temperature case is skipped")
        if param_name is not None and not self.takes_param:
            self.assumptions.append(f"the loss takes no {param_name!r}: its fixed value is taken to be the one given")

    def keywords(self, temperature: float | None, param: float | None) -> dict:
        kw = {}
        if self.takes_temperature and temperature is not None:
            kw[self.temperature_arg] = temperature
        if self.takes_param and param is not None:
            kw[self.param_name] = param
        return kw

    def __call__(self, student_BxTxV: Tensor, teacher_BxTxV: Tensor, mask_BxT: Tensor, *,
                 temperature: float | None = None, param: float | None = None) -> Tensor:
        raise NotImplementedError


def labels_from_mask(teacher_BxTxV: Tensor, mask_BxT: Tensor) -> Tensor:
    """-100 at masked positions, the teacher's most likely token elsewhere (a plausible "true" label:
    TRL's JSD reads only the -100s; a loss that adds a cross-entropy term reads the tokens too)."""
    labels = teacher_BxTxV.argmax(dim=-1)
    return labels.masked_fill(~mask_BxT, IGNORE_INDEX)


class KdlabAdapter(Adapter):
    name = "kdlab"

    def __init__(self, fn, param_name, temperature_arg, topk):
        super().__init__(fn, param_name, temperature_arg, topk)
        self.pass_reduction = _accepts(self.params, "reduction")
        call = "loss(student_logits, teacher, mask" + (", reduction='mean'" if self.pass_reduction else "")
        self.assumptions.insert(0, f"called as {call}, ...); 'mean' read as the mean over the batch's counted tokens")
        if topk:
            self.assumptions.append(f"teacher = SparseTarget of its top-{topk} log-probs at the temperature in use "
                                    "(kdlab.losses.sparse): the loss is a top-k approximation")

    def __call__(self, student_BxTxV, teacher_BxTxV, mask_BxT, *, temperature=None, param=None):
        teacher = teacher_BxTxV
        if self.topk:
            from kdlab.losses.sparse import SparseTarget

            teacher = SparseTarget.from_logits(teacher_BxTxV, self.topk, temperature=temperature or 1.0)
        kw = self.keywords(temperature, param)
        if self.pass_reduction:
            kw["reduction"] = "mean"
        return self.fn(student_BxTxV, teacher, mask_BxT, **kw)


class TrlAdapter(Adapter):
    name = "trl"

    def __init__(self, fn, param_name, temperature_arg, topk):
        super().__init__(fn, param_name, temperature_arg, topk)
        reduction = self.params.get("reduction")
        default = reduction.default if reduction is not None else "none given"
        self.assumptions.insert(0, "called as loss(student_logits, teacher_logits, labels=labels, beta=β, "
                                   f"temperature=τ); labels = {IGNORE_INDEX} at masked positions, the teacher's "
                                   "argmax token elsewhere; num_items_in_batch not passed; "
                                   f"reduction left at its default ({default!r})")

    def __call__(self, student_BxTxV, teacher_BxTxV, mask_BxT, *, temperature=None, param=None):
        labels = labels_from_mask(teacher_BxTxV, mask_BxT)
        return self.fn(student_BxTxV, teacher_BxTxV, labels=labels, **self.keywords(temperature, param))


class TorchtuneAdapter(Adapter):
    name = "torchtune"

    def __init__(self, fn, param_name, temperature_arg, topk):
        super().__init__(fn, param_name, temperature_arg, topk)
        self.assumptions.insert(0, "called as loss(student_logits (B·T, V), teacher_logits (B·T, V), labels (B·T)) "
                                   f"as torchtune's KD recipe does; labels = {IGNORE_INDEX} at masked positions; "
                                   "normalisation left at its default")

    def __call__(self, student_BxTxV, teacher_BxTxV, mask_BxT, *, temperature=None, param=None):
        V = student_BxTxV.shape[-1]
        labels = labels_from_mask(teacher_BxTxV, mask_BxT).reshape(-1)
        return self.fn(student_BxTxV.reshape(-1, V), teacher_BxTxV.reshape(-1, V), labels,
                       **self.keywords(temperature, param))


ADAPTER_CLASSES = {cls.name: cls for cls in (KdlabAdapter, TrlAdapter, TorchtuneAdapter)}
assert tuple(ADAPTER_CLASSES) == ADAPTERS


def make_adapter(fn: Callable, adapter: str | None, param_name: str | None, temperature_arg: str | None = None,
                 topk: int | None = None) -> Adapter:
    """The adapter called ``adapter`` (None: from the signature, :func:`detect_adapter`)."""
    detected = adapter is None
    name = detect_adapter(fn) if detected else adapter
    if name not in ADAPTER_CLASSES:
        raise ConformanceInputError(f"adapter={name!r}; allowed: {'|'.join(ADAPTERS)}")
    made = ADAPTER_CLASSES[name](fn, param_name, temperature_arg, topk)
    if detected:
        made.assumptions.insert(0, f"adapter {name!r} chosen from the signature ({', '.join(made.params)})")
    return made


# Words in a loss's name that imply its family, tried in order (the first match wins).
_FAMILY_WORDS = (("skew_reverse", "skew_rkl"), ("skewreverse", "skew_rkl"), ("skew", "skew_kl"), ("jsd", "gjsd"),
                 ("jensen", "gjsd"), ("reverse", "rkl"), ("rkl", "rkl"), ("tvd", "tvd"), ("total_variation", "tvd"),
                 ("forward", "fkl"), ("fkl", "fkl"))


def guess_family(spec: str) -> str | None:
    """The family a target's name implies (``...:ReverseKLLoss`` -> rkl), or None."""
    name = spec.rpartition(":")[2].rpartition(".")[2].lower()
    return next((family for word, family in _FAMILY_WORDS if word in name), None)
