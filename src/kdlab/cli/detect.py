"""`kdlab detect FILE`: teacher-hacking verdicts for one metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typing import Annotated, Optional

import typer


def _golden_line(col: str, v: dict | None) -> str:
    if v is None:
        return f"golden ({col}): no golden column, golden detector not run"
    if v["kind"] in ("none", "proxy_rise"):
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


def _sequential_line(col: str, v: dict) -> str:
    if v["detected"]:
        lo, hi = v["onset_interval"]
        return (f"proxy-only, sequential, EXPERIMENTAL ({col}, {v['time_axis']} time): DEPARTS from step {v['onset_step']:,} "
                f"(interval {lo:,}–{hi:,}), seen at step {v['alarm_step']:,} — {v['reason']}")
    return f"proxy-only, sequential, EXPERIMENTAL ({col}, {v['time_axis']} time): on its law — {v['reason']}"


def command(
    file: Annotated[Path, typer.Argument(help="Metrics file: kdlab's metrics.jsonl, any JSONL, or a CSV with a 'step' column.")],
    proxy: Annotated[str, typer.Option("--proxy", help="Proxy column (divergence to the teacher); its SE is <COL>_se if present.")] = "proxy_fkl",
    golden: Annotated[Optional[str], typer.Option("--golden", help="Golden column (divergence to the oracle). Default: golden_fkl when the file has it.")] = None,
    control: Annotated[list[Path], typer.Option("--control", help="Metrics file of an online control run of the same world (repeatable, one per seed): adds the iso-proxy gap, the golden above the control's at the same proxy.")] = [],
    teacher_golden: Annotated[Optional[float], typer.Option("--teacher-golden", help="The teacher's own golden divergence (default: the file's teacher_golden_fkl column): adds the teacher-floor check.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON: {\"golden\": {...} | null, \"proxy_deviation\": {...}, \"proxy_sequential\": {...}}.")] = False,
) -> None:
    """Detect teacher hacking in a metrics file (JSONL or CSV).

    Three verdicts: the golden detector in the paper's terms (hacking: golden rises beyond its noise while the held-out proxy falls or stays flat; over-fitting: both rise; needs a golden column), the fixed-window proxy-only detector (the proxy leaves the power law of an early window upwards) and the experimental sequential proxy-only detector (held-out detection 8 %, false alarms up to 24 %: bench/DETECTION.md; each evaluation tested against the law of the ones before it, in cumulative-learning-rate time when the file has lr_sum, lr or learning_rate; needs no oracle).

    Exit code 0 whatever the verdict; 2 for unreadable or malformed input, with the file and line on stderr.
    """  # one line per paragraph: typer's help keeps a docstring's line breaks
    from kdlab.analysis import MetricsError, detect_golden, detect_proxy_deviation, load_metrics
    from kdlab.analysis.sequential import detect_proxy_sequential, lr_columns

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
        sequential = detect_proxy_sequential(steps, metrics.proxy, metrics.proxy_se, **lr_columns(metrics))
        attribution = _attribution(metrics, control, teacher_golden, proxy, golden_col)
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
        "proxy_sequential": sequential.to_dict(),
        **attribution,
    }
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{file}: {len(steps)} evaluations, steps {int(steps[0]):,}–{int(steps[-1]):,}")
    typer.echo(_golden_line(golden_col, result["golden"]))
    typer.echo(_proxy_line(proxy, result["proxy_deviation"]))
    typer.echo(_sequential_line(proxy, result["proxy_sequential"]))
    for line in _attribution_lines(result):
        typer.echo(line)


def _attribution(metrics, control: list[Path], teacher_golden: float | None, proxy_col: str, golden_col: str) -> dict:
    """The golden-rise attribution (kdlab.analysis.attribution): teacher floor and iso-proxy gap."""
    from kdlab.analysis import MetricsError, load_metrics
    from kdlab.analysis.attribution import Curve, iso_proxy_gap, teacher_floor

    out: dict = {"teacher_floor": None, "iso_proxy_gap": None}
    if metrics.golden is None:
        if control or teacher_golden is not None:
            raise MetricsError(f"{metrics.path}: --control and --teacher-golden need a golden column")
        return out
    t_se = 0.0
    if teacher_golden is None and metrics.has("teacher_golden_fkl"):
        values = metrics.column("teacher_golden_fkl")
        teacher_golden = float(values[np.isfinite(values)][-1])
        if metrics.has("teacher_golden_fkl_se"):
            ses = metrics.column("teacher_golden_fkl_se")
            t_se = float(ses[np.isfinite(ses)][-1])
    if teacher_golden is not None:
        out["teacher_floor"] = teacher_floor(metrics.steps, metrics.golden, metrics.golden_se, teacher_golden,
                                             t_se).to_dict()
    if control:
        def curve(m):
            return Curve.from_arrays(m.steps, m.proxy, m.golden, m.golden_se)

        controls = []
        for path in control:
            m = load_metrics(path, proxy_col=proxy_col, golden_col=golden_col)
            if m.golden is None:
                raise MetricsError(f"{path}: the control has no golden column '{golden_col}'")
            controls.append(curve(m))
        out["iso_proxy_gap"] = iso_proxy_gap([curve(metrics)], controls).to_dict()
    return out


def _attribution_lines(result: dict) -> list[str]:
    from kdlab.analysis.attribution import IsoProxyGap, TeacherFloor

    lines = []
    if result.get("teacher_floor"):
        lines.append("attribution, teacher floor: " + TeacherFloor(**result["teacher_floor"]).text())
    if result.get("iso_proxy_gap"):
        lines.append("attribution, data regime: " + IsoProxyGap(**result["iso_proxy_gap"]).text())
    return lines
