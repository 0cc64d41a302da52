"""`kdlab sweep CONFIG --grid key=v1,v2 ...`: every combination, each in its own run directory."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab.config import ConfigError, load_config


def grid_runs(grid: list[str]) -> list[list[str]]:
    """`["a=1,2", "b=x"]` -> `[["a=1", "b=x"], ["a=2", "b=x"]]` (every combination, in order)."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2,...")
        key, _, values = item.partition("=")
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",") if v.strip()])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def run_name(overrides: list[str]) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, _, v in (o.partition("=") for o in overrides)]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts)) or "run"


def command(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config shared by every run.")] = None,
    grid: Annotated[list[str], typer.Option("--grid", help="An axis: --grid stage2.regime=offline,online_teacher (repeatable).")] = [],
    set_: Annotated[list[str], typer.Option("--set", help="An override applied to every run (repeatable).")] = [],
    out: Annotated[Path, typer.Option(help="Sweep directory (one subdirectory per run).")] = Path("runs/sweep"),
    report: Annotated[bool, typer.Option(help="Write the sweep's report.html and summary.json at the end.")] = True,
) -> None:
    """Run every combination of the grid; finished runs are skipped, an interrupted one is resumed."""
    from kdlab.pipeline.distill import TrainingDiverged, is_finished, run

    try:
        combos = grid_runs(grid)
        configs = [(combo, load_config(config, list(set_) + combo + [f"output_dir={out / run_name(combo)}",
                                                                  f"cache_dir={out / '.kdlab-cache'}"]))
                   for combo in combos]
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    failed = []
    for i, (combo, cfg) in enumerate(configs, 1):
        run_dir = Path(cfg.output_dir)
        if is_finished(run_dir):
            typer.echo(f"[{i}/{len(configs)}] {run_dir.name}: finished, skipped", err=True)
            continue
        resume = (run_dir / "config.yaml").exists()
        typer.echo(f"[{i}/{len(configs)}] {run_dir.name}{' (resuming)' if resume else ''}", err=True)
        try:
            run(cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
        except (TrainingDiverged, ValueError, RuntimeError) as err:
            typer.echo(f"error in {run_dir.name}: {err}", err=True)
            failed.append(run_dir.name)
    if report:
        from kdlab.cli.run import write_report_safely

        write_report_safely([out])
    if failed:
        typer.echo(f"{len(failed)} run(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
