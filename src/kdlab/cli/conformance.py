"""`kdlab conformance MODULE:FUNCTION`: check a token-level distillation loss against kdlab's float64 references."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from kdlab.conformance.adapters import ADAPTERS
from kdlab.conformance.reference import FAMILIES


def command(
    target: Annotated[str, typer.Argument(help="The loss: MODULE:FUNCTION, e.g. kdlab.losses:forward_kl, trl.experimental.gkd:GKDTrainer.generalized_jsd_loss, torchtune.modules.loss:ForwardKLLoss (a class is instantiated with no arguments), or path/to/file.py:FUNCTION.")],
    family: Annotated[Optional[str], typer.Option("--family", help=f"The divergence it claims to compute: {'|'.join(FAMILIES)}. Default: guessed from the name (forward, reverse, jsd, tvd, skew).")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="β of gjsd in GKD's convention (M = β·P_teacher + (1−β)·Q_student; β=0 forward KL, β=1 reverse KL; TRL's since PR #3043). Default 0.5.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="α of skew_kl / skew_rkl. Default 0.1.")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help=f"Calling convention: {'|'.join(ADAPTERS)}. Default: from the signature (labels and beta: trl; labels: torchtune; a mask or reduction and temperature: kdlab).")] = None,
    temperature_arg: Annotated[Optional[str], typer.Option("--temperature-arg", help="Name of the loss's distillation-temperature argument. Default: 'temperature' when the loss has one; without one the temperature case is skipped.")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", help="The loss is a top-K approximation (the kdlab adapter passes a SparseTarget of the teacher's top-K log-probs): its value and gradient biases are reported (INFO), not failed.")] = None,
    claims_exact: Annotated[bool, typer.Option("--claims-exact", help="With --topk: the loss claims to equal the full-vocabulary divergence, so a bias fails.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON: target, adapter, family, param, dtype, tolerance, assumptions, cases [{name, status, reason, numbers}], counts, exit_code.")] = False,
) -> None:
    """Check a token-level distillation loss against kdlab's float64 references and properties.

    One row per case with PASS, FAIL, INFO (reported, not a failure) or SKIP and a one-line reason: the normalisation (measured: mean over tokens, per sequence, per batch, ...), the value, zero and zero gradient at student == teacher, GJSD's endpoints and mixture, masking and an all-masked batch, gradient accumulation and data-parallel ranks with unequal tokens, temperature, ±1e4 and −inf logits, the gradient, a no-op gradient, the expected gradient of a loss that samples, the bias of a top-k target. Cases that re-create public bugs cite them (TRL #2202, PR #3043, #4719, PR #5731; Liger #769; ms-swift #10078, #10079, PR #10165; miles #2362; Atropos #456).

    Inputs are tiny (B=3, T=5, V=7) and float64 unless the loss refuses it; tolerance 1e-9 for a float64 result, 2e-5 for float32. What the adapter filled in (labels, defaults) is printed as "assumed".

    Exit code 0 when no case fails, 1 when one does, 2 when the loss cannot be imported or called (wrong signature), with one line on stderr.
    """  # one line per paragraph: typer's help keeps a docstring's line breaks
    from kdlab.conformance import ConformanceInputError, check, table

    if beta is not None and alpha is not None:
        typer.echo("kdlab conformance: give --beta (gjsd) or --alpha (skew_kl, skew_rkl), not both", err=True)
        raise typer.Exit(2)
    if topk is not None and topk < 1:
        typer.echo(f"kdlab conformance: --topk {topk}; allowed: an integer >= 1", err=True)
        raise typer.Exit(2)
    if claims_exact and topk is None:
        typer.echo("kdlab conformance: --claims-exact needs --topk", err=True)
        raise typer.Exit(2)
    param = beta if beta is not None else alpha
    try:
        report = check(target, family, param, adapter=adapter, temperature_arg=temperature_arg, topk=topk,
                       claims_exact=claims_exact)
    except ConformanceInputError as err:
        typer.echo(f"kdlab conformance: {err}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        typer.echo(table(report))
    raise typer.Exit(report.exit_code)
