"""`kdlab run CONFIG [--set key=value ...] [--resume]`: one experiment from a YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab import record
from kdlab.config import ConfigError, describe_fields, load_config


def command(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (omit to use the defaults).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a field: --set stage2.regime=online_student (repeatable).")] = [],
    resume: Annotated[bool, typer.Option(help="Continue the run in output_dir from its last checkpoint (the directory must hold a run).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (overrides output_dir).")] = None,
    report: Annotated[bool, typer.Option(help="Write report.html and summary.json at the end.")] = True,
) -> None:
    """Run one experiment: stage 1 (cached), stage 2 under the configured regime, evaluation, report."""
    overrides = list(set_) + ([f"output_dir={out}"] if out else [])
    from kdlab.cli import preflight

    try:
        if out is not None:
            preflight.output_dir(out, "--out")
        cfg = load_config(config, overrides)
        preflight.run_config(cfg)
        if resume:
            preflight.resume(cfg)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    # Imported after validation: a config error is reported before torch and transformers load.
    from kdlab.pipeline.distill import TrainingDiverged, run
    from kdlab.pipeline.rundir import RunDirectoryInUse
    from kdlab.pipeline.distributed import launched_rank

    try:
        run_dir = run(cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
    except (TrainingDiverged, RunDirectoryInUse, ValueError, RuntimeError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    if report and launched_rank() == 0:  # under `accelerate launch`, rank 0 alone writes
        write_report_safely([run_dir])


def write_report_safely(dirs: list[Path]) -> None:
    try:
        from kdlab.report import write_report
    except ImportError:
        typer.echo("(report module not available; skipping report)", err=True)
        return
    path = write_report(dirs)
    typer.echo(f"report: {path}", err=True)
    import json

    summary = json.loads((path.parent / record.SUMMARY).read_text())
    if "verdict" in summary:  # a single run: its detectors' verdict in one line
        typer.echo(f"verdict: {summary['verdict']}", err=True)


def epilog() -> str:
    """Every config field with its default, for the end of --help (after the options). Escaped for
    rich's markup, which would otherwise swallow "[vllm]" as a style tag; one paragraph per field."""
    from rich.markup import escape

    return "\n\n".join(["Config fields (set them in the YAML file or with --set key=value):"]
                        + [escape(line) for line in describe_fields()])
