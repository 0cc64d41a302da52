"""`kdlab detect` end to end on metrics files written here (subprocess, as a user runs it)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import typer

from kdlab.analysis import synthetic as syn


def kdlab(*args):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True, timeout=120)


def detect_in_process(*args):
    """The verb's function under typer's test runner: the same parsing and exit codes as the
    subprocess, without paying the interpreter start-up for every error case."""
    from typer.testing import CliRunner

    from kdlab.cli import detect

    app = typer.Typer()
    app.command()(detect.command)
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def hacking_rows():
    rng = np.random.default_rng(0)
    run = syn.hacking_run(rng, steps=syn.log_steps(8000, 30), rise=0.15, departure=0.4, onset_frac=0.75, sigma=0.01)
    return run, syn.run_rows(run)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_schema_on_a_hacking_run(tmp_path, hacking_rows):
    run, rows = hacking_rows
    out = kdlab("detect", str(write_jsonl(tmp_path / "metrics.jsonl", rows)), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"golden", "proxy_deviation"}
    g, p = result["golden"], result["proxy_deviation"]
    assert g["detected"] is True and g["kind"] == "hacking" and isinstance(g["onset_step"], int)
    assert abs(int(np.flatnonzero(run.steps == g["onset_step"])[0]) - run.onset_index) <= 1
    for key in ("rise", "rise_se", "proxy_change", "proxy_trend", "reason"):
        assert key in g
    assert p["detected"] is True and isinstance(p["onset_step"], int) and p["onset_step"] > run.steps[run.onset_index] / 2
    assert p["residual_at_end"] > p["residual_at_onset"] > 0 and p["fit"]["law"] in ("power", "floor")


def test_human_output_and_csv_with_custom_columns(tmp_path, hacking_rows):
    _, rows = hacking_rows
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "kl_t", "kl_t_se", "kl_o", "kl_o_se"])
        for r in rows:
            writer.writerow([r["step"], r["proxy_fkl"], r["proxy_fkl_se"], r["golden_fkl"], r["golden_fkl_se"]])
    out = kdlab("detect", str(path), "--proxy", "kl_t", "--golden", "kl_o")
    assert out.returncode == 0, out.stderr
    assert "golden (kl_o): TEACHER HACKING from step" in out.stdout
    assert "proxy-only (kl_t): DEPARTS from step" in out.stdout
    as_json = json.loads(detect_in_process(str(path), "--proxy", "kl_t", "--golden", "kl_o", "--json").stdout)
    assert as_json["golden"]["detected"] and as_json["golden_col"] == "kl_o"


def test_no_golden_column_gives_null_golden(tmp_path):
    rng = np.random.default_rng(1)
    clean = syn.clean_curve(rng, "power", syn.log_steps(5000, 25))
    rows = [{"step": int(s), "proxy_fkl": float(v), "proxy_fkl_se": float(e)} for s, v, e in zip(clean.steps, clean.values, clean.se)]
    path = write_jsonl(tmp_path / "metrics.jsonl", rows)
    result = json.loads(kdlab("detect", str(path), "--json").stdout)
    assert result["golden"] is None
    assert result["proxy_deviation"]["detected"] is False and result["proxy_deviation"]["onset_step"] is None
    text = detect_in_process(str(path))
    assert text.exit_code == 0 and "no golden column" in text.stdout and "on its law" in text.stdout
    # Asking for a golden column that is not there is an input error, not a silent null.
    missing = kdlab("detect", str(path), "--golden", "golden_rkl")
    assert missing.returncode == 2 and "golden_rkl" in missing.stderr and missing.stdout == ""


def test_truncated_file_exits_2_with_line_number(tmp_path, hacking_rows):
    _, rows = hacking_rows
    path = write_jsonl(tmp_path / "metrics.jsonl", rows)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the writer was killed mid-line
    out = kdlab("detect", str(path))
    assert out.returncode == 2
    assert f"metrics.jsonl, line {len(rows)}: not valid JSON (truncated" in out.stderr
    assert out.stdout == ""


def test_bad_inputs_exit_2(tmp_path):
    out = detect_in_process(str(tmp_path / "absent.jsonl"))
    assert out.exit_code == 2 and "cannot read" in out.output
    path = tmp_path / "m.csv"
    path.write_text("epoch,proxy_fkl\n1,2\n")
    out = detect_in_process(str(path))
    assert out.exit_code == 2 and "no step column" in out.output and "--step COL" in out.output
    wrong_proxy = detect_in_process(str(write_jsonl(tmp_path / "x.jsonl", [{"step": 1, "kl": 1.0}])), "--proxy", "nope")
    assert wrong_proxy.exit_code == 2 and "'nope'" in wrong_proxy.output
