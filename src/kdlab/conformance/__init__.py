"""kdlab.conformance: check anyone's token-level distillation loss against kdlab's float64 references.

    from kdlab.conformance import check
    report = check("trl.experimental.gkd:GKDTrainer.generalized_jsd_loss", family="gjsd", param=0.5)
    print(table(report)); report.exit_code      # 0: every case passed; 1: a case failed

- ``reference.py``: the families (`FAMILIES`) and their float64 formulas with explicit probabilities;
- ``adapters.py``: loading ``MODULE:FUNCTION`` and the calling conventions (kdlab, TRL, torchtune);
- ``suite.py``: the cases (`CASES`), each a pure function returning PASS / FAIL / INFO / SKIP and a reason.

`kdlab conformance` (kdlab.cli.conformance) is the command-line face of :func:`check`.
"""

from __future__ import annotations

import inspect

from kdlab.conformance.adapters import ADAPTERS, ConformanceInputError, guess_family, load_loss, make_adapter
from kdlab.conformance.reference import FAMILIES
from kdlab.conformance.suite import CASES, FAIL, INFO, PASS, SKIP, CaseResult, Report, run_suite, table

__all__ = ["ADAPTERS", "CASES", "FAIL", "FAMILIES", "INFO", "PASS", "SKIP", "CaseResult", "ConformanceInputError",
           "Report", "check", "guess_family", "load_loss", "make_adapter", "run_suite", "table"]


def check(target, family: str | None = None, param: float | None = None, *, adapter: str | None = None,
          temperature_arg: str | None = None, topk: int | None = None, claims_exact: bool = False,
          tolerance: float | None = None) -> Report:
    """Run the suite on ``target``: a ``"MODULE:FUNCTION"`` string or a callable. ``family`` None: guessed
    from the name (``ReverseKLLoss`` -> rkl); ``adapter`` None: from the signature. Raises
    ConformanceInputError for a target that cannot be loaded, classified or called."""
    if isinstance(target, str):
        fn, label = load_loss(target)
    else:
        label = getattr(target, "__qualname__", type(target).__name__)
        fn = target() if inspect.isclass(target) else target  # a loss class (torchtune's) is built with no arguments
    if family is None:
        family = guess_family(label)
        if family is None:
            raise ConformanceInputError(f"cannot tell the family from the name {label!r}; give --family "
                                        f"{'|'.join(FAMILIES)}")
    if family not in FAMILIES:
        raise ConformanceInputError(f"family={family!r}; allowed: {'|'.join(FAMILIES)}")
    made = make_adapter(fn, adapter, FAMILIES[family].param, temperature_arg, topk)
    return run_suite(made, family, param, target=label, topk=topk, claims_exact=claims_exact, tolerance=tolerance)
