"""`kdlab report DIR...`: summary.json, runs.csv, evals.csv and a self-contained report.html for runs or sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab import record


def command(
    dirs: Annotated[list[Path], typer.Argument(help="Run directories (kdlab's, with metrics.jsonl, or a TeacherHackingMonitor / Trainer output directory) and/or sweep directories (runs below them).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory. Default: the single directory given (required for several).")] = None,
    proxy: Annotated[str, typer.Option("--proxy", help="Proxy column.")] = record.PROXY,
    golden: Annotated[str, typer.Option("--golden", help="Golden column (ignored where absent).")] = record.GOLDEN,
) -> None:
    """Write summary.json, runs.csv, evals.csv and report.html for run or sweep directories.

    runs.csv has one row of verdicts per run (nested fields as dotted columns: golden.rise, proxy_deviation.onset_step), evals.csv every evaluation of every run with run, path and condition columns: both load with pandas.read_csv. The report shows proxy and golden against the step (log-log) with the fitted early law and the detected onsets, golden against proxy, the training loss, a verdict table per run and per condition (seeds aggregated) and each run's config. PNG figures go to plots/ and are embedded in the HTML.

    Exit code 0 on success, 2 for bad input (message on stderr).
    """  # one line per paragraph: typer's help keeps a docstring's line breaks
    import json

    from kdlab.analysis import MetricsError
    from kdlab.report import write_report

    from kdlab.cli import preflight
    from kdlab.config import ConfigError

    try:
        target = out if out is not None else (dirs[0] if len(dirs) == 1 else None)
        if target is not None:  # several directories without --out: write_report says so
            preflight.output_dir(target, "--out" if out is not None else "the report's directory (the run itself)")
        report = write_report(dirs, out, proxy_col=proxy, golden_col=golden)
    except (MetricsError, ValueError, FileNotFoundError, ConfigError) as err:
        typer.echo(f"kdlab report: {err}", err=True)
        raise typer.Exit(2) from None
    except OSError as err:  # a write refused or failed half-way: the previous report files are intact
        typer.echo(f"kdlab report: could not write the report ({err.strerror}: {err.filename}); the previous "
                   "report, if any, is unchanged. Choose another --out or free the disk.", err=True)
        raise typer.Exit(1) from None
    summary = json.loads((report.parent / record.SUMMARY).read_text(encoding="utf-8"))
    for condition in summary.get("conditions", []):
        typer.echo(f"{condition['condition']}: {condition['verdict']}")
    if "conditions" not in summary:
        typer.echo(f"{summary['run']}: {summary['verdict']}")
    typer.echo(f"wrote {report}")
