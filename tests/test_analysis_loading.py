"""load_metrics: kdlab's metrics.jsonl, other JSONL / CSV tables, and clear errors with line numbers."""

import json

import numpy as np
import pytest

from kdlab.analysis import MetricsError, load_metrics


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"step": 0, "tokens": 0, "regime": "offline", "train_loss": None, "proxy_fkl": 9.0, "proxy_fkl_se": 0.1,
     "golden_fkl": 12.0, "golden_fkl_se": 0.2},
    {"step": 1, "tokens": 64, "regime": "offline", "train_loss": 2.0, "proxy_fkl": 8.0, "proxy_fkl_se": 0.1,
     "golden_fkl": 11.0, "golden_fkl_se": 0.2},
    {"step": 2, "tokens": 128, "regime": "offline", "train_loss": 1.5, "proxy_fkl": 7.0, "proxy_fkl_se": 0.1,
     "golden_fkl": None, "golden_fkl_se": None},
]


def test_reads_kdlab_jsonl(tmp_path):
    m = load_metrics(write_jsonl(tmp_path / "metrics.jsonl", ROWS))
    np.testing.assert_array_equal(m.steps, [0, 1, 2])
    np.testing.assert_array_equal(m.proxy, [9.0, 8.0, 7.0])
    assert m.golden[2] != m.golden[2]  # null → NaN
    np.testing.assert_array_equal(m.golden[:2], [12.0, 11.0])
    assert m.first("regime") == "offline" and m.first("condition") is None
    assert m.has("train_loss") and not m.has("proxy_rkl")


def test_sorts_by_step_and_keeps_the_last_duplicate(tmp_path):
    rows = [ROWS[1], ROWS[0], dict(ROWS[1], proxy_fkl=7.5), ROWS[2]]
    m = load_metrics(write_jsonl(tmp_path / "m.jsonl", rows))
    np.testing.assert_array_equal(m.steps, [0, 1, 2])
    assert m.proxy[1] == 7.5 and m.duplicates_dropped == 1


def test_reads_csv_with_custom_columns(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,kl_teacher,kl_teacher_se,kl_oracle,note\n0,5,0.1,6,a\n10,4,0.1,,b\n20,3,0.1,5.5,c\n")
    m = load_metrics(path, proxy_col="kl_teacher", golden_col="kl_oracle")
    np.testing.assert_array_equal(m.steps, [0, 10, 20])
    np.testing.assert_array_equal(m.proxy_se, [0.1, 0.1, 0.1])
    assert np.isnan(m.golden[1]) and m.golden_se is None


def test_truncated_last_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", ROWS)
    path.write_text(path.read_text() + '{"step": 4, "proxy_fkl": 6.')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl, line 4: not valid JSON \(truncated"):
        load_metrics(path)


@pytest.mark.parametrize(
    "bad_row,message",
    [
        ({"step": 4, "proxy_fkl": "abc"}, r"line 4: column 'proxy_fkl' holds 'abc', expected a number"),
        ({"step": 4, "proxy_fkl": True}, r"line 4: column 'proxy_fkl' holds a boolean"),
        ({"proxy_fkl": 1.0}, r"line 4: row has no 'step' value"),
        ({"step": 2.5, "proxy_fkl": 1.0}, r"line 4: step must be a non-negative integer"),
        ({"step": 4, "proxy_fkl": 1.0, "golden_fkl_se": [1]}, r"line 4: column 'golden_fkl_se'"),
    ],
)
def test_bad_values_name_the_line(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "metrics.jsonl", ROWS + [bad_row])
    with pytest.raises(MetricsError, match=message):
        load_metrics(path)


def test_csv_errors(tmp_path):
    no_step = tmp_path / "a.csv"
    no_step.write_text("epoch,proxy_fkl\n1,2\n")
    with pytest.raises(MetricsError, match=r"a\.csv, line 1: no step column .*--step COL"):
        load_metrics(no_step)
    short = tmp_path / "b.csv"
    short.write_text("step,proxy_fkl,golden_fkl\n1,2,3\n2,1\n")
    with pytest.raises(MetricsError, match=r"b\.csv, line 3: fewer values"):
        load_metrics(short)
    bad = tmp_path / "c.csv"
    bad.write_text("step,proxy_fkl\n1,2\n2,n/a\n")
    with pytest.raises(MetricsError, match=r"c\.csv, line 3: column 'proxy_fkl' holds 'n/a'"):
        load_metrics(bad)


def test_missing_or_empty_inputs(tmp_path):
    with pytest.raises(MetricsError, match="cannot read"):
        load_metrics(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MetricsError, match="empty file"):
        load_metrics(empty)
    no_proxy = write_jsonl(tmp_path / "np.jsonl", [{"step": 1, "loss": 2.0}])
    with pytest.raises(MetricsError, match=r"no values in the proxy column 'proxy_fkl' \(columns: loss, step\)"):
        load_metrics(no_proxy)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(MetricsError, match="line 1: expected a JSON object"):
        load_metrics(not_object)
