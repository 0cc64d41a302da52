"""`kdlab demo`: placeholder until the demo issue lands."""

import typer


def command() -> None:
    """Reproduce the teacher-hacking study on the embedded synthetic world (not built yet)."""
    typer.echo("kdlab demo is not built yet: it arrives with the `make demo` issue.", err=True)
    raise typer.Exit(1)
