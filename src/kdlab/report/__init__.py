"""kdlab.report: summary.json, CSV tables, PNG figures and a self-contained report.html for runs and sweeps.

Reads run directories only (metrics.jsonl, config.yaml) through `kdlab.analysis`; never imports
training code, so a report can be written on a laptop from directories copied off a cluster.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kdlab import record
from kdlab.analysis.runs import analyse, sweep_summary
from kdlab.record import find_runs, is_run_dir

__all__ = ["write_report"]

_atomic_write = record.write_text  # temp file + rename, ordinary file modes (kdlab.record)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _plot_names(runs) -> dict[str, str]:
    """A unique, readable file stem per run: its name, or its path below the common root when two
    runs (e.g. seed0 of two sweeps) share a name."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return {str(r.path): _slug(r.name) for r in runs}
    root = Path(os.path.commonpath([str(r.path) for r in runs]))
    return {str(r.path): _slug("__".join(r.path.relative_to(root).parts) or r.name) for r in runs}


def write_report(dirs, out_dir: str | Path | None = None, *, proxy_col: str = record.PROXY,
                 golden_col: str = record.GOLDEN, golden_config=None, proxy_config=None,
                 findings: list | None = None) -> Path:
    """Analyse run or sweep directories and write `summary.json`, `report.html`, `plots/*.png`, per panel
    PDF and SVG files at a paper's column width (`plots/<run>/` for a single run, `plots/sweep/` for
    several), and two CSV tables (`kdlab.report.flat`): `runs.csv` (one flat row of verdicts per run) and
    `evals.csv` (every evaluation of every run).

    dirs: one path or a list; each a run directory (has metrics.jsonl) or a sweep directory (run
        directories below it).
    out_dir: where to write. None: into the single directory given (a run directory gets its own
        report; a sweep directory gets the sweep's, and each of its runs a `summary.json`). With
        several directories `out_dir` is required.
    summary.json holds one run's verdicts when a single run directory is reported, otherwise the
    sweep summary (`kdlab.analysis.analyse_sweep`'s format). Returns the path of report.html.
    findings: the paper's findings checked on these runs (`kdlab.analysis.findings.Finding`, as
        `kdlab demo` computes them): shown at the top of the page and kept in summary.json.
    Raises FileNotFoundError / MetricsError (a ValueError) on bad input.
    """
    from kdlab.report import flat, html, plots

    dirs = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("no directories to report")
    if out_dir is None and len(dirs) > 1:
        raise ValueError("several directories given: pass out_dir (--out) to say where the report goes")
    in_place = out_dir is None
    out = Path(out_dir) if out_dir is not None else dirs[0]
    single_run = len(dirs) == 1 and is_run_dir(dirs[0])
    kwargs = dict(proxy_col=proxy_col, golden_col=golden_col, golden_config=golden_config, proxy_config=proxy_config)
    runs = [analyse(d, **kwargs) for d in find_runs(dirs)]
    summary = sweep_summary(runs, golden_config, proxy_config)

    if findings is not None:
        summary["findings"] = [f.to_dict() for f in findings]
    attribution = _attribution(runs)
    if attribution is not None:
        summary["attribution"] = attribution

    plot_dir = out / record.PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    stems = _plot_names(runs)
    run_plots = {str(r.path): plots.plot_run(r, plot_dir / f"{stems[str(r.path)]}.png") for r in runs}
    # One PDF and one SVG per panel, at a paper's column width: a run's panels when one run is
    # reported, the comparisons of the conditions otherwise (a run's panels of a sweep are one call
    # away: plots.save_run_panels(analyse(run_dir), out_dir); drawing them all would double the time).
    if len(runs) == 1:
        plots.save_run_panels(runs[0], plot_dir / stems[str(runs[0].path)])
    sweep_plot = None
    if len(runs) > 1:
        groups = {label: members for label, members in _groups(runs).items()}
        sweep_plot = plots.plot_sweep(groups, plot_dir / "sweep_conditions.png")
        plots.save_sweep_panels(groups, plot_dir / "sweep")
    record.normalise_modes(plot_dir)  # matplotlib writes ordinary modes already; the folders too

    if single_run:
        run_summary = runs[0].summary()
        run_summary["thresholds"] = summary["thresholds"]
        if "findings" in summary:
            run_summary["findings"] = summary["findings"]
        if attribution is not None:
            run_summary["attribution"] = attribution
        _atomic_write(out / record.SUMMARY, json.dumps(run_summary, indent=2))
        title = f"kdlab report — {runs[0].name}"
    else:
        _atomic_write(out / record.SUMMARY, json.dumps(summary, indent=2))
        title = f"kdlab report — {dirs[0].name if len(dirs) == 1 else f'{len(runs)} runs'}"
        if in_place:
            for run, run_summary in zip(runs, summary["runs"]):
                _atomic_write(run.path / record.SUMMARY, json.dumps(dict(run_summary, thresholds=summary["thresholds"]), indent=2))
    _atomic_write(out / record.RUNS_CSV, flat.runs_table([run_summary] if single_run else summary["runs"], out))
    _atomic_write(out / record.EVALS_CSV, flat.evals_table(runs, out))
    page = html.render(summary, runs, run_plots, sweep_plot, title, findings=summary.get("findings"),
                       attribution=attribution)
    report = out / record.REPORT
    _atomic_write(report, page)
    return report


def _groups(runs):
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.condition, []).append(r)
    return groups


def _attribution(runs) -> dict | None:
    """The golden-rise attribution of runs of one world (kdlab.analysis.worlds.assess_runs): the
    teacher floor of every run whose metrics carry the teacher's golden, and, when an online_teacher
    condition is among them, each condition's iso-proxy gap against it. None when there is no golden
    metric, no teacher golden, or the runs come from several worlds (several teacher goldens)."""
    import numpy as np

    from kdlab.analysis.worlds import assess_runs

    with_golden = [r for r in runs if r.golden is not None and r.metrics.has(record.TEACHER_GOLDEN)]
    if not with_golden:
        return None
    teachers = {round(float(np.nanmax(r.metrics.column(record.TEACHER_GOLDEN))), 9) for r in with_golden}
    if len(teachers) > 1:
        return None
    return assess_runs(with_golden).to_dict()
