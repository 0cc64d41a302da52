"""Failure-mode alarms (issue 21, kdlab.analysis.alarms) on drift-panel rows with injected effects of known size
and onset; healthy rows (student = teacher within noise) stay quiet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdlab import record
from kdlab.analysis.alarms import (ALARMS, ENTROPY_COLLAPSE, EOS_MISMATCH, EXPOSURE_GAP_GROWTH, LENGTH_INFLATION,
                                   REPETITION_COLLAPSE, check_alarms)

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]


def healthy_rows(seed=0, n_se=1.0):
    """Student equal to the teacher up to noise of `n_se` standard errors (independent draws)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in STEPS:
        r = {record.STEP: s}

        def pair(name_s, name_t, mean, se):
            r[name_s], r[record.se_column(name_s)] = mean + n_se * se * rng.standard_normal(), se
            r[name_t], r[record.se_column(name_t)] = mean + n_se * se * rng.standard_normal(), se

        pair(record.LENGTH_STUDENT, record.LENGTH_TEACHER, 20.0, 0.5)
        pair(record.NO_EOS_STUDENT, record.NO_EOS_TEACHER, 0.05, 0.01)
        pair(record.EOS_MASS_STUDENT, record.EOS_MASS_TEACHER, 0.05, 0.005)
        pair(record.ENTROPY_STUDENT, record.ENTROPY_TEACHER, 1.2, 0.02)
        pair(record.REPETITION_STUDENT, record.REPETITION_TEACHER, 0.1, 0.01)
        r[record.EOS_MASS_GAP_MAX] = 0.02
        r[record.TOPK_OVERLAP], r[record.se_column(record.TOPK_OVERLAP)] = 0.9, 0.01
        r[record.EXPOSURE_GAP] = 0.05 + 0.01 * rng.standard_normal()
        r[record.se_column(record.EXPOSURE_GAP)] = 0.01
        rows.append(r)
    return rows


def inject(rows, col, values_from, start):
    """From step index `start` on, `col` follows values_from(i) (i counts from the start)."""
    for i, r in enumerate(rows[start:]):
        r[col] = values_from(i)
    return rows


def test_healthy_rows_raise_no_alarm():
    for seed in range(50):
        fired = [n for n, v in check_alarms(healthy_rows(seed)).items() if v.fired]
        assert fired == [], (seed, fired)
    assert set(check_alarms(healthy_rows())) == set(ALARMS)


@pytest.mark.parametrize("name, col, values, expected_onset", [
    (LENGTH_INFLATION, record.LENGTH_STUDENT, lambda i: 20.0 * (1.6 + 0.2 * i), 6),
    (EOS_MISMATCH, record.NO_EOS_STUDENT, lambda i: 0.5, 6),
    (ENTROPY_COLLAPSE, record.ENTROPY_STUDENT, lambda i: 0.4, 6),
    (REPETITION_COLLAPSE, record.REPETITION_STUDENT, lambda i: 0.5, 6),
    (EXPOSURE_GAP_GROWTH, record.EXPOSURE_GAP, lambda i: 0.05 + 0.3 * (i + 1), 6),
])
def test_each_alarm_fires_at_the_injected_onset_and_only_it(name, col, values, expected_onset):
    rows = inject(healthy_rows(seed=1), col, values, expected_onset)
    verdicts = check_alarms(rows)
    assert verdicts[name].fired and verdicts[name].onset_step == STEPS[expected_onset], verdicts[name]
    assert [n for n, v in verdicts.items() if v.fired] == [name]


@pytest.mark.parametrize("name, col, values", [
    (LENGTH_INFLATION, record.LENGTH_STUDENT, lambda i: 40.0),
    (EOS_MISMATCH, record.NO_EOS_STUDENT, lambda i: 0.5),
    (ENTROPY_COLLAPSE, record.ENTROPY_STUDENT, lambda i: 0.4),
    (REPETITION_COLLAPSE, record.REPETITION_STUDENT, lambda i: 0.5),
    (EXPOSURE_GAP_GROWTH, record.EXPOSURE_GAP, lambda i: 0.05 + 0.3 * (i + 1)),
])
def test_an_effect_within_its_noise_stays_quiet(name, col, values):
    """The same injected effects as above, with standard errors as large as the effects: no alarm."""
    rows = inject(healthy_rows(seed=1), col, values, 6)
    for r in rows:
        for c in list(r):
            if c.endswith("_se"):
                r[c] = 20.0 if "length" in c else 1.0  # each at least the size of its effect
    assert not check_alarms(rows)[name].fired


def test_the_eos_mass_gap_alone_does_not_fire():
    rows = healthy_rows(seed=5)
    for r in rows:
        r[record.EOS_MASS_GAP_MAX] = 0.9
    assert not check_alarms(rows)[EOS_MISMATCH].fired


def test_an_effect_below_its_size_threshold_or_its_noise_stays_quiet():
    # 1.3x longer, far beyond noise: below the 1.5 ratio
    rows = inject(healthy_rows(seed=2), record.LENGTH_STUDENT, lambda i: 26.0, 4)
    assert not check_alarms(rows)[LENGTH_INFLATION].fired
    # 2x longer but with SEs as large as the effect
    rows = inject(healthy_rows(seed=2), record.LENGTH_STUDENT, lambda i: 40.0, 4)
    for r in rows:
        r[record.se_column(record.LENGTH_STUDENT)] = 10.0
    assert not check_alarms(rows)[LENGTH_INFLATION].fired
    # one evaluation alone is not persistent
    rows = inject(healthy_rows(seed=2), record.ENTROPY_STUDENT, lambda i: 0.3 if i == 0 else 1.2, 5)
    assert not check_alarms(rows)[ENTROPY_COLLAPSE].fired


def test_a_log_without_the_panel_has_no_alarms_and_detect_reports_them(tmp_path):
    from typer.testing import CliRunner

    import typer
    from kdlab.cli import detect

    assert check_alarms([{record.STEP: 0, record.PROXY: 1.0}]) == {}
    rows = inject(healthy_rows(seed=3), record.REPETITION_STUDENT, lambda i: 0.6, 7)
    for i, r in enumerate(rows):
        r[record.PROXY], r[record.se_column(record.PROXY)] = 10.0 / (1 + r[record.STEP]) ** 0.3, 0.05
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = typer.Typer()
    app.command()(detect.command)
    res = CliRunner().invoke(app, [str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["alarms"][REPETITION_COLLAPSE]["fired"] and out["alarms"][REPETITION_COLLAPSE]["onset_step"] == STEPS[7]
    res = CliRunner().invoke(app, [str(path)])
    assert f"alarm {REPETITION_COLLAPSE}: FIRED" in res.output


def test_the_report_shows_a_fired_alarm(tmp_path):
    from kdlab.report import write_report

    rows = inject(healthy_rows(seed=4), record.ENTROPY_STUDENT, lambda i: 0.3, 8)
    for r in rows:
        r[record.PROXY], r[record.se_column(record.PROXY)] = 10.0 / (1 + r[record.STEP]) ** 0.3, 0.05
    run = tmp_path / "run"
    run.mkdir()
    (run / record.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = write_report(run).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["alarms"][ENTROPY_COLLAPSE]["fired"] and summary["alarms"][ENTROPY_COLLAPSE]["onset_step"] == STEPS[8]
    assert f"alarm {ENTROPY_COLLAPSE}: FIRED" in html
