"""The sequential proxy-only detector (issue 16) against curves built here, from their formulas
(not from kdlab.analysis.synthetic, whose families chose its thresholds): departures at early and
late onsets, learning-rate schedules on healthy curves, online == offline, and bad input."""

import json

import numpy as np
import pytest
import torch

from kdlab.analysis.sequential import SequentialConfig, SequentialProxyDetector, detect_proxy_sequential, lr_time

def detect_cli(*args):
    """`kdlab detect` under typer's test runner (as tests/test_detect_cli.py runs it)."""
    import typer
    from typer.testing import CliRunner

    from kdlab.cli import detect

    app = typer.Typer()
    app.command()(detect.command)
    return CliRunner().invoke(app, [str(a) for a in args])


STEPS = np.concatenate([[0], np.unique(np.round(np.geomspace(10, 10_000, 26)).astype(int))])


def frac_step(frac, steps=STEPS):
    """The evaluation nearest to `frac` of the log-step range (steps > 0)."""
    s = steps[steps > 0]
    target = np.exp(np.log(s[0]) + frac * (np.log(s[-1]) - np.log(s[0])))
    return int(s[np.argmin(np.abs(np.log(s) - np.log(target)))])


def departing(onset, departure, T=None, alpha=0.5, amp=20.0):
    """amp·T^(−α), then above that line by `departure`·u in log units, u = log-time fraction from the
    onset to the end (a hinge on log-log axes)."""
    T = np.maximum(STEPS if T is None else T, 1e-9).astype(float)
    T_on = np.interp(onset, STEPS, T)
    u = np.clip(np.log(T / T_on) / np.log(T[-1] / T_on), 0, None)
    return amp * T**-alpha * np.exp(departure * u)


def observe(y, sigma, seed):
    values = y * np.exp(sigma * np.random.default_rng(seed).standard_normal(len(y)))
    return values, sigma * values


@pytest.mark.parametrize("frac", [0.45, 0.6, 0.75])
def test_departure_is_found_wherever_it_starts_and_the_interval_holds_the_onset(frac):
    """Onsets inside the old detector's fit window (15–65 % of the range) and after it. (At 0.30 the
    calibrated detector misses most departures: an early flattening is what a plateau or a dying
    transient looks like; docs/LOG.md, issue 16.)"""
    onset = frac_step(frac)
    y, se = observe(departing(onset, 0.3), 0.01, seed=int(frac * 100))
    v = detect_proxy_sequential(STEPS, y, se)
    assert v.detected and v.time_axis == "step"
    lo, hi = v.onset_interval
    i = lambda s: int(np.flatnonzero(STEPS == s)[0])  # noqa: E731
    assert i(lo) - 1 <= i(onset) <= i(hi) + 1, (onset, v.onset_interval)
    assert v.alarm_step > onset  # seen after it began, not before
    assert lo <= v.onset_step <= hi


def test_healthy_power_laws_and_speed_ups_do_not_fire():
    for seed in range(10):
        y, se = observe(20 * np.maximum(STEPS, 1) ** -0.4, 0.02, seed)
        assert not detect_proxy_sequential(STEPS, y, se).detected, seed
    # A late speed-up is the mirror image of a departure: the test is one-sided.
    faster = departing(frac_step(0.5), -0.4)
    y, se = observe(faster, 0.01, 0)
    v = detect_proxy_sequential(STEPS, y, se)
    assert not v.detected
    # ... and the same departure upwards fires: only the direction differs.
    y, se = observe(departing(frac_step(0.5), 0.4), 0.01, 0)
    assert detect_proxy_sequential(STEPS, y, se).detected


def cosine(total, floor=0.0, warm=0):
    t = np.arange(total)
    ramp = np.minimum(1.0, (t + 1) / warm) if warm else np.ones(total)
    return ramp * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * t / total)))


def step_decay(total):
    t = np.arange(total)
    return np.where(t < total // 2, 1.0, np.where(t < 3 * total // 4, 0.1, 0.01))


@pytest.mark.parametrize("name,rate", [("cosine", cosine(10_000, warm=300)), ("step", step_decay(10_000))])
def test_a_decaying_schedule_is_not_a_departure_in_learning_rate_time(name, rate):
    """A healthy run whose law holds in cumulative learning rate T = Σ η slows down *per step* when
    the rate decays: on the step axis that looks like a departure (it fires), in T it does not."""
    lr = 3e-4 * rate
    lr_sum = np.concatenate([[0.0], np.cumsum(lr)])[STEPS]
    y, se = observe(20 * np.maximum(lr_sum / 3e-4, 1e-3) ** -0.5, 0.01, seed=1)
    assert detect_proxy_sequential(STEPS, y, se).detected, "the step axis should misread the schedule"
    v = detect_proxy_sequential(STEPS, y, se, lr_sum=lr_sum)
    assert not v.detected and v.time_axis == "lr_sum"
    # The rate logged at each evaluation (as HF trainers log `learning_rate`), integrated by trapezoid.
    lr_at_evals = np.concatenate([[lr[0]], lr[STEPS[1:] - 1]])
    v = detect_proxy_sequential(STEPS, y, se, lr=lr_at_evals)
    assert v.time_axis == "lr_trapezoid"
    if name == "cosine":  # smooth: the trapezoid rule follows it; a step decay between evaluations is smeared
        assert not v.detected
    # A departure on top of the schedule is still found in learning-rate time.
    y2, se2 = observe(departing(frac_step(0.45), 0.3, T=lr_sum / 3e-4), 0.01, seed=2)
    assert detect_proxy_sequential(STEPS, y2, se2, lr_sum=lr_sum).detected


def test_lr_time_trapezoid_is_exact_for_a_linear_rate_and_rejects_negative_rates():
    steps = np.array([0, 10, 30, 100])
    lr = 1.0 + 0.01 * steps  # linear in the step: the trapezoid rule is exact
    tau, axis = lr_time(steps, lr=lr)
    exact = steps + 0.005 * steps**2
    assert axis == "lr_trapezoid" and tau == pytest.approx(exact)
    tau, axis = lr_time(steps, lr_sum=exact, lr=lr)
    assert axis == "lr_sum" and tau == pytest.approx(exact)
    assert lr_time(steps)[1] == "step"
    with pytest.raises(ValueError, match="lr_sum holds a negative"):
        lr_time(steps, lr_sum=[0, 1, -2, 3])


def test_online_one_evaluation_at_a_time_equals_offline():
    T = np.concatenate([[0.0], np.cumsum(cosine(10_000, floor=0.05, warm=200))])[STEPS]
    y, se = observe(departing(frac_step(0.4), 0.25, T=T), 0.015, seed=5)
    se[7] = np.nan  # one evaluation without an SE: estimated from the scatter, online as offline
    det = SequentialProxyDetector(time_axis="lr_sum")
    seen = []
    for s, v, e, t in zip(STEPS, y, se, T * 1e-3):
        seen.append(det.update(s, v, e, t))
    online = det.verdict().to_dict()
    offline = detect_proxy_sequential(STEPS, y, se, lr_sum=T * 1e-3).to_dict()
    assert online == offline and online["detected"]
    first = seen.index(True)
    assert STEPS[first] == online["alarm_step"] and all(seen[first:])  # an alarm stays raised
    # The verdict on a prefix is the online state at that point: no look-ahead.
    k = first - 1
    assert not detect_proxy_sequential(STEPS[: k + 1], y[: k + 1], se[: k + 1], lr_sum=T[: k + 1] * 1e-3).detected


def test_monitor_verdict_equals_kdlab_detect_on_its_jsonl(tmp_path):
    """The monitor feeds its measurements to the detector one at a time (with the learning rate it
    summed); `kdlab detect --json` on the rows it wrote gives the same verdict."""
    from transformers import LlamaForCausalLM

    from kdlab.integrations.monitor import TeacherHackingMonitor
    from kdlab.models import tiny_llama_config

    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2))
    monitor = TeacherHackingMonitor(teacher, [[3, 4]], max_new_tokens=2, detect_proxy=None)  # the sequential one
    lr = 1e-3 * cosine(10_000, warm=100)
    lr_sum = np.concatenate([[0.0], np.cumsum(lr)])[STEPS]
    y, se = observe(departing(frac_step(0.35), 0.3, T=lr_sum), 0.01, seed=9)
    rows, fired = [], []
    for s, v, e, t in zip(STEPS, y, se, lr_sum):
        row = {"step": int(s), "proxy_fkl": float(v), "proxy_fkl_se": float(e), "lr": None, "lr_sum": float(t)}
        monitor.history.append(row)
        fired.append(monitor._detect())
        rows.append(row)
    # The alarm names the detector that raised it (it said proxy_deviation, the fixed-window one).
    assert {v["detector"] for v in fired if v["detected"]} == {"proxy_sequential"}
    path = tmp_path / "teacher_hacking_monitor.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = detect_cli(path, "--json")
    assert result.exit_code == 0, result.output
    offline = json.loads(result.output)["proxy_sequential"]
    online = monitor.proxy_detector.verdict().to_dict()
    assert online["detected"] and online == offline


def test_bad_learning_rate_column_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": int(s), "proxy_fkl": 5.0 / (s + 1), "learning_rate": -1e-3 if s == STEPS[5] else 1e-3} for s in STEPS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = detect_cli(path)
    assert result.exit_code == 2 and "learning_rate" in result.output and str(path) in result.output
    rows[3]["lr_sum"] = "fast"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = detect_cli(path)
    assert result.exit_code == 2 and "'lr_sum'" in result.output and "line 4" in result.output


def test_config_is_validated_and_steps_must_increase():
    with pytest.raises(ValueError, match="warmup_points"):
        SequentialConfig(warmup_points=2)
    with pytest.raises(ValueError, match="law"):
        SequentialConfig(law="floor")
    det = SequentialProxyDetector()
    det.update(10, 1.0)
    with pytest.raises(ValueError, match="increasing step order"):
        det.update(5, 1.0)


def test_kdlab_learning_rate_sum_matches_the_schedule():
    from kdlab.config import RunConfig
    from kdlab.pipeline.distill import lr_at, lr_sum_at

    cfg = RunConfig()
    cfg.stage2.warmup_steps, cfg.stage2.lr = 7, 2e-3
    for step in (0, 1, 5, 7, 8, 40):
        assert lr_sum_at(step, cfg) == pytest.approx(sum(lr_at(t, cfg) for t in range(step)))


@pytest.mark.parametrize("schedule, final", [("linear", 0.0), ("cosine", 0.0), ("cosine", 0.1)])
def test_decaying_schedules_match_transformers(schedule, final):
    """After the warm-up, kdlab's decays are transformers' schedulers (an independent implementation);
    the optimizer of a run is set from lr_at, and lr_sum_at sums it."""
    import transformers
    from kdlab.config import RunConfig
    from kdlab.pipeline.distill import lr_at, lr_sum_at

    cfg = RunConfig()
    cfg.stage2.steps, cfg.stage2.warmup_steps, cfg.stage2.lr = 50, 5, 2e-3
    cfg.stage2.lr_schedule, cfg.stage2.lr_final_ratio = schedule, final
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.stage2.lr)
    if schedule == "linear":
        sched = transformers.get_linear_schedule_with_warmup(opt, 5, 50)
    else:
        sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 5, 50, min_lr_rate=final)
    hf = []
    for _ in range(50):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(t, cfg) for t in range(50)]
    assert ours[5:] == pytest.approx(hf[5:], rel=1e-12, abs=1e-15)
    assert ours[:5] == pytest.approx([2e-3 * (t + 1) / 5 for t in range(5)])
    for step in (0, 3, 5, 27, 50):
        assert lr_sum_at(step, cfg) == pytest.approx(sum(ours[:step]))


def test_monitor_sums_the_rate_of_every_optimizer_step():
    """The monitor's time axis: at each step the optimizer's rate before the step (the scheduler moves
    it after), summed over the steps taken; logged as lr_sum in its rows."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from kdlab.integrations.monitor import TeacherHackingMonitor
    from kdlab.models import tiny_llama_config

    monitor = TeacherHackingMonitor(LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2)), [[3, 4]], max_new_tokens=2)
    monitor.steps = [0, 50]  # no measurement on the steps below
    rates = 1e-3 * cosine(40, warm=5)
    for step, rate in enumerate(rates, start=1):
        optimizer = SimpleNamespace(param_groups=[{"lr": float(rate)}])
        monitor.on_step_begin(None, SimpleNamespace(global_step=step - 1), None, optimizer=optimizer)
        monitor.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert monitor.lr_sum == pytest.approx(rates.sum())


def test_run_summary_and_text_output_carry_the_sequential_verdict(tmp_path):
    """summary.json and sweep summaries gain `proxy_sequential` (the older keys stay); `kdlab detect`
    prints its line with the time axis it used."""
    from kdlab.analysis import analyse_run

    lr_sum = 1e-3 * STEPS
    y, se = observe(departing(frac_step(0.6), 0.4), 0.01, seed=3)
    rows = [{"step": int(s), "proxy_fkl": float(v), "proxy_fkl_se": float(e), "lr_sum": float(t)}
            for s, v, e, t in zip(STEPS, y, se, lr_sum)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = analyse_run(run)
    assert {"golden", "proxy_deviation", "train_proxy_deviation"} <= set(summary)
    seq = summary["proxy_sequential"]
    assert seq == detect_proxy_sequential(STEPS, y, se, lr_sum=lr_sum).to_dict() and seq["detected"]
    assert "sequential" not in summary["verdict"]  # experimental: in the JSON and detect's lines, not the verdict
    out = detect_cli(run / "metrics.jsonl").output
    assert "proxy-only, sequential, EXPERIMENTAL (proxy_fkl, lr_sum time): DEPARTS from step" in out
