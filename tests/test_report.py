"""`kdlab report` and `write_report` on synthetic run and sweep directories."""

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from kdlab.analysis import synthetic as syn
from kdlab.report import write_report


def kdlab(*args):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True, timeout=300)


def embedded_pngs(html_text):
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    return [base64.b64decode(data) for data in images]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    syn.write_sweep(root, seeds=(0, 1))
    return root


def test_report_on_a_sweep_via_cli(sweep):
    out = kdlab("report", str(sweep))
    assert out.returncode == 0, out.stderr
    assert "offline 256×8: golden: hacking in 2/2 seeds" in out.stdout
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_runs"] == 6
    conditions = {c["condition"]: c for c in summary["conditions"]}
    assert conditions["offline 256×8"]["golden"]["detected"] == 2
    assert conditions["online_student"]["golden"]["detected"] == 0
    assert conditions["offline 128×1"]["golden"]["kinds"] == {"overfitting": 2}
    # In-place sweep reports also leave each run its own summary.json (the run directory contract).
    run_summary = json.loads((sweep / "offline_256x8-seed1" / "summary.json").read_text())
    assert run_summary["golden"]["kind"] == "hacking" and "thresholds" in run_summary

    page = (sweep / "report.html").read_text()
    pngs = embedded_pngs(page)
    assert len(pngs) == 7  # one per run + the overlay of all conditions
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 10_000 for p in pngs)
    assert "Verdicts by condition" in page and "Verdicts by run" in page
    assert page.count('<td class="hacking">') >= 2  # the verdict table marks the hacking runs
    assert "stage2:" in page and "num_prompts: 256" in page  # each run's config
    assert sorted(p.name for p in (sweep / "plots").glob("*.png")) == sorted(
        [f"{r}.png" for r in summary and [x["run"] for x in summary["runs"]]] + ["sweep_conditions.png"]
    )
    assert "src=\"plots/" not in page  # self-contained: no links to files


def test_single_run_report_with_out_dir(sweep, tmp_path):
    run = sweep / "online_student-seed0"
    report = write_report(run, tmp_path / "out")
    assert report == tmp_path / "out" / "report.html"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"] == "online_student-seed0" and summary["golden"]["kind"] == "none"
    assert summary["proxy_deviation"]["detected"] is False and "thresholds" in summary
    assert len(embedded_pngs(report.read_text())) == 1
    assert (tmp_path / "out" / "plots" / "online_student-seed0.png").is_file()


def test_report_without_golden(tmp_path):
    runs = syn.write_sweep(tmp_path / "sw", seeds=(0,), conditions=["offline 256×8"], golden=False)
    report = write_report(runs[0])
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["golden"] is None and summary["proxy_deviation"]["detected"] is True
    assert "no oracle" in report.read_text()


def test_report_errors(tmp_path, sweep):
    broken = syn.write_run(tmp_path / "broken", [{"step": 0, "proxy_fkl": 1.0}], None)
    (broken / "metrics.jsonl").write_text('{"step": 0, "proxy_fkl": 1.0}\n{"step": 1, "pro')
    out = kdlab("report", str(broken))
    assert out.returncode == 2 and "metrics.jsonl, line 2: not valid JSON" in out.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        write_report(tmp_path / "absent")
    with pytest.raises(ValueError, match="out_dir"):
        write_report([sweep / "online_student-seed0", sweep / "online_student-seed1"])


def test_several_directories_into_one_report(sweep, tmp_path):
    report = write_report([sweep / "online_student-seed0", sweep / "offline_256x8-seed0"], tmp_path / "both")
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert [c["condition"] for c in summary["conditions"]] == ["online_student", "offline 256×8"]
    assert len(embedded_pngs(report.read_text())) == 3


def test_task_metrics_get_their_own_panel(tmp_path):
    """A run that logged task metrics gets a fourth panel (a wider figure) with one curve per column."""
    import struct

    from kdlab.analysis.runs import analyse
    from kdlab.report import plots

    def png_width(path):
        return struct.unpack(">I", path.read_bytes()[16:20])[0]  # IHDR width

    run = syn.write_sweep(tmp_path / "sw", seeds=(0,), conditions=["offline 256×8"])[0]
    plain = analyse(run)
    assert plots._task_columns(plain) == []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["task_rougeL_ref"], row["task_rougeL_oracle"] = 10.0 + i, 20.0 + i
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_task = analyse(run)
    assert [c for c, _ in plots._task_columns(with_task)] == ["task_rougeL_ref", "task_rougeL_oracle"]
    w3 = png_width(plots.plot_run(plain, tmp_path / "plain.png"))
    w4 = png_width(plots.plot_run(with_task, tmp_path / "with.png"))
    assert (w3, w4) == (18 * 90, 23 * 90)


def _detect_json(path):
    out = kdlab("detect", str(path), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_report_and_detect_say_not_tested_alike(tmp_path):
    """Bug 3: with 6 evaluations the report printed "proxy-only: on its law" (a clean bill) right
    above the detector's own "too few evaluations (6)", while `kdlab detect` said "not tested"."""
    rows = [{"step": s, "proxy_fkl": 2.0 / (1 + s) ** 0.3, "proxy_fkl_se": 0.01,
             "golden_fkl": 3.0 / (1 + s) ** 0.2, "golden_fkl_se": 0.01} for s in (0, 1, 3, 10, 30, 100)]
    run = syn.write_run(tmp_path / "short", rows, {"seed": 0, "stage2": {"regime": "offline"}})
    report = write_report(run)
    summary = json.loads((run / "summary.json").read_text())
    assert "too few evaluations" in summary["proxy_deviation"]["reason"]  # the detector could not test
    page = report.read_text()
    assert "on its law" not in page
    assert "proxy-only: not tested" in summary["verdict"] and "not tested" in page
    detected = _detect_json(run / "metrics.jsonl")
    assert detected["proxy_status"] == "not tested" and detected["verdict"] == summary["verdict"]


def test_report_and_detect_give_the_same_paired_golden_se(tmp_path):
    """Bug 3: for the same rise the report gave ±0.08 (paired over prompts) and `kdlab detect` ±0.23
    (windows as independent). Both now run one analysis; the expected SE is computed here from the
    per-prompt values: SE over prompts of mean(last 3 evals) − mean(minimum window)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    level = np.array([5.0, 4.0, 3.0, 2.0, 1.2, 1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 3.5])  # minimum window: evals 4-6
    k = 64
    prompt_effect = rng.normal(0, 1.0, k)  # shared by every evaluation: what pairing removes
    golden_pp = level[:, None] + prompt_effect[None, :] + rng.normal(0, 0.1, (len(steps), k))
    proxy_pp = (2.0 / np.sqrt(1 + np.arange(len(steps))))[:, None] + rng.normal(0, 0.05, (len(steps), k))
    run = tmp_path / "paired"
    (run / "per_prompt").mkdir(parents=True)
    rows = []
    for i, s in enumerate(steps):
        save_file({"golden_fkl": golden_pp[i], "proxy_fkl": proxy_pp[i]},
                  str(run / "per_prompt" / f"step-{s:08d}.safetensors"))
        rows.append({"step": s, "golden_fkl": float(golden_pp[i].mean()),
                     "golden_fkl_se": float(golden_pp[i].std(ddof=1) / np.sqrt(k)),
                     "proxy_fkl": float(proxy_pp[i].mean()), "proxy_fkl_se": float(proxy_pp[i].std(ddof=1) / np.sqrt(k))})
    syn.write_run(run, rows, {"seed": 0, "stage2": {"regime": "offline"}})
    d = golden_pp[9:12].mean(0) - golden_pp[4:7].mean(0)
    expected = d.std(ddof=1) / np.sqrt(k)

    detected = _detect_json(run / "metrics.jsonl")
    write_report(run)
    reported = json.loads((run / "summary.json").read_text())
    assert detected["golden"]["min_step"] == reported["golden"]["min_step"] == 16
    assert detected["golden"]["se_source"] == reported["golden"]["se_source"] == "paired"
    assert detected["golden"]["rise_se"] == pytest.approx(expected, rel=1e-9)
    assert reported["golden"]["rise_se"] == pytest.approx(expected, rel=1e-9)
    assert detected["verdict"] == reported["verdict"]
    assert _detect_json(run)["golden"]["rise_se"] == pytest.approx(expected, rel=1e-9)  # the directory too


def test_findings_are_on_the_report_page(sweep, tmp_path):
    """Bug 4: the demo's five findings were printed but missing from report.html."""
    from kdlab.analysis.findings import Finding

    findings = [Finding("offline_hacks", "Offline data hacks", True, "detected in 2/2 seeds", {100: False, 8000: True}),
                Finding("online_no_hacking", "Online data does not hack", None, "no runs", {8000: None})]
    report = write_report([sweep], tmp_path / "with_findings", findings=findings)
    page = report.read_text()
    assert "Findings of the paper" in page
    assert "[HOLDS]</span> Offline data hacks" in page and "[UNDECIDED]</span> Online data does not hack" in page
    assert "detected in 2/2 seeds" in page and "100: no, 8000: yes" in page
    summary = json.loads((tmp_path / "with_findings" / "summary.json").read_text())
    assert [f["key"] for f in summary["findings"]] == ["offline_hacks", "online_no_hacking"]


def _svg_sizes(svg: str):
    width = float(re.search(r'<svg[^>]* width="([0-9.]+)pt"', svg).group(1))
    fonts = [float(x) for x in re.findall(r"font-size: ([0-9.]+)px", svg)]
    return width, fonts


def test_per_panel_pdf_and_svg_at_column_width(sweep, tmp_path):
    """Bug 13: the figures were 1620x558 PNG composites with small text; there were no per-panel
    PDF/SVG files a paper could use. A two-column paper's column is ~3.3-3.5 in (< 252 pt); text
    smaller than 7 pt is unreadable in print."""
    run = sweep / "offline_256x8-seed0"
    write_report(run, tmp_path / "one")
    panels = tmp_path / "one" / "plots" / "offline_256x8-seed0"
    names = {"curves", "golden_vs_proxy", "loss"}
    assert {p.name for p in panels.iterdir()} == {f"{n}.{ext}" for n in names for ext in ("pdf", "svg")}
    for name in names:
        pdf = (panels / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF")
        box = [float(x) for x in re.search(rb"MediaBox \[ *([0-9. ]+)\]", pdf).group(1).split()]
        assert 150 < box[2] - box[0] <= 252, (name, box)
        width, fonts = _svg_sizes((panels / f"{name}.svg").read_text())
        assert 150 < width <= 252, name
        assert fonts and min(fonts) >= 7, (name, sorted(set(fonts)))  # text kept as text, >= 7 pt

    write_report([sweep], tmp_path / "all")
    sweep_panels = tmp_path / "all" / "plots" / "sweep"
    assert {p.stem for p in sweep_panels.glob("*.pdf")} == {"proxy_vs_step", "golden_vs_step", "golden_vs_proxy"}
    svg = (sweep_panels / "proxy_vs_step.svg").read_text()
    assert "PolyCollection" in svg  # the SE bands (fill_between) are drawn
    assert min(_svg_sizes(svg)[1]) >= 7


def test_sweep_bands_are_mean_and_se_over_seeds(sweep):
    """Bug 13: no error bands on the sweep comparison. The band of a condition is its mean over seeds
    ± the SE over seeds (SD / sqrt(n)), computed here from the metrics files."""
    from kdlab.analysis.runs import analyse
    from kdlab.report.plots import condition_band

    dirs = [sweep / "offline_256x8-seed0", sweep / "offline_256x8-seed1"]
    steps, mean, se = condition_band([analyse(d) for d in dirs], "proxy_fkl")
    tables = [{r["step"]: r["proxy_fkl"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
              for d in dirs]
    expected_steps = sorted(s for s in tables[0] if s > 0 and s in tables[1])
    assert steps.tolist() == expected_steps
    for i, s in enumerate(expected_steps):
        a, b = tables[0][s], tables[1][s]
        assert mean[i] == pytest.approx((a + b) / 2, rel=1e-12)
        assert se[i] == pytest.approx(abs(a - b) / 2, rel=1e-9)  # SD of two values / sqrt(2) = |a - b| / 2
    assert condition_band([analyse(dirs[0])], "proxy_fkl") is None


def test_step_zero_is_not_on_the_log_colour_bar(sweep):
    """Bug 13: the golden-vs-proxy colour bar (log scale) started at 10^0 and still plotted step 0
    (as step 1). Step 0 is now drawn apart; the coloured points are the steps > 0."""
    import matplotlib.pyplot as plt

    from kdlab.analysis.runs import analyse
    from kdlab.report import plots

    run = analyse(sweep / "offline_256x8-seed0")
    steps = run.metrics.steps
    assert steps[0] == 0
    fig, ax = plt.subplots()
    scatter = plots._u_panel(ax, run, fig)
    assert scatter is not None and len(scatter.get_offsets()) == int((steps > 0).sum())
    assert scatter.norm.vmin == steps[steps > 0].min()
    assert "step 0 (before training)" in ax.get_legend_handles_labels()[1]
    plt.close(fig)


def test_conditions_carry_final_golden_proxy_and_wall_time_over_seeds(sweep, tmp_path):
    """Issue 22's comparison columns: each condition's last golden and proxy as mean ± SE over its seeds, and
    stage 2's wall time from each run's done file, computed here from the metrics files themselves."""
    import shutil
    import statistics

    root = tmp_path / "copy"
    shutil.copytree(sweep, root)
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("offline_256x8"))
    for i, r in enumerate(runs):
        (r / "done.json").write_text(json.dumps({"steps": 1, "seconds_this_session": 10.0 + 4 * i}))
    write_report([root])
    summary = json.loads((root / "summary.json").read_text())
    final = {c["condition"]: c for c in summary["conditions"]}["offline 256×8"]["final"]
    last = [json.loads((r / "metrics.jsonl").read_text().splitlines()[-1]) for r in runs]
    from kdlab import record

    for col, name in (("golden", record.GOLDEN), ("proxy", record.PROXY)):
        vals = [row[name] for row in last]
        assert final[col]["mean"] == pytest.approx(statistics.fmean(vals))
        assert final[col]["se"] == pytest.approx(statistics.stdev(vals) / len(vals) ** 0.5)
    assert final["stage2_seconds"]["mean"] == pytest.approx(12.0)
    page = (root / "report.html").read_text()
    assert "final golden (mean ± SE over seeds)" in page and f"{final['golden']['mean']:.3f}" in page


def test_csv_tables_hold_every_evaluation_and_verdict(sweep, tmp_path):
    import csv

    out = tmp_path / "out"
    write_report(sweep, out)
    with open(out / "evals.csv", newline="") as fh:
        evals = list(csv.DictReader(fh))
    # Ground truth: each run's metrics.jsonl, read here with json, row by row.
    logs = {str(p.parent.relative_to(sweep)): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sweep.glob("*/metrics.jsonl")}
    assert len(logs) == 6 and len(evals) == sum(len(rows) for rows in logs.values())
    runs_in_csv = {}
    for row in evals:
        runs_in_csv.setdefault(row["path"], []).append(row)
    # paths are relative to the run directories' root when the report is written elsewhere
    assert {str((sweep / p).resolve().relative_to(sweep.resolve())) for p in runs_in_csv} == set(logs)
    for path, rows in runs_in_csv.items():
        truth = logs[str((sweep / path).resolve().relative_to(sweep.resolve()))]
        assert [int(r["step"]) for r in rows] == [t["step"] for t in truth]
        for r, t in zip(rows, truth):
            for key, value in t.items():
                cell = r[f"log.{key}" if key in ("run", "path", "condition") else key]
                if value is None:
                    assert cell == ""
                elif isinstance(value, float):
                    assert float(cell) == value  # repr round-trips exactly
                else:
                    assert cell == str(value)

    summary = json.loads((out / "summary.json").read_text())
    with open(out / "runs.csv", newline="") as fh:
        runs = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(runs) == 6 and set(runs) == set(runs_in_csv)  # the tables join on path
    runs = {str((out / p).resolve()): r for p, r in runs.items()}
    assert not any(c.endswith(".config.z") or ".config." in c for c in next(iter(runs.values())))
    for s in summary["runs"]:
        row = runs[s["path"]]
        assert row["condition"] == s["condition"] and row["golden.kind"] == s["golden"]["kind"]
        assert row["golden.detected"] == str(s["golden"]["detected"])
        assert float(row["golden.rise"]) == s["golden"]["rise"]
        assert row["proxy_deviation.detected"] == str(s["proxy_deviation"]["detected"])
        assert float(row["final.golden"]) == s["final"]["golden"]
    # the hacking runs are the ones summary.json calls hacking, now one pandas call away
    pd = pytest.importorskip("pandas")
    table = pd.read_csv(out / "runs.csv")
    assert sorted(table.loc[table["golden.kind"] == "hacking", "run"]) == sorted(
        s["run"] for s in summary["runs"] if s["golden"]["kind"] == "hacking")


def test_csv_keeps_a_log_key_named_like_an_identity_column(tmp_path):
    import csv

    rows = [{"step": s, "proxy_fkl": 2.0 / (s + 1), "run": "from-the-log", "note": {"a": s}} for s in range(6)]
    run = syn.write_run(tmp_path / "r", rows, {"seed": 0, "stage2": {"regime": "offline"}})
    write_report(run)
    with open(run / "evals.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["log.run"] for r in table] == ["from-the-log"] * 6 and [r["run"] for r in table] == ["r"] * 6
    assert [r["note.a"] for r in table] == [str(s) for s in range(6)]  # nested values flattened
    with open(run / "runs.csv", newline="") as fh:
        (single,) = list(csv.DictReader(fh))
    assert single["run"] == "r" and single["golden"] == ""  # no oracle: the golden block is one empty cell
    # a report in place: paths relative to the report's directory, the same in both tables (they join on it)
    assert single["path"] == table[0]["path"] == "."
