"""`kdlab detect FILE`: teacher-hacking verdicts for one metrics log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab import record


def _golden_line(col: str, v: dict | None, status: str) -> str:
    if v is None:
        return f"golden ({col}): no golden column, golden detector not run"
    if status == "not tested":
        return f"golden ({col}): not tested — {v['reason']}"
    if v["kind"] == "none":
        return f"golden ({col}): no teacher hacking — {v['reason']}"
    head = "TEACHER HACKING" if v["detected"] else v["kind"].upper()
    return f"golden ({col}): {head} from step {v['onset_step']:,} — {v['reason']}"


def _proxy_line(col: str, v: dict, status: str) -> str:
    if status == "not tested":
        return f"proxy-only ({col}): not tested — {v['reason']}"
    fit = v["fit"]
    law = f"early {fit['law']} law α = {fit['alpha']:.3g} fitted on steps {fit['fit_steps'][0]:,}–{fit['fit_steps'][1]:,}"
    if v["detected"]:
        return f"proxy-only ({col}): DEPARTS from step {v['onset_step']:,} — {v['reason']}; {law}"
    return f"proxy-only ({col}): on its law — {v['reason']}; {law}"


def command(
    file: Annotated[Path, typer.Argument(help="Metrics log: kdlab's metrics.jsonl or run directory, a TeacherHackingMonitor output directory or JSONL, a trainer_state.json, TensorBoard event files, any JSONL, or a CSV/TSV table with a step column.")],
    proxy: Annotated[str, typer.Option("--proxy", help="Proxy column (divergence to the teacher); its SE is <COL>_se if present.")] = record.PROXY,
    golden: Annotated[Optional[str], typer.Option("--golden", help=f"Golden column (divergence to the oracle). Default: {record.GOLDEN} when the file has it.")] = None,
    step: Annotated[Optional[str], typer.Option("--step", help=f"Step column. Default: the first of {', '.join(record.STEP_ALIASES)} present.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON: {\"golden\": {...} | null, \"proxy_deviation\": {...}}.")] = False,
) -> None:
    """Detect teacher hacking in a metrics log (JSONL, CSV/TSV, trainer_state.json, TensorBoard).

    Two verdicts: the golden detector (golden has a minimum and then rises beyond its noise while the proxy keeps falling or stays flat; needs a golden column) and the proxy-only detector (the proxy curve leaves its early power law upwards; needs no oracle). A detector with too few evaluations says "not tested".

    The verdicts are computed exactly as `kdlab report` computes them (the same analysis; in a kdlab run directory the golden rise gets the paired SE of its per-prompt values).

    Exit code 0 whatever the verdict; 2 for unreadable or malformed input, with the file and line on stderr.
    """  # one line per paragraph: typer's help keeps a docstring's line breaks
    from kdlab.analysis import MetricsError
    from kdlab.analysis.runs import analyse, golden_status, proxy_status

    golden_col = golden or record.GOLDEN
    try:
        run = analyse(file, proxy_col=proxy, golden_col=golden_col, step_col=step)
        if golden is not None and run.metrics.golden is None:
            raise MetricsError(f"{run.metrics.path}: no values in the golden column '{golden}'")
    except (MetricsError, ValueError, FileNotFoundError) as err:
        typer.echo(f"kdlab detect: {err}", err=True)
        raise typer.Exit(2) from None

    steps = run.metrics.steps
    result = {
        "file": str(run.metrics.path),
        "source": run.metrics.source,
        "n_evals": len(steps),
        "steps": [int(steps[0]), int(steps[-1])],
        "step_col": run.metrics.step_col,
        "proxy_col": proxy,
        "golden_col": golden_col if run.golden is not None else None,
        "golden_status": golden_status(run.golden),
        "proxy_status": proxy_status(run.proxy),
        "verdict": run.verdict_text(),
        "golden": run.golden.to_dict() if run.golden is not None else None,
        "proxy_deviation": run.proxy.to_dict(),
    }
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{run.metrics.path}: {len(steps)} evaluations, steps {int(steps[0]):,}–{int(steps[-1]):,}")
    typer.echo(_golden_line(golden_col, result["golden"], result["golden_status"]))
    typer.echo(_proxy_line(proxy, result["proxy_deviation"], result["proxy_status"]))
