"""`kdlab study STUDY.yaml`: a phase map of teacher hacking across teacher quality, student capacity
and offline data (kdlab.pipeline.phase)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    study: Annotated[Path, typer.Argument(help="Phase-study YAML (e.g. configs/studies/phase.yaml).")],
    out: Annotated[Optional[Path], typer.Option(help="Study directory (default: the file's `out`).")] = None,
    jobs: Annotated[int, typer.Option(min=0, help="Runs in parallel, one torch thread each (0 = the file's `jobs`).")] = 0,
    judge_only: Annotated[bool, typer.Option(help="Do not run anything: judge and draw the runs already in the study directory.")] = False,
) -> None:
    """Run a phase study: for every teacher (rows) x student (panels) x world seed, build the world,
    run each offline condition (columns) and an online control with every training seed, then
    judge every cell in the paper's terms (golden rise with its paired SE, held-out proxy change,
    teacher golden over the online student's best, teacher floor, iso-proxy gap, verdict) and write
    phase.json, phase.csv and the heat map phase.png / phase.pdf. Finished runs are skipped, so an
    interrupted study continues where it stopped."""
    from kdlab.config import ConfigError
    from kdlab.pipeline.phase import judge_phase, load_phase_spec, phase_table, run_phase, world_configs, write_phase

    from kdlab.cli import preflight

    try:
        spec = load_phase_spec(study, out)
        preflight.output_dir(spec.out, "--out")
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    if jobs:
        spec.jobs = jobs
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    n_worlds = len(spec.panels) * len(spec.rows) * len(spec.world_seeds)
    n_runs = n_worlds * (len(spec.columns) + 1) * len(spec.seeds)
    say(f"kdlab study {study}: {n_worlds} world(s) x {len(spec.columns) + 1} conditions x {len(spec.seeds)} seeds "
        f"= {n_runs} runs -> {spec.out}")
    try:
        if judge_only:
            result = judge_phase(spec, world_configs(spec))
            write_phase(spec, result)
        else:
            result = run_phase(spec, log=say)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    typer.echo(phase_table(result))
    if "seconds" in result:
        typer.echo(f"\nwall time {result['seconds']:.0f} s")
    typer.echo(f"map: {spec.out / 'phase.png'} (and .pdf); cells: {spec.out / 'phase.csv'}")
