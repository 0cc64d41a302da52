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
    "report": ("kdlab.cli.report", "Write summary.json, CSV tables and report.html for run or sweep directories."),
    "conformance": ("kdlab.cli.conformance", "Check a token-level distillation loss against kdlab's float64 references."),
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


def _describe(err: BaseException) -> str:
    """One line for an error nothing more specific caught: what failed, on which path, and what to do."""
    if isinstance(err, OSError) and err.filename is not None:
        import errno

        advice = {errno.EACCES: "check that you may write there", errno.EROFS: "the file system is read-only",
                  errno.ENOSPC: "free some space and run again (finished work is kept)",
                  errno.ENOTDIR: "a part of the path is a file, not a directory"}
        return f"{err.strerror or type(err).__name__}: {err.filename} ({advice.get(err.errno, 'check the path')})"
    if isinstance(err, MemoryError):
        return "out of memory: use smaller batches (eval.batch_size, stage2.batch_size) or a smaller model"
    return f"{type(err).__name__}: {err}"


def _empty_argument(argv: list[str]) -> str | None:
    """The first empty value on the command line (`--out ''`, `--out=`, a '' argument), which a shell gives for
    an unset variable and which would otherwise mean the current directory."""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            return arg[:-1]
        if not arg.strip():
            before = argv[i - 1] if i else ""
            return before if before.startswith("--") and "=" not in before else f"argument {i + 1}"
    return None


def _from_ctrl_c(err: BaseException) -> bool:
    """Whether `err` was raised while handling a KeyboardInterrupt (its cause or context chain holds one)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def main() -> None:
    """Run the verb. An error that no verb turned into a message becomes one line and exit code 1; the
    traceback is shown only with --debug (anywhere on the command line) or KDLAB_DEBUG=1."""
    import os

    debug = "--debug" in sys.argv[1:] or os.environ.get("KDLAB_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    empty = _empty_argument(sys.argv[1:])
    if empty is not None:
        typer.echo(f"kdlab: error: {empty} is empty (an unset shell variable?): give a value", err=True)
        sys.exit(2)
    _register()
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as stop:
        # typer turns Ctrl-C into a silent SystemExit(130) (raised from the KeyboardInterrupt): say what was kept
        if isinstance(stop, SystemExit) and not _from_ctrl_c(stop):
            raise
        typer.echo("kdlab: interrupted (finished work is on disk; a run continues with --resume, a study or the demo "
                   "when run again)", err=True)
        sys.exit(130)
    except Exception as err:  # the last line of defence: no traceback for a user's mistake
        if debug:
            raise
        verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        typer.echo(f"{'kdlab ' + verb if verb else 'kdlab'}: error: {_describe(err)}\n"
                   "(run again with --debug to see the traceback)", err=True)
        sys.exit(1)
