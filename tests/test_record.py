"""`kdlab.record`: the run record's one reader (every log format gives the same table), its writer
(ordinary file modes under the umask) and its column declarations."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import typer

from kdlab import record
from kdlab.analysis import synthetic as syn
from kdlab.record import MetricsError, read_metrics


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(7)
    run = syn.hacking_run(rng, steps=syn.log_steps(4000, 24), rise=0.15, departure=0.4, onset_frac=0.75, sigma=0.01)
    return syn.run_rows(run)


def detect(*args):
    """`kdlab detect` under typer's test runner (same parsing and exit codes as the command line)."""
    from typer.testing import CliRunner

    from kdlab.cli import detect as verb

    app = typer.Typer()
    app.command()(verb.command)
    return CliRunner().invoke(app, list(args))


def detect_json(*args) -> dict:
    out = detect(*args, "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def _same_table(m, rows):
    assert m.steps.tolist() == [r["step"] for r in rows]
    np.testing.assert_allclose(m.proxy, [r["proxy_fkl"] for r in rows], rtol=1e-6)
    np.testing.assert_allclose(m.golden, [r["golden_fkl"] for r in rows], rtol=1e-6)
    np.testing.assert_allclose(m.proxy_se, [r["proxy_fkl_se"] for r in rows], rtol=1e-6)


# ------------------------------------------------------------------------------------------ reader


def test_monitor_output_directory_is_read_and_reported(tmp_path, rows):
    """Bug 6: `kdlab report` on a TeacherHackingMonitor output directory found no metrics.jsonl."""
    out = tmp_path / "trainer_out"
    out.mkdir()
    (out / record.MONITOR_METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = read_metrics(out)
    assert m.source == "monitor" and m.path.name == record.MONITOR_METRICS
    _same_table(m, rows)
    from kdlab.report import write_report

    report = write_report(out)
    assert report == out / record.REPORT and (out / record.SUMMARY).is_file()
    summary = json.loads((out / record.SUMMARY).read_text())
    assert summary["golden"]["kind"] == "hacking"


def test_trainer_state_log_history_is_merged_by_step(tmp_path, rows):
    """Bug 6: `kdlab detect trainer_state.json` failed. The monitor logs through trainer.log as
    teacher_hacking/<col>, the trainer logs its loss as a separate entry at the same step."""
    history = []
    for r in rows:
        history.append({"loss": 0.5, "learning_rate": 1e-3, "step": r["step"]})
        history.append({"teacher_hacking/" + k: v for k, v in r.items() if k.endswith(("_fkl", "_se"))} | {"step": r["step"]})
    history.append({"train_runtime": 12.0, "train_loss": 0.4})  # the end-of-training entry has no step
    path = tmp_path / record.TRAINER_STATE
    path.write_text(json.dumps({"global_step": rows[-1]["step"], "log_history": history}))
    m = read_metrics(path)
    assert m.source == "trainer_state" and m.duplicates_dropped == 0
    _same_table(m, rows)
    assert m.column("loss").tolist() == [0.5] * len(rows)  # both entries of a step are kept

    reference = tmp_path / "metrics.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = detect_json(str(path)), detect_json(str(reference))
    assert a["golden"] == b["golden"] and a["proxy_deviation"] == b["proxy_deviation"]
    # A trainer output directory whose state is in its checkpoints is found too.
    ckpt = tmp_path / "out" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    (ckpt / record.TRAINER_STATE).write_text(path.read_text())
    (tmp_path / "out" / "checkpoint-8").mkdir()
    (tmp_path / "out" / "checkpoint-8" / record.TRAINER_STATE).write_text(json.dumps({"log_history": []}))
    assert read_metrics(tmp_path / "out").path == ckpt / record.TRAINER_STATE


def test_csv_with_global_step_tsv_and_a_named_step_column(tmp_path, rows):
    """Bug 6: a CSV whose step column is `global_step` failed, TSV was refused, and no option named
    the step column."""
    names = ["global_step", "proxy_fkl", "proxy_fkl_se", "golden_fkl", "golden_fkl_se"]

    def table(path, step_name, delimiter):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, delimiter=delimiter)
            w.writerow([step_name, *names[1:]])
            for r in rows:
                w.writerow([r["step"], *(r[n] for n in names[1:])])
        return path

    reference = tmp_path / "metrics.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = detect_json(str(reference))
    for path, extra in ((table(tmp_path / "a.csv", "global_step", ","), ()),
                        (table(tmp_path / "b.tsv", "global_step", "\t"), ()),
                        (table(tmp_path / "c.txt", "global_step", "\t"), ()),  # sniffed as TSV
                        (table(tmp_path / "d.csv", "opt_updates", ","), ("--step", "opt_updates"))):
        got = detect_json(str(path), *extra)
        assert got["proxy_deviation"] == expected["proxy_deviation"], path
        assert got["golden"] == expected["golden"], path
    wrong = detect(str(tmp_path / "d.csv"), "--step", "nope")
    assert wrong.exit_code == 2 and "no step column 'nope'" in wrong.output and "opt_updates" in wrong.output


def test_tensorboard_events_with_trl_prefixed_tags(tmp_path, rows):
    """Bug 6: TensorBoard event files (the monitor's metrics logged by a TRL trainer arrive as
    train/teacher_hacking/<col>) are read as the same table."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "runs" / "Dec01_trl"
    writer = SummaryWriter(str(logdir))
    for r in rows:
        for k, v in r.items():
            if k.endswith(("_fkl", "_se")) and v is not None:
                writer.add_scalar("train/teacher_hacking/" + k, v, global_step=r["step"])
        writer.add_scalar("train/loss", 0.25, global_step=r["step"])
    writer.close()
    m = read_metrics(tmp_path)  # found under runs/<name>/, as transformers writes it
    assert m.source == "tensorboard"
    _same_table(m, rows)
    reference = tmp_path / "metrics.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = detect_json(str(logdir)), detect_json(str(reference))
    # float32 storage in the event file: the verdicts agree, the numbers to float32 precision
    assert a["golden"]["kind"] == b["golden"]["kind"] and a["golden"]["onset_step"] == b["golden"]["onset_step"]
    assert a["proxy_deviation"]["onset_step"] == b["proxy_deviation"]["onset_step"]
    assert a["golden"]["rise"] == pytest.approx(b["golden"]["rise"], rel=1e-5)


def test_unreadable_logs_are_clear_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MetricsError, match="no metrics log in this directory"):
        read_metrics(tmp_path / "empty_dir")
    bad = tmp_path / record.TRAINER_STATE
    bad.write_text('{"log_history": 3}')
    with pytest.raises(MetricsError, match="no 'log_history' list"):
        read_metrics(bad)
    out = detect(str(tmp_path / "empty_dir"))
    assert out.exit_code == 2 and "no metrics log" in out.output and "Traceback" not in out.output


# ------------------------------------------------------------------------------------------ writer


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writer_and_report_honour_the_umask(tmp_path, rows):
    """Bug 8: report.html and summary.json were created 0600 (tempfile.mkstemp), so colleagues on a
    shared machine could not open them. Expected modes come from an ordinary open()/mkdir()."""
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
        file_mode, dir_mode = _mode(plain), _mode(tmp_path / "plain_dir")
        assert (file_mode, dir_mode) == (0o644, 0o755)

        assert _mode(record.write_text(tmp_path / "a.txt", "hello")) == file_mode
        assert _mode(record.temp_dir(tmp_path, ".tmp-")) == dir_mode
        run = syn.write_run(tmp_path / "run", rows, {"seed": 0})
        from kdlab.report import write_report

        write_report(run)
        for name in (record.REPORT, record.SUMMARY):
            assert _mode(run / name) == file_mode, name
        assert _mode(run / record.PLOTS) == dir_mode
    finally:
        os.umask(old)


def test_config_differences_name_each_field():
    saved = "seed: 0\nstage2:\n  lr: 0.001\n  steps: 10\nloss: {name: forward_kl}\n"
    given = "seed: 0\nstage2:\n  lr: 0.0003\n  steps: 10\nloss: {name: reverse_kl}\nextra: 1\n"
    assert record.config_differences(saved, given) == [
        "extra: '(absent)' -> 1", "loss.name: 'forward_kl' -> 'reverse_kl'", "stage2.lr: 0.001 -> 0.0003"]


# ------------------------------------------------------------------------------------------ names


def test_each_divergence_column_declares_its_se_and_direction():
    for c in record.COLUMNS:
        if c.name.endswith(("_fkl", "_rkl", "_per_token")):
            assert c.se == c.name + "_se" and c.direction == "lower", c
    assert record.se_column("proxy_fkl") == "proxy_fkl_se" and record.se_column("eval_loss") == "eval_loss_se"
    assert len({c.name for c in record.COLUMNS}) == len(record.COLUMNS)


def test_record_imports_no_training_code():
    code = ("import sys, kdlab.record; print(sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith(('kdlab.pipeline', 'kdlab.models', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
