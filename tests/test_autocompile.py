"""stage2.compile_* = 'auto' (kdlab.pipeline.autocompile): the decision from step times and costs, the record of
what a compile measured, and a real run that compiles when its record says it pays."""

import json
import os
from pathlib import Path

import pytest
import torch

from kdlab.pipeline import autocompile as ac


class FakeClock:
    """Steps of given durations: `step(d)` advances the clock by d between start_step and end_step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def drive(auto, clock, durations, total):
    for i, d in enumerate(durations):
        auto.start_step()
        clock.now += d
        auto.end_step(total - i - 1)


def make(tmp_path, key="w", **kw):
    calls, lines = [], []
    clock = FakeClock()
    auto = ac.AutoCompile(key, ("student",), tmp_path, calls.append, lines.append, clock=clock, **kw)
    return auto, clock, calls, lines


def test_decide_compares_the_time_saved_with_the_compile_cost():
    assert ac.decide(1000, 0.1, 10.0, 0.15).compile  # 15 s saved > 10 s
    assert not ac.decide(100, 0.1, 10.0, 0.15).compile  # 1.5 s saved
    assert not ac.decide(1000, 0.1, 15.0, 0.15).compile  # equal: not worth it


def test_a_short_run_stays_eager_and_writes_no_record(tmp_path):
    auto, clock, calls, lines = make(tmp_path)
    drive(auto, clock, [0.5, 0.5] + [0.01] * 20, total=22)  # 15 steps left x 10 ms x 15% << 20 s
    assert calls == [] and auto.decision is not None and not auto.decision.compile
    assert "eager" in lines[0] and "priors" in lines[0]
    assert not (tmp_path / ac.RECORD).exists()


def alternate(eager: float, compiled: float) -> list[float]:
    """The measurement's step durations: eager first, then compiled, PROBE of each."""
    return [eager, compiled] * ac.PROBE


def test_a_long_run_compiles_measures_and_records(tmp_path):
    auto, clock, calls, lines = make(tmp_path)
    # warm-up (untimed), 5 eager steps of 100 ms, the compile step (100 ms + 12 s), then eager and compiled steps
    # alternating (100 and 80 ms), then compiled ones
    steps = [9.0, 9.0] + [0.1] * 5 + [12.1] + alternate(0.1, 0.08)
    drive(auto, clock, steps[:-1], total=10_000)
    assert auto.state == "measuring"
    drive(auto, clock, steps[-1:], total=10_000)
    # the choice is final after SETTLED_AFTER steps (the benchmark's *_auto rows start timing after it)
    assert auto.state == "done" and len(steps) == ac.SETTLED_AFTER
    drive(auto, clock, [0.08] * 10, total=10_000)
    # compile; the measurement switches eager before each eager step and back; compiled for the rest
    assert calls == [True] + [False, True] * ac.PROBE + [True]
    rec = json.loads((tmp_path / ac.RECORD).read_text())["w"]
    assert rec["compile_s"] == pytest.approx(12.0, abs=1e-6)
    assert rec["saving"] == pytest.approx(0.2, abs=1e-6)
    # the next run of the same workload decides from the measurement, not the priors
    auto2, clock2, calls2, lines2 = make(tmp_path)
    assert (auto2.cost_s, auto2.saving) == (pytest.approx(12.0), pytest.approx(0.2))
    drive(auto2, clock2, [0.1] * 7, total=400)  # 393 x 0.1 x 0.2 = 7.9 s < 12 s: eager this time
    assert calls2 == [] and "measured by an earlier run" in lines2[0]


def test_a_compile_that_does_not_speed_up_steps_is_undone(tmp_path):
    auto, clock, calls, lines = make(tmp_path)
    drive(auto, clock, [0.1] * 7 + [20.0] + alternate(0.1, 0.12), total=100_000)
    assert calls[-1] is False and "no gain: eager" in lines[-1]
    assert json.loads((tmp_path / ac.RECORD).read_text())["w"]["saving"] == pytest.approx(-0.2, abs=1e-6)


def test_the_saving_is_measured_on_alternating_steps_so_a_host_that_slows_down_does_not_hide_it(tmp_path):
    """Injected: the host gets 30 % slower right after the eager probe (another process starts). The compile saves
    20 % (compiled 104 ms against eager 130 ms on the slower host); compiled steps compared with the earlier eager
    probe (100 ms) would have measured -4 % and undone the compile."""
    auto, clock, calls, lines = make(tmp_path)
    drive(auto, clock, [0.1] * 7 + [12.1] + alternate(0.13, 0.104) + [0.104] * 3, total=100_000)
    rec = json.loads((tmp_path / ac.RECORD).read_text())["w"]
    assert rec["saving"] == pytest.approx(0.2, abs=1e-6) and calls[-1] is True and "kept" in lines[-1]


def test_the_prior_cost_counts_each_model_compiled(tmp_path):
    both = ac.AutoCompile("k", ("student", "teacher"), tmp_path, lambda on: None, lambda m: None)
    assert both.cost_s == 2 * ac.PRIOR_COST_S


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_the_config_takes_auto_or_a_bool(value, expected):
    from kdlab.config import build_config

    assert build_config({}, [f"stage2.compile_student={value}"]).stage2.compile_student == expected
    assert build_config({}, []).stage2.compile_teacher == "auto"


def test_a_run_compiles_when_its_record_says_it_pays_and_matches_an_eager_run(tmp_path):
    """A tiny real run, live teacher: with a record of a cheap, useful compile the run switches to compiled views
    of the student and the teacher after its probe (the log says so), ends with the eager run's losses (same
    weights, float rounding apart), and replaces the record with its own measurement; the eager run (compile
    off) writes no record."""
    from kdlab import record
    from kdlab.config import load_config
    from kdlab.pipeline.distill import run
    from kdlab.pipeline.rundir import read_metrics

    torch._dynamo.reset()  # no compiled code from earlier tests in this process: this run compiles its own
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    # 2 warm-up + 5 probe steps eager, the compile, 10 alternating measured steps, 2 compiled ones
    common = [f"cache_dir={tmp_path / 'cache'}", "stage2.steps=20", "eval.num_points=2", "stage2.offline.targets=none"]
    eager = run(load_config(tiny, [f"output_dir={tmp_path / 'eager'}", "stage2.compile_student=false",
                                   "stage2.compile_teacher=false", *common]), log=lambda m: None, progress=False)
    assert not (tmp_path / "cache" / ac.RECORD).exists()
    cfg = load_config(tiny, [f"output_dir={tmp_path / 'auto'}", *common])
    # live teacher over 64 prompts used 3-5 times each: the prompt cache is on, and part of the key
    key = ac.workload_key(cfg, cfg.stage2.regime, ("student", "teacher"), prompt_cache=True)
    (tmp_path / "cache" / ac.RECORD).write_text(json.dumps({key: {"compile_s": 0.0, "saving": 0.5}}))
    lines = []
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    auto = run(cfg, log=lines.append, progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the switch compiled something
    assert any("[compile auto] student, teacher: compile" in m for m in lines), lines
    assert any("[compile auto] measured" in m for m in lines), lines
    rec = json.loads((tmp_path / "cache" / ac.RECORD).read_text())[key]
    assert rec["compile_s"] > 0.0 and "compiled_step_s" in rec
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / ac.INDUCTOR_DIR)
    a, b = read_metrics(eager / record.METRICS), read_metrics(auto / record.METRICS)
    assert [r[record.STEP] for r in a] == [r[record.STEP] for r in b]
    for ra, rb in zip(a, b):
        assert rb[record.TRAIN_LOSS] == pytest.approx(ra[record.TRAIN_LOSS], rel=1e-3, abs=1e-5) \
            if ra[record.TRAIN_LOSS] is not None else rb[record.TRAIN_LOSS] is None


def test_a_compile_that_fails_falls_back_to_eager_and_retries_the_step(tmp_path, monkeypatch):
    """'auto' is the default, so a compiler that raises must not end the run: the failing step is retried eagerly,
    the run finishes with the eager run's losses, and the log says what happened. An error in any other step is
    still raised."""
    from kdlab import record
    from kdlab.config import load_config
    from kdlab.models import LM
    from kdlab.pipeline import distill
    from kdlab.pipeline.rundir import read_metrics

    class Broken(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, *a, **k):
            raise RuntimeError("InductorError: C++ compile failed")

    monkeypatch.setattr(distill, "compiled", lambda lm: LM(Broken(lm.hf), lm.tokenizer))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    common = [f"cache_dir={tmp_path / 'cache'}", "stage2.steps=12", "eval.num_points=2", "stage2.offline.targets=none"]
    eager = distill.run(load_config(tiny, [f"output_dir={tmp_path / 'eager'}", "stage2.compile_student=false",
                                           "stage2.compile_teacher=false", *common]), log=lambda m: None, progress=False)
    cfg = load_config(tiny, [f"output_dir={tmp_path / 'auto'}", *common])
    # live teacher over 64 prompts used 3-5 times each: the prompt cache is on, and part of the key
    key = ac.workload_key(cfg, cfg.stage2.regime, ("student", "teacher"), prompt_cache=True)
    (tmp_path / "cache" / ac.RECORD).write_text(json.dumps({key: {"compile_s": 0.0, "saving": 0.5}}))
    lines = []
    auto = distill.run(cfg, log=lines.append, progress=False)
    assert any("the compile failed (RuntimeError: InductorError" in m for m in lines), lines
    a, b = read_metrics(eager / record.METRICS), read_metrics(auto / record.METRICS)
    def losses(rows):
        return [r[record.TRAIN_LOSS] for r in rows if r[record.TRAIN_LOSS] is not None]

    assert len(losses(b)) == len(losses(a)) > 0
    assert losses(b) == pytest.approx(losses(a), rel=1e-5, abs=1e-6)
    # an explicit compile that fails is the user's error to see
    with pytest.raises(RuntimeError, match="InductorError"):
        distill.run(load_config(tiny, [f"output_dir={tmp_path / 'forced'}", "stage2.compile_student=true", *common]),
                    log=lambda m: None, progress=False)


def test_the_workload_key_is_the_step_cost_not_the_seeds():
    """Runs that differ only in their seeds or stage-1 budgets share one measurement; a bigger student does not."""
    from kdlab.config import load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

    def key(*over):
        cfg = load_config(tiny, list(over))
        return ac.workload_key(cfg, cfg.stage2.regime, ("student",))

    assert key() == key("world.seed=7", "seed=3", "stage1.teacher.steps=11")
    assert key() != key("models.student.hidden_size=48")
    assert key() != key("stage2.batch_size=4")
    # the prompt cache changes a live-teacher step's cost; 'auto' turns it on by run length, so the key says whether
    # it is on, not the setting
    cfg = load_config(tiny, [])
    assert ac.workload_key(cfg, "offline", ("teacher",), prompt_cache=True) != ac.workload_key(cfg, "offline", ("teacher",))
