"""Concurrency and faults (issue 19): one process per run directory, a shared stage-1 cache built once by
runs started together, stale temporary directories cleaned, and injected write errors (a full disk) that
leave the last good state readable so that a resume completes the run exactly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab import record
from kdlab.config import load_config
from kdlab.pipeline.distill import run
from kdlab.pipeline.rundir import RunDirectoryInUse, hold_run_dir, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, name: str, *overrides: str):
    return load_config(TINY, [f"output_dir={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}", *overrides])


def quiet(cfg, **kw):
    return run(cfg, log=lambda m: None, progress=False, **kw)


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    with hold_run_dir(run_dir):  # this process is "running" there
        res = subprocess.run([sys.executable, "-m", "kdlab.cli", "run", str(TINY), "--no-report", "--out", str(run_dir),
                              "--set", f"cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "another kdlab process is running in" in res.stderr and f"pid {os.getpid()}" in res.stderr
    assert not (run_dir / record.CONFIG).exists() and not (tmp_path / "cache").exists(), "no work may start"


def test_the_lock_dies_with_its_process(tmp_path):
    lock = tmp_path / "r" / ".kdlab-run.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kdlab import record\n"
        f"with record.file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryInUse):
        with hold_run_dir(tmp_path / "r"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with hold_run_dir(tmp_path / "r"):  # a killed run does not leave its directory locked
        pass


BUILD = ("import sys\nfrom kdlab.config import load_config\nfrom kdlab.pipeline.world import build_world\n"
         "cfg = load_config(sys.argv[1], [f'cache_dir={sys.argv[2]}', 'threads=1'])\n"
         "w = build_world(cfg, log=lambda m: print(m, flush=True))\n"
         "print('loaded', w.directory.name, flush=True)\n")


def _build_together(cache: Path, n: int) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(TINY), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


def _check_built_once(cache: Path, results) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    builds = sum(r.stdout.count("building the world") for r in results)
    assert builds == 1, [r.stdout for r in results]
    names = {line.split()[1] for r in results for line in r.stdout.splitlines() if line.startswith("loaded")}
    assert len(names) == 1, names
    assert not list(cache.glob(".tmp-*")), "no temporary directory may be left behind"


def _start_study(tmp_path: Path):
    """`kdlab study` (in its own process group, as a shell starts a command) on four long runs of the quick demo world
    and two workers; returns the process, the run directories and the study's child processes once two runs are
    training (the other two wait for a worker)."""
    import yaml

    psutil = pytest.importorskip("psutil")
    quick = ROOT / "src" / "kdlab" / "pipeline" / "demo_configs" / "quick.yaml"
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(quick), "out": str(tmp_path / "out"), "world_seeds": [0], "seeds": [0, 1], "jobs": 2,
        "rows": {"t": {}}, "columns": {"a": {}},
        "set": {"stage2.steps": 1_000_000, "stage2.checkpoint_every": 1_000_000, "eval.num_points": 2}}))
    study = subprocess.Popen([sys.executable, "-m", "kdlab.cli", "study", str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(runs := sorted((tmp_path / "out").glob(f"*/*/seed-*/{record.METRICS}"))) < 2:  # two evaluated step 0
        if study.poll() is not None or time.time() > deadline:
            study.kill()
            raise AssertionError(f"the study did not start its runs:\n{study.communicate()[1][-3000:]}")
        time.sleep(0.5)
    return study, [r.parent for r in runs], psutil.Process(study.pid).children(recursive=True)


def _check_gone(children, run_dirs) -> None:
    import psutil

    _, alive = psutil.wait_procs(children, timeout=60)
    for p in alive:
        p.kill()
    assert alive == [], "still running after their parent stopped"
    for d in run_dirs:  # the stopped runs left their directories unlocked
        with hold_run_dir(d):
            pass


def test_a_killed_study_takes_its_workers_with_it(tmp_path):
    """Killing `kdlab study` (SIGKILL: no cleanup in the parent) used to leave its workers training and holding their
    run directories' locks, so that the study run again found its runs in use."""
    study, run_dirs, children = _start_study(tmp_path)
    assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
    study.kill()
    study.communicate()
    _check_gone(children, run_dirs)


def test_ctrl_c_stops_a_study_at_once_with_a_message(tmp_path):
    """Ctrl-C (SIGINT to the process group) used to stop only the running runs: ProcessPoolExecutor's workers report
    the interrupt and start the next run, and the parent waited for every run of the study."""
    study, run_dirs, children = _start_study(tmp_path)
    os.killpg(study.pid, signal.SIGINT)
    try:
        _, err = study.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(study.pid, signal.SIGKILL)
        raise AssertionError("kdlab study still running 60 s after Ctrl-C") from None
    assert study.returncode == 130 and "kdlab: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert "leaked" not in err, err[-3000:]  # the workers ended cleanly (multiprocessing's tracker had nothing left)
    _check_gone(children, run_dirs)


def test_four_processes_sharing_a_cache_build_the_world_once(tmp_path):
    _check_built_once(tmp_path / "cache", _build_together(tmp_path / "cache", 4))


@pytest.mark.slow
def test_four_processes_sharing_a_cache_twenty_times_in_a_row(tmp_path):
    for i in range(20):
        cache = tmp_path / f"cache-{i}"
        _check_built_once(cache, _build_together(cache, 4))


def test_stale_temporary_directories_of_a_killed_build_are_removed(tmp_path):
    from kdlab.pipeline import world_cache
    from kdlab.pipeline.world import build_world

    cfg = tiny(tmp_path, "r")
    root = world_cache.entry_dir(cfg)
    stale = root.parent / f".tmp-{root.name}-killed"
    (stale / "teacher").mkdir(parents=True)
    build_world(cfg, log=lambda m: None)
    assert not stale.exists() and world_cache.is_built(root)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    return tmp, read_metrics(quiet(tiny(tmp, "clean", "stage2.checkpoint_every=8")) / record.METRICS)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_resume_completes(clean_run, monkeypatch):
    tmp, clean = clean_run
    import kdlab.pipeline.rundir as rundir

    real, calls = rundir.save_file, {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the model file of the second checkpoint (step 16)
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(rundir, "save_file", full_disk)
    cfg = tiny(tmp, "full-disk", "stage2.checkpoint_every=8")
    with pytest.raises(OSError, match="No space left"):
        quiet(cfg)
    ckpts = Path(cfg.output_dir) / record.CHECKPOINTS
    assert rundir.latest_checkpoint(ckpts).name == "step-00000008"
    rundir.read_checkpoint(rundir.latest_checkpoint(ckpts))  # readable
    rows = read_metrics(Path(cfg.output_dir) / record.METRICS)  # readable, up to the failed checkpoint
    assert rows == [r for r in clean if r["step"] <= 16]
    monkeypatch.setattr(rundir, "save_file", real)
    quiet(cfg, resume=True)
    assert read_metrics(Path(cfg.output_dir) / record.METRICS) == clean


def test_a_full_disk_while_appending_metrics_keeps_the_rows_before_and_resume_completes(clean_run, monkeypatch):
    tmp, clean = clean_run
    real, calls = record.append_row, {"n": 0}

    def full_disk(path, row):
        calls["n"] += 1
        if calls["n"] == 4:
            with open(path, "a") as f:
                f.write(json.dumps(row)[:20])  # half a line reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, row)

    monkeypatch.setattr(record, "append_row", full_disk)
    cfg = tiny(tmp, "full-disk-metrics", "stage2.checkpoint_every=8")
    with pytest.raises(OSError, match="No space left"):
        quiet(cfg)
    assert read_metrics(Path(cfg.output_dir) / record.METRICS) == clean[:3]  # the torn line is not a row
    monkeypatch.setattr(record, "append_row", real)
    quiet(cfg, resume=True)
    assert read_metrics(Path(cfg.output_dir) / record.METRICS) == clean


def test_resume_falls_back_when_the_latest_checkpoint_is_truncated(clean_run):
    tmp, clean = clean_run
    from kdlab.pipeline.rundir import latest_checkpoint

    cfg = tiny(tmp, "truncated", "stage2.checkpoint_every=8")
    run_dir = quiet(cfg)
    latest = latest_checkpoint(run_dir / record.CHECKPOINTS)
    assert latest.name == "step-00000024" and (run_dir / record.CHECKPOINTS / "step-00000016").is_dir()
    (run_dir / record.DONE).unlink()  # as if killed just after the last checkpoint
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    lines = []
    run(cfg, resume=True, log=lines.append, progress=False)
    assert any("trying the previous checkpoint" in line for line in lines), lines
    assert any("resumed" in line and "step 16" in line for line in lines), lines
    assert read_metrics(run_dir / record.METRICS) == clean


def test_a_failed_report_write_keeps_the_previous_report(clean_run, monkeypatch):
    tmp, _ = clean_run
    from kdlab import report as report_module

    run_dir = tmp / "clean"
    first = report_module.write_report([run_dir]).read_text()

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report_module, "_atomic_write", full_disk)
    with pytest.raises(OSError):
        report_module.write_report([run_dir])
    assert (run_dir / record.REPORT).read_text() == first
    json.loads((run_dir / record.SUMMARY).read_text())


def test_a_torn_teacher_golden_file_is_rebuilt(clean_run):
    tmp, _ = clean_run
    cfg = tiny(tmp, "torn", "stage2.steps=2", "eval.num_points=2")
    quiet(cfg)
    shared = next((tmp / "cache").glob("stage1-*/eval-*"))
    expected = json.loads((shared / "teacher_golden.json").read_text())
    (shared / "teacher_golden.json").write_text('{"teacher_golden_fkl": 1.2')  # torn by a kill mid-write
    cfg2 = tiny(tmp, "torn-2", "stage2.steps=2", "eval.num_points=2")
    quiet(cfg2)
    assert json.loads((shared / "teacher_golden.json").read_text()) == expected
    assert json.loads((Path(cfg2.output_dir) / record.WORLD).read_text())["teacher_golden_fkl"] == pytest.approx(
        expected["teacher_golden_fkl"])
