import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True)


def test_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for verb in ("demo", "run", "sweep", "detect", "report"):
        assert verb in out.stdout
