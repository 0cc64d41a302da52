"""Bad input through the real CLI (issue 19): one clear message naming the input and what to do, a non-zero
exit code, no traceback, and no heavy work first. Each case below gave a traceback, a silent acceptance or an
unclear message before issue 19."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def kdlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def refused(res, needle: str) -> None:
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert "Traceback" not in text, text
    assert needle in text, text


@pytest.fixture
def files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "twice.yaml").write_text("seed: 1\nstage2:\n  steps: 4\n  lr: 0.1\n  steps: 5\n")
    (tmp_path / "a_file").write_text("not a directory")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16}))
    return tmp_path


CASES = {
    "binary config": (["run", "{d}/binary.yaml"], "is not a text file"),
    "duplicate YAML key": (["run", "{d}/twice.yaml", "--out", "{d}/r"], "key 'steps' is given twice"),
    "hf folder without weights": (["run", TINY, "--set", "models.student=hf:{d}/weightless", "--out", "{d}/r"],
                                  "has config.json but no weights"),
    "plain model name": (["run", TINY, "--set", "models.student=llama-tiny", "--out", "{d}/r"],
                         "'llama-tiny' is neither an architecture"),
    "out under a file": (["run", TINY, "--out", "{d}/a_file/run"], "is a file, so no directory can be made under it"),
    "out is a file": (["run", TINY, "--out", "{d}/a_file"], "is a file, not a directory"),
    "empty out": (["run", TINY, "--out", ""], "--out is empty"),
    "empty out with =": (["run", TINY, "--out="], "--out is empty"),
    "resume without a run": (["run", TINY, "--resume", "--out", "{d}/no-such-run"], "holds no run"),
    "empty grid axis": (["sweep", TINY, "--grid", "seed=", "--out", "{d}/s"], "has no values"),
    "duplicate grid axis": (["sweep", TINY, "--grid", "seed=1", "--grid", "seed=2", "--out", "{d}/s"],
                            "names 'seed' on two axes"),
    "sweep out under a file": (["sweep", TINY, "--grid", "seed=1,2", "--out", "{d}/a_file/s"], "is a file"),
    # Not writable even for root (a virtual file system), where a chmod'ed directory would not stop root.
    "out not writable": (["run", TINY, "--out", "/proc/kdlab-run"], "cannot write in /proc"),
    "report in place not writable": (["report", "/proc/self"], "kdlab report"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gets_one_clear_message_before_any_work(files, case):
    args, needle = CASES[case]
    res = kdlab(*[a.replace("{d}", str(files)) for a in args], cwd=files)
    refused(res, needle)
    # No work started: no run directory and no stage-1 cache (the world would be built there first).
    assert not (files / "r" / "config.yaml").exists() and not (files / ".kdlab-cache").exists()


def test_a_cuda_device_without_cuda_is_refused_before_any_work(files):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(kdlab("run", TINY, "--set", "device=cuda", "--out", str(files / "r")), "torch sees no CUDA device")


def test_report_into_an_unwritable_place_says_so(files, tmp_path):
    run = tmp_path / "m.jsonl"
    run.write_text("".join(json.dumps({"step": s, "proxy_fkl": 1.0 / (s + 1)}) + "\n" for s in range(0, 60, 5)))
    for out, needle in ((files / "a_file" / "rep", "is a file"), (Path("/proc/kdlab-report"), "kdlab report")):
        refused(kdlab("report", str(files), "--out", str(out)), needle)


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_detect_reports_non_finite_rows_and_refuses_a_column_without_finite_values(tmp_path, bad):
    rows = [{"step": s, "proxy_fkl": 5.0 * (s + 1) ** -0.3, "proxy_fkl_se": 0.01} for s in range(0, 400, 10)]
    rows[7]["proxy_fkl"] = float(bad.replace("Infinity", "inf"))
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = kdlab("detect", str(path))
    assert res.returncode == 0, res.stderr
    assert "1 evaluation(s) with NaN or Infinity in proxy_fkl were left out (step(s) 70)" in res.stdout
    for r in rows:
        r["proxy_fkl"] = float("nan")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(kdlab("detect", str(path)), "column 'proxy_fkl' has no finite values")


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """The last line of defence in `kdlab.cli.main`: an error no verb anticipated (injected: the analysis raises
    a RuntimeError) is one line naming the verb, with exit code 1; --debug shows the traceback."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "proxy_fkl": 1.0}) + "\n" for s in range(0, 50, 5)))
    script = ("import sys, kdlab.analysis.runs as r\n"
              "def boom(*a, **k): raise RuntimeError('injected failure')\n"
              "r.analyse = boom\n"
              "from kdlab.cli import main\n"
              "sys.argv = ['kdlab', *sys.argv[1:]]\n"
              "main()\n")
    res = subprocess.run([sys.executable, "-c", script, "detect", str(path)], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "kdlab detect: error: RuntimeError: injected failure" in res.stderr
    assert "--debug" in res.stderr
    res = subprocess.run([sys.executable, "-c", script, "detect", str(path), "--debug"], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr and "injected failure" in res.stderr
