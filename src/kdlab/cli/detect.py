"""`kdlab detect FILE`: teacher-hacking verdicts for one metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def _golden_line(col: str, v: dict | None) -> str:
    if v is None:
        return f"golden ({col}): no golden column, golden detector not run"
    if v["kind"] == "none":
        return f"golden ({col}): no teacher hacking — {v['reason']}"
    head = "TEACHER HACKING" if v["detected"] else v["kind"].upper()
    return f"golden ({col}): {head} from step {v['onset_step']:,} — {v['reason']}"


def _proxy_line(col: str, v: dict) -> str:
    if v["fit"] is None:
        return f"proxy-only ({col}): not tested — {v['reason']}"
    fit = v["fit"]
    law = f"early {fit['law']} law α = {fit['alpha']:.3g} fitted on steps {fit['fit_steps'][0]:,}–{fit['fit_steps'][1]:,}"
    if v["detected"]:
        return f"proxy-only ({col}): DEPARTS from step {v['onset_step']:,} — {v['reason']}; {law}"
    return f"proxy-only ({col}): on its law — {v['reason']}; {law}"


def command(
    file: Annotated[Path, typer.Argument(help="Metrics file: kdlab's metrics.jsonl, any JSONL, or a CSV with a 'step' column.")],
    proxy: Annotated[str, typer.Option("--proxy", help="Proxy column (divergence to the teacher); its SE is <COL>_se if present.")] = "proxy_fkl",
    golden: Annotated[Optional[str], typer.Option("--golden", help="Golden column (divergence to the oracle). Default: golden_fkl when the file has it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON: {\"golden\": {...} | null, \"proxy_deviation\": {...}}.")] = False,
) -> None:
    """Detect teacher hacking in a metrics file (JSONL or CSV).

    Two verdicts: the golden detector (golden has a minimum and then rises beyond its noise while the proxy keeps falling or stays flat; needs a golden column) and the proxy-only detector (the proxy curve leaves its early power law upwards; needs no oracle).

    Exit code 0 whatever the verdict; 2 for unreadable or malformed input, with the file and line on stderr.
    """  # one line per paragraph: typer's help keeps a docstring's line breaks
    from kdlab.analysis import MetricsError, detect_golden, detect_proxy_deviation, load_metrics

    golden_col = golden or "golden_fkl"
    try:
        metrics = load_metrics(file, proxy_col=proxy, golden_col=golden_col)
        if golden is not None and metrics.golden is None:
            raise MetricsError(f"{file}: no values in the golden column '{golden}'")
        steps = metrics.steps
        golden_verdict = None
        if metrics.golden is not None:
            golden_verdict = detect_golden(steps, metrics.golden, metrics.golden_se, metrics.proxy, metrics.proxy_se)
        proxy_verdict = detect_proxy_deviation(steps, metrics.proxy, metrics.proxy_se)
    except (MetricsError, ValueError) as err:
        typer.echo(f"kdlab detect: {err}", err=True)
        raise typer.Exit(2) from None

    result = {
        "file": str(file),
        "n_evals": len(steps),
        "steps": [int(steps[0]), int(steps[-1])],
        "proxy_col": proxy,
        "golden_col": golden_col if golden_verdict is not None else None,
        "golden": golden_verdict.to_dict() if golden_verdict is not None else None,
        "proxy_deviation": proxy_verdict.to_dict(),
    }
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{file}: {len(steps)} evaluations, steps {int(steps[0]):,}–{int(steps[-1]):,}")
    typer.echo(_golden_line(golden_col, result["golden"]))
    typer.echo(_proxy_line(proxy, result["proxy_deviation"]))
