"""`kdlab detect FILE`: teacher-hacking verdicts for one metrics log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab import record
from kdlab.analysis.detectors import GOLDEN, PROXY_DEVIATION, PROXY_SEQUENTIAL


def _golden_line(col: str, v: dict | None, status: str) -> str:
    if v is None:
        return f"golden ({col}): no golden column, golden detector not run"
    if status == "not tested":
        return f"golden ({col}): not tested — {v['reason']}"
    if v["kind"] in ("none", "proxy_rise"):
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


def _sequential_line(col: str, v: dict) -> str:
    if v["statistic"] is None:
        return f"proxy-only, sequential, EXPERIMENTAL ({col}): not tested — {v['reason']}"
    if v["detected"]:
        lo, hi = v["onset_interval"]
        return (f"proxy-only, sequential, EXPERIMENTAL ({col}, {v['time_axis']} time): DEPARTS from step {v['onset_step']:,} "
                f"(interval {lo:,}–{hi:,}), seen at step {v['alarm_step']:,} — {v['reason']}")
    return f"proxy-only, sequential, EXPERIMENTAL ({col}, {v['time_axis']} time): on its law — {v['reason']}"


def command(
    file: Annotated[Path, typer.Argument(help="Metrics log: kdlab's metrics.jsonl or run directory, a TeacherHackingMonitor output directory or JSONL, a trainer_state.json, TensorBoard event files, any JSONL, or a CSV/TSV table with a step column.")],
    proxy: Annotated[str, typer.Option("--proxy", help="Proxy column (divergence to the teacher); its SE is <COL>_se if present.")] = record.PROXY,
    golden: Annotated[Optional[str], typer.Option("--golden", help=f"Golden column (divergence to the oracle). Default: {record.GOLDEN} when the file has it.")] = None,
    step: Annotated[Optional[str], typer.Option("--step", help=f"Step column. Default: the first of {', '.join(record.STEP_ALIASES)} present.")] = None,
    control: Annotated[list[Path], typer.Option("--control", help="Metrics log of an online control run of the same world (repeatable, one per seed): adds the iso-proxy gap, the golden above the control's at the same proxy.")] = [],
    teacher_golden: Annotated[Optional[float], typer.Option("--teacher-golden", help="The teacher's own golden divergence (default: the file's teacher_golden_fkl column): adds the teacher-floor check.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help=f"Print the verdicts as JSON: {{\"{GOLDEN}\": {{...}} | null, \"{PROXY_DEVIATION}\": {{...}}, \"{PROXY_SEQUENTIAL}\": {{...}}, \"teacher_floor\": ..., \"iso_proxy_gap\": ...}}.")] = False,
) -> None:
    """Detect teacher hacking in a metrics log (JSONL, CSV/TSV, trainer_state.json, TensorBoard).

    Three verdicts: the golden detector in the paper's terms (hacking: golden rises beyond its noise while the held-out proxy falls or stays flat; over-fitting: both rise; needs a golden column), the fixed-window proxy-only detector (the proxy leaves the power law of an early window upwards; needs no oracle) and the experimental sequential proxy-only detector (held-out detection 8 %, false alarms up to 24 %: bench/DETECTION.md; each evaluation tested against the law of the ones before it, in cumulative-learning-rate time when the file has lr_sum, lr or learning_rate). A detector with too few evaluations says "not tested". When the log has the drift panel (eval.drift, or the monitor's drift=True), the named failure-mode alarms too: length inflation, EOS mismatch, entropy collapse, repetition collapse, exposure-gap growth (kdlab.analysis.alarms).

    Attribution of a golden rise: the teacher floor (the student's golden below the teacher's own, from the file's teacher_golden_fkl column or --teacher-golden) and, with --control runs, the iso-proxy gap (the golden above an online control's at the same proxy).

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
        attribution = _attribution(run.metrics, control, teacher_golden, proxy, golden_col, step)
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
        GOLDEN: run.golden.to_dict() if run.golden is not None else None,
        PROXY_DEVIATION: run.proxy.to_dict(),
        PROXY_SEQUENTIAL: run.sequential.to_dict() if run.sequential is not None else None,
        "metric_storage": run.storage,
        "alarms": {name: v.to_dict() for name, v in run.alarms.items()},
        "notes": run.notes,
        **attribution,
    }
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{run.metrics.path}: {len(steps)} evaluations, steps {int(steps[0]):,}–{int(steps[-1]):,}")
    typer.echo(_golden_line(golden_col, result[GOLDEN], result["golden_status"]))
    typer.echo(_proxy_line(proxy, result[PROXY_DEVIATION], result["proxy_status"]))
    if result[PROXY_SEQUENTIAL] is not None:
        typer.echo(_sequential_line(proxy, result[PROXY_SEQUENTIAL]))
    for line in _attribution_lines(result):
        typer.echo(line)
    for name, v in result["alarms"].items():
        typer.echo(f"alarm {name}: {'FIRED' if v['fired'] else 'quiet'} — {v['reason']}")
    for note in run.notes:
        typer.echo(f"note: {note}")


def _attribution(metrics, control: list[Path], teacher_golden: float | None, proxy_col: str, golden_col: str,
                 step_col: str | None) -> dict:
    """The golden-rise attribution (kdlab.analysis.attribution): teacher floor and iso-proxy gap."""
    from kdlab.analysis import MetricsError
    from kdlab.analysis.attribution import Curve, iso_proxy_gap, teacher_floor
    from kdlab.analysis.worlds import teacher_golden_in

    out: dict = {"teacher_floor": None, "iso_proxy_gap": None}
    if metrics.golden is None:
        if control or teacher_golden is not None:
            raise MetricsError(f"{metrics.path}: --control and --teacher-golden need a golden column")
        return out
    t_se = 0.0
    if teacher_golden is None and (given := teacher_golden_in(metrics)) is not None:
        teacher_golden, t_se = given
    if teacher_golden is not None:
        out["teacher_floor"] = teacher_floor(metrics.steps, metrics.golden, metrics.golden_se, teacher_golden,
                                             t_se).to_dict()
    if control:
        def curve(m):
            return Curve.from_arrays(m.steps, m.proxy, m.golden, m.golden_se)

        controls = []
        for path in control:
            m = record.read_metrics(path, proxy_col=proxy_col, golden_col=golden_col, step_col=step_col)
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
