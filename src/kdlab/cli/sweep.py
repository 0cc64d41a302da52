"""`kdlab sweep CONFIG --grid key=v1,v2 ...`: every combination, each in its own run directory."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdlab import record
from kdlab.config import ConfigError, RunConfig, load_config


def grid_runs(grid: list[str]) -> list[list[str]]:
    """`["a=1,2", "b=x"]` -> `[["a=1", "b=x"], ["a=2", "b=x"]]` (every combination, in order)."""
    axes, keys = [], set()
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2,...")
        key, _, values = item.partition("=")
        key = key.strip()
        axis = [f"{key}={v.strip()}" for v in values.split(",") if v.strip()]
        if not key or not axis:
            raise ConfigError(f"--grid {item!r} has no {'key' if not key else 'values'}: give key=v1,v2,...")
        if key in keys:
            raise ConfigError(f"--grid names {key!r} on two axes: give all its values on one axis ({key}=v1,v2,...)")
        keys.add(key)
        axes.append(axis)
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def run_name(overrides: list[str]) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, _, v in (o.partition("=") for o in overrides)]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts)) or "run"


def sweep_configs(config: Path | None, grid: list[str], set_: list[str], out: Path) -> list[tuple[list[str], RunConfig]]:
    """(overrides, config) of every run of the grid. Refuses an empty grid (a sweep of one run is
    `kdlab run`). The stage-1 cache is the config's `cache_dir` when it names one, else
    `<parent of --out>/.kdlab-cache`: the cache `kdlab run --out <same parent>/x` uses, so sweeps
    side by side (runs/sweep-a, runs/sweep-b) and single runs in runs/ build each world once."""
    if not grid:
        raise ConfigError("kdlab sweep needs at least one --grid axis (e.g. --grid stage2.regime=offline,online_teacher); "
                          "for a single run use `kdlab run`")
    from kdlab.cli import preflight

    preflight.output_dir(out, "--out")
    base = load_config(config, list(set_))
    preflight.run_config(base.model_copy(update={"output_dir": str(out)}))
    cache = base.cache_dir or str(Path(out).resolve().parent / record.CACHE)
    return [(combo, load_config(config, list(set_) + combo + [f"output_dir={out / run_name(combo)}", f"cache_dir={cache}"]))
            for combo in grid_runs(grid)]


def comparison_table(summary: dict) -> str:
    """One line per condition: runs, final proxy and golden (mean over its runs) and both verdicts."""
    finals: dict[str, list[dict]] = {}
    for r in summary["runs"]:
        finals.setdefault(r["condition"], []).append(r["final"])

    def mean(values):
        values = [v for v in values if v is not None]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    head = ("condition", "runs", "final proxy", "final golden", "verdict")
    rows = [(c["condition"], str(len(c["runs"])), mean([f["proxy"] for f in finals.get(c["condition"], [])]),
             mean([f["golden"] for f in finals.get(c["condition"], [])]), c["verdict"]) for c in summary["conditions"]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def command(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config shared by every run.")] = None,
    grid: Annotated[list[str], typer.Option("--grid", help="An axis: --grid stage2.regime=offline,online_teacher (repeatable; at least one).")] = [],
    set_: Annotated[list[str], typer.Option("--set", help="An override applied to every run (repeatable).")] = [],
    out: Annotated[Path, typer.Option(help="Sweep directory (one subdirectory per run).")] = Path("runs/sweep"),
    report: Annotated[bool, typer.Option(help="Write the sweep's report.html and summary.json at the end.")] = True,
) -> None:
    """Run every combination of the grid; finished runs are skipped, an interrupted one is resumed.

    At the end it prints a comparison table (one line per condition). Stage 1 is cached beside the sweep directory (<parent of --out>/.kdlab-cache, unless the config sets cache_dir), so sweeps in the same parent reuse one world.
    """
    from kdlab.pipeline.distill import TrainingDiverged, run
    from kdlab.pipeline.rundir import is_finished

    try:
        configs = sweep_configs(config, grid, set_, out)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    failed = []
    for i, (combo, cfg) in enumerate(configs, 1):
        run_dir = Path(cfg.output_dir)
        if is_finished(run_dir):
            typer.echo(f"[{i}/{len(configs)}] {run_dir.name}: finished, skipped", err=True)
            continue
        resume = (run_dir / record.CONFIG).exists()
        typer.echo(f"[{i}/{len(configs)}] {run_dir.name}{' (resuming)' if resume else ''}", err=True)
        try:
            run(cfg, resume=resume, log=lambda m: typer.echo(m, err=True))
        except (TrainingDiverged, ValueError, RuntimeError) as err:
            typer.echo(f"error in {run_dir.name}: {err}", err=True)
            failed.append(run_dir.name)
    if report:
        from kdlab.cli.run import write_report_safely

        write_report_safely([out])
    finished = [Path(c.output_dir) for _, c in configs if (Path(c.output_dir) / record.METRICS).exists()]
    if finished:
        from kdlab.analysis import analyse_sweep

        typer.echo(comparison_table(analyse_sweep(finished)))
    if failed:
        typer.echo(f"{len(failed)} run(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
