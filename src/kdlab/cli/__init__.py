"""The `kdlab` command line. One module per verb; each is imported only when its verb runs,
so `kdlab --help` stays fast and a verb's heavy imports (torch, transformers) load on demand."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="kdlab",
    help=(
        "Controlled language-model distillation experiments: build an oracle -> teacher -> student "
        "world, distil under a data regime, measure proxy (student vs teacher) and golden (student vs "
        "oracle) divergences, and detect teacher hacking."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# verb -> (module, one-line help). The module defines `command(...)` with typer annotations.
VERBS = {
    "demo": ("kdlab.cli.demo", "Reproduce the teacher-hacking study on the embedded synthetic world."),
    "run": ("kdlab.cli.run", "Run one experiment from a YAML config (stage 1, stage 2, evaluation, report)."),
    "sweep": ("kdlab.cli.sweep", "Run every combination of a grid of config overrides."),
    "study": ("kdlab.cli.study", "Phase map of teacher hacking: teacher quality x student x offline data."),
    "detect": ("kdlab.cli.detect", "Detect teacher hacking in a metrics log (JSONL, CSV/TSV, trainer_state.json, TensorBoard)."),
    "report": ("kdlab.cli.report", "Write summary.json and report.html for run or sweep directories."),
}


def _register() -> None:
    argv = sys.argv[1:]
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for verb, (module_name, help_text) in VERBS.items():
        if wanted == verb:
            module = importlib.import_module(module_name)
            epilog = getattr(module, "epilog", None)  # printed after the options (kdlab run: the config fields)
            app.command(name=verb, help=module.command.__doc__ or help_text,
                        epilog=epilog() if callable(epilog) else None)(module.command)
        else:
            # A placeholder keeps `kdlab --help` listing every verb without importing torch.
            app.command(name=verb, help=help_text, context_settings={"allow_extra_args": True,
                        "ignore_unknown_options": True})(_lazy(module_name))


def _version(value: bool) -> None:
    if value:
        from kdlab import __version__

        typer.echo(f"kdlab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print kdlab's version and exit.")) -> None:
    """Controlled language-model distillation experiments."""


def _lazy(module_name: str):
    def placeholder(ctx: typer.Context) -> None:
        importlib.import_module(module_name)  # pragma: no cover - only reached via odd argv orders
        raise typer.Exit(2)

    return placeholder


def main() -> None:
    _register()
    app()
