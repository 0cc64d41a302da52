import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for verb in ("demo", "run", "sweep", "detect", "report"):
        assert verb in out.stdout


def test_version():
    """Bug 9: `kdlab --version` did not exist. The version is the installed package's."""
    from importlib.metadata import version

    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kdlab {version('kdlab')}"


def test_run_help_shows_the_real_defaults_after_the_options():
    """Bug 5: `kdlab run --help` printed the section classes' defaults (stage1.student 4000 / 2000,
    the student 64 x 2 x 4) where the config uses 500 / 300 and 32 x 1 x 2, printed internals
    (`kdlab.config.ArchConfig | str, default '{...}'`), dropped "[vllm]" (rich markup) and listed
    ~200 lines of fields before the options. The expected values are read from the config itself."""
    from kdlab.config import RunConfig

    cfg = RunConfig()
    out = run_cli("run", "--help", COLUMNS="400")
    assert out.returncode == 0, out.stderr
    text = re.sub(r"[ \t]+", " ", out.stdout)
    for dotted in ("stage1.student.num_samples", "stage1.student.steps", "stage1.teacher.steps",
                   "models.student.hidden_size", "models.student.num_layers", "models.student.num_heads",
                   "models.teacher.hidden_size", "stage2.offline.num_prompts"):
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        assert re.search(rf"{re.escape(dotted)} \(\w+, default {value!r}\)", text), dotted
    assert "kdlab.config" not in text and "'{...}'" not in text
    assert "kdlab[vllm]" in text
    assert text.index("--set") < text.index("--resume") < text.index("Config fields")


@pytest.fixture()
def sweep_cli():
    from kdlab.cli import sweep

    app = typer.Typer()
    app.command()(sweep.command)
    return lambda *args: CliRunner().invoke(app, list(args))


def test_sweep_without_grid_is_refused(sweep_cli, tmp_path):
    """Bug 10: `kdlab sweep` without --grid silently ran a single run."""
    out = sweep_cli("--out", str(tmp_path / "sw"))
    assert out.exit_code == 2 and "needs at least one --grid" in out.output and "kdlab run" in out.output
    assert not (tmp_path / "sw").exists()


def test_sweeps_side_by_side_share_one_stage1_cache(tmp_path):
    """Bug 10: each sweep directory rebuilt the stage-1 world (the cache lived inside --out)."""
    from kdlab.cli.sweep import sweep_configs
    from kdlab.config import load_config

    a = sweep_configs(None, ["seed=0,1"], [], tmp_path / "runs" / "sweep-a")
    b = sweep_configs(None, ["stage2.regime=offline"], [], tmp_path / "runs" / "sweep-b")
    single = load_config(None, [f"output_dir={tmp_path / 'runs' / 'x'}"])
    caches = {c.resolved_cache_dir().resolve() for _, c in a + b} | {single.resolved_cache_dir().resolve()}
    assert caches == {(tmp_path / "runs" / ".kdlab-cache").resolve()}
    mine = sweep_configs(None, ["seed=0"], [f"cache_dir={tmp_path / 'mine'}"], tmp_path / "runs" / "sweep-c")
    assert [c.cache_dir for _, c in mine] == [str(tmp_path / "mine")]  # a cache_dir that is set wins


def test_sweep_comparison_table(tmp_path):
    """Bug 10: a sweep printed no comparison at the end. One line per condition, with its runs, its
    final proxy and golden (mean over runs, computed here from the metrics) and the verdict."""
    import json

    from kdlab.analysis import analyse_sweep
    from kdlab.analysis import synthetic as syn
    from kdlab.cli.sweep import comparison_table

    dirs = syn.write_sweep(tmp_path, seeds=(0, 1), conditions=["offline 256×8", "online_student"])
    table = comparison_table(analyse_sweep([tmp_path])).splitlines()
    assert table[0].split()[:2] == ["condition", "runs"] and len(table) == 4
    for name, prefix in (("offline 256×8", "offline_256x8"), ("online_student", "online_student")):
        finals = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in dirs if d.name.startswith(prefix)]
        proxy = sum(f["proxy_fkl"] for f in finals) / 2
        golden = sum(f["golden_fkl"] for f in finals) / 2
        line = next(l for l in table if l.startswith(name + " "))
        assert f" 2 " in line and f"{proxy:.3f}" in line and f"{golden:.3f}" in line
    assert "hacking in 2/2 seeds" in next(l for l in table if l.startswith("offline 256×8"))


def test_license_and_readme_for_a_newcomer():
    """Bug 9: no LICENSE file though pyproject says Apache-2.0; the README moved from .venv/bin/kdlab
    to a bare `kdlab` without saying how to activate the venv, nor how to install into an existing
    (GPU) environment."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert meta["license"]["text"] == "Apache-2.0"
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    readme = (root / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    assert readme.index("source .venv/bin/activate") < readme.index("kdlab run configs/")
    assert "pip install -e '.[trl]'" in readme
    assert "../shared" not in readme
