"""The stage-2 controller (issue 20): each policy on a tiny world, with a detector that fires at a known
evaluation, against ground truth the controller does not compute (the sampler's own row count, the
batches the loop draws, an independent run's weights, the detectors called directly)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kdlab.data.offline as offline
import kdlab.pipeline.controller as controller
from kdlab import record
from kdlab.config import ConfigError, load_config
from kdlab.pipeline.distill import make_source, run, source_params
from kdlab.pipeline.rundir import read_metrics
from kdlab.pipeline.world import build_world

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
N = 64 * 2  # the tiny config's offline dataset: 64 prompts x 2 samples


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cache directory for the module: stage 1 is built once."""
    return tmp_path_factory.mktemp("controller")


def tiny(root: Path, name: str, *overrides: str):
    return load_config(TINY, [f"output_dir={root / name}", f"cache_dir={root / 'cache'}", "threads=1", *overrides])


def quiet(cfg, **kw):
    return run(cfg, log=lambda m: None, progress=False, **kw)


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(Path(run_dir) / record.METRICS)


def actions(run_dir: Path) -> list[dict]:
    return record.read_actions(run_dir) or []


class FiresAt:
    """A stand-in for the detectors: fires once the run's metrics hold `n` evaluations, with the onset at the
    `onset_index`-th evaluation's step. The action's step is then the n-th evaluation's, known in advance."""

    def __init__(self, n: int, onset_index: int = 1):
        self.n, self.onset_index = n, onset_index

    def __call__(self, run_dir, trigger, proxy_detector):
        steps = [r["step"] for r in rows(run_dir)]
        if len(steps) < self.n:
            return None
        return controller.Trigger(proxy_detector, steps[self.onset_index], "injected")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    return load_file(str(Path(run_dir) / "checkpoints" / latest / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without(rows_: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows_]


# ------------------------------------------------------------------------------------------ off


def test_off_by_default_and_a_controller_that_never_fires_changes_nothing(shared, monkeypatch):
    """`policy: off` (the default) leaves no trace; a controller watching a run without acting leaves the
    trajectory as it was (same metrics, same weights), adding only its running-total columns."""
    off = quiet(tiny(shared, "off"))
    assert load_config(TINY).stage2.controller.policy == "off"
    assert not (off / record.CONTROLLER_LOG).exists() and not (off / record.CONTROLLER_DIR).exists()
    assert all(record.CONTROLLER_ACTIONS not in r for r in rows(off))
    assert "controller" not in json.loads((off / record.DONE).read_text())
    assert "controller" not in json.loads((off / "checkpoints" / "step-00000024" / "state.json").read_text())

    monkeypatch.setattr(controller, "fired", lambda *a: None)
    watching = quiet(tiny(shared, "watching", "stage2.controller.policy=refresh"))
    assert without(rows(watching), record.CONTROLLER_ACTIONS, record.CONTROLLER_TEACHER_SAMPLES) == rows(off)
    assert all(r[record.CONTROLLER_ACTIONS] == 0 for r in rows(watching))
    assert same_weights(weights(off), weights(watching))
    assert actions(watching) == []


# ------------------------------------------------------------------------- refresh and diversify


def _marking_sampler(monkeypatch, mark: int):
    """Wrap the offline sampler: count the rows it draws and set every response token to `mark`, so that the
    sequences the controller put into the dataset can be told apart from the original ones."""
    real = offline.sample
    drawn = []

    def counting(lm, ids, *args, **kw):
        out = real(lm, ids, *args, **kw)
        drawn.append(len(ids))
        return out._replace(response_ids_BxR=torch.full_like(out.response_ids_BxR, mark))

    monkeypatch.setattr(offline, "sample", counting)
    return drawn


@pytest.mark.parametrize("policy", ["refresh", "diversify"])
def test_refresh_and_diversify_replace_exactly_the_configured_sequences(shared, monkeypatch, policy):
    cfg = tiny(shared, f"unit-{policy}", f"stage2.controller.policy={policy}",
               "stage2.controller.refresh_fraction=0.25",
               "stage2.controller.cooldown_evals=1")
    world = build_world(cfg, log=lambda m: None)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source, _ = make_source(cfg, world, run_dir, log=lambda m: None)  # the base dataset, before the wrapper
    before = source.data
    mark = cfg.world.vocab_size - 1
    drawn = _marking_sampler(monkeypatch, mark)
    monkeypatch.setattr(controller, "fired", lambda *a: controller.Trigger("proxy_deviation", 1, "injected"))
    ctl = controller.Controller(cfg, run_dir, world.teacher, world.prompts["stage2"], source_params(cfg, world))
    stage = SimpleNamespace(source=source, student=None)
    k = round(0.25 * N)
    dataset_prompts = {tuple(p.tolist()) for p in before.prompt_ids}
    pool_prompts = {tuple(p.tolist()) for p in world.prompts["stage2"][0]}
    for n_actions, step in ((1, 4), (2, 7)):
        ctl.observe(stage, step)
        after = source.data
        marked = (after.response_ids == mark).all(1)
        assert int(marked.sum()) == n_actions * k and sum(drawn) == n_actions * k
        kept = ~marked  # every other sequence, its prompt and its targets are as they were
        for name in ("prompt_ids", "response_ids", "target_logprobs"):
            assert torch.equal(getattr(after, name)[kept], getattr(before, name)[kept]), name
        new_prompts = [tuple(p.tolist()) for p in after.prompt_ids[marked]]
        if policy == "refresh":  # the same prompts, fresh samples
            assert torch.equal(after.prompt_ids[marked], before.prompt_ids[marked])
        else:  # prompts of the stage-2 pool that were not in the dataset, each once
            assert all(p in pool_prompts and p not in dataset_prompts for p in new_prompts)
            assert len(set(new_prompts)) == len(new_prompts)
    assert [a["replaced"] for a in actions(run_dir)] == [k, k]

    # Resume: the base dataset and the saved state give the same data.
    fresh, _ = make_source(cfg, world, run_dir, log=lambda m: None)
    again = controller.Controller(cfg, run_dir, world.teacher, world.prompts["stage2"], source_params(cfg, world))
    again.load_state_dict(SimpleNamespace(source=fresh), json.loads(json.dumps(ctl.state_dict())))
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "target_logprobs"):
        assert torch.equal(getattr(fresh.data, name), getattr(source.data, name)), name


def test_the_budget_is_never_exceeded_and_the_cost_is_what_the_sampler_drew(shared, monkeypatch):
    """Budget 40 at 32 sequences per action: 32, then the 8 left, then nothing. The sampler's own count of
    rows (the base dataset's N plus the controller's) is the logged cost."""
    drawn = []
    real = offline.sample
    monkeypatch.setattr(offline, "sample", lambda lm, ids, *a, **kw: drawn.append(len(ids)) or real(lm, ids, *a, **kw))
    monkeypatch.setattr(controller, "fired", FiresAt(4))
    cfg = tiny(shared, "budget", "stage2.controller.policy=refresh", "stage2.controller.extra_teacher_samples=40",
               "stage2.controller.cooldown_evals=1", "stage2.controller.max_actions=5")
    run_dir = quiet(cfg)
    acts = actions(run_dir)
    evals = [r["step"] for r in rows(run_dir)]
    assert [a["step"] for a in acts] == evals[3:5], "the first action at the 4th evaluation, the next one after it"
    assert [a["teacher_samples"] for a in acts] == [32, 8]
    assert sum(drawn) - N == 40 == acts[-1]["teacher_samples_total"]
    assert json.loads((run_dir / record.DONE).read_text())["controller"]["teacher_samples"] == 40
    running = [r[record.CONTROLLER_TEACHER_SAMPLES] for r in rows(run_dir)]
    assert running == [0, 0, 0, 0, 32, 40, 40] and max(running) <= cfg.stage2.controller.extra_teacher_samples
    assert all(a["sampling_seconds"] > 0 and a["seconds"] >= a["sampling_seconds"] for a in acts)


# ------------------------------------------------------------------------------------------- mix


def test_mix_draws_on_policy_batches_at_the_configured_rate_after_the_action(shared, monkeypatch):
    from kdlab.data.sources import OfflineSource, OnlineStudentSource

    drawn: dict[int, str] = {}
    for cls, kind in ((OfflineSource, "offline"), (OnlineStudentSource, "on_policy")):
        def recording(self, step, student=None, _real=cls.batch, _kind=kind):
            drawn[step] = _kind
            return _real(self, step, student)
        monkeypatch.setattr(cls, "batch", recording)
    monkeypatch.setattr(controller, "fired", FiresAt(3))  # fires from step 2 on; min_step holds it until step 5
    run_dir = quiet(tiny(shared, "mix", "stage2.controller.policy=mix", "stage2.controller.mix_lmbda=0.75",
                         "stage2.steps=120", "stage2.controller.min_step=5"))
    (act,) = actions(run_dir)
    assert act["step"] == min(r["step"] for r in rows(run_dir) if r["step"] >= 5) and act["lmbda"] == 0.75
    assert sorted(drawn) == list(range(120))
    assert all(drawn[t] == "offline" for t in range(act["step"])), "batch t trains step t+1: none on-policy before"
    after = [drawn[t] == "on_policy" for t in range(act["step"], 120)]
    rate, se = np.mean(after), np.sqrt(0.75 * 0.25 / len(after))
    assert abs(rate - 0.75) < 3 * se, (rate, len(after))


# ------------------------------------------------------------------------------------------ stop


def _stop_run(shared, monkeypatch) -> Path:
    monkeypatch.setattr(controller, "fired", FiresAt(5, onset_index=3))
    out = shared / "stop"
    return out if (out / record.DONE).exists() else quiet(tiny(shared, "stop", "stage2.controller.policy=stop"))


def test_stop_ends_the_run_with_the_weights_of_the_onset(shared, monkeypatch):
    """Fires at the 5th evaluation (step 7) with the onset at the 4th (step 4): the run ends at step 7 holding
    the weights a plain 4-step run ends with (an independent run: same data order, constant rate)."""
    stopped = _stop_run(shared, monkeypatch)
    (act,) = actions(stopped)
    evals = [r["step"] for r in rows(stopped)]
    assert evals == [0, 1, 2, 4, 7] and act["step"] == 7 and act["onset_step"] == act["restored_step"] == 4
    plain = quiet(tiny(shared, "plain-4", "stage2.steps=4"))
    assert same_weights(weights(stopped), weights(plain))
    done = json.loads((stopped / record.DONE).read_text())
    assert done["steps"] == 7 and done["controller"]["stopped_early"]
    assert done["controller"]["stop"]["restored_golden_fkl"] == rows(plain)[-1]["golden_fkl"]
    assert not list((stopped / record.CONTROLLER_DIR).glob(record.SNAPSHOT_GLOB)), "snapshots are removed at the end"
    # Killed after its last checkpoint but before done.json: the resumed run trains nothing and ends the same.
    (stopped / record.DONE).unlink()
    quiet(tiny(shared, "stop", "stage2.controller.policy=stop"), resume=True)
    assert same_weights(weights(stopped), weights(plain)) and [r["step"] for r in rows(stopped)] == evals
    assert json.loads((stopped / record.DONE).read_text())["steps"] == 7


# ---------------------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("policy", ["refresh", "diversify", "mix"])
@pytest.mark.parametrize("at", [9, 12])
def test_resumed_after_an_action_equals_uninterrupted(shared, monkeypatch, policy, at):
    """Actions at steps 7, 13 and 24; checkpoints every 5 steps. Interrupted at step 9 the run resumes from
    step 5 (before the first action, which is redone); at step 12, from step 10 (after it: the dataset and
    the source come back from the run directory)."""
    monkeypatch.setattr(controller, "fired", FiresAt(5))
    overrides = [f"stage2.controller.policy={policy}", "stage2.controller.cooldown_evals=1",
                 "stage2.checkpoint_every=5"]
    clean = shared / f"resume-clean-{policy}"
    if not (clean / record.DONE).exists():
        quiet(tiny(shared, clean.name, *overrides))

    def stop_at(step, total):
        if step == at:
            raise Interrupted

    name = f"resume-{policy}-{at}"
    with pytest.raises(Interrupted):
        quiet(tiny(shared, name, *overrides), on_step=stop_at)
    messages: list[str] = []
    resumed = run(tiny(shared, name, *overrides), resume=True, log=messages.append, progress=False)
    assert any(f"resumed {resumed} at step {5 if at == 9 else 10}" in m for m in messages), messages
    assert rows(resumed) == rows(clean)
    seconds = ("seconds", "sampling_seconds")
    assert [a["step"] for a in actions(clean)] == ([7, 13, 24] if policy != "mix" else [7])
    assert without(actions(resumed), *seconds) == without(actions(clean), *seconds)
    assert same_weights(weights(resumed), weights(clean))


# ------------------------------------------------------------------------------------- detectors


def test_the_trigger_is_the_verdict_of_the_detectors_on_the_curve_so_far(tmp_path):
    """On a synthetic hacking run written one evaluation at a time, the controller's trigger fires exactly
    where the detectors called directly on the same prefix fire, with their onset; the golden trigger too."""
    from kdlab.analysis import synthetic as syn
    from kdlab.analysis.detectors import detect_golden, detect_proxy_deviation

    curves = syn.hacking_run(np.random.default_rng(3), kind="hacking", steps=syn.log_steps(4000, 26), rise=0.3,
                             departure=0.4, onset_frac=0.6, sigma=0.01)
    full = syn.run_rows(curves)
    fired_at = {}
    for n in range(2, len(full) + 1):
        prefix = full[:n]
        syn.write_run(tmp_path / "run", prefix, {"seed": 0})
        col = lambda name: [r.get(name) for r in prefix]  # noqa: E731
        p = detect_proxy_deviation(col("step"), col("proxy_fkl"), col("proxy_fkl_se"))
        g = detect_golden(col("step"), col("golden_fkl"), col("golden_fkl_se"), col("proxy_fkl"), col("proxy_fkl_se"))
        for trigger, verdict, name in (("proxy", p, "proxy_deviation"), ("golden", g, "golden")):
            t = controller.fired(tmp_path / "run", trigger, "proxy_deviation")
            assert (t is not None) == verdict.detected, (trigger, n)
            if t is not None:
                assert (t.detector, t.onset_step) == (name, verdict.onset_step)
                fired_at.setdefault(trigger, n)
        t = controller.fired(tmp_path / "run", "any", "proxy_deviation")
        hits = [(v.onset_step, k) for k, v in (("golden", g), ("proxy_deviation", p)) if v.detected]
        assert (t.onset_step, t.detector) == min(hits) if hits else t is None
    assert set(fired_at) == {"proxy", "golden"}, "the constructed run must fire both detectors somewhere"


# -------------------------------------------------------------------------------------- configs


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="trigger='golden' needs the golden metric"):
        load_config(TINY, ["stage2.controller.policy=stop", "stage2.controller.trigger=golden", "world.oracle=none",
                           "models.teacher=hf:t", "models.student=hf:s"])
    with pytest.raises(ConfigError, match="policy='refresh' changes the offline dataset"):
        load_config(TINY, ["stage2.controller.policy=refresh", "stage2.regime=online_teacher"])
    with pytest.raises(ConfigError, match="stage2.controller.policy = 'later'"):
        load_config(TINY, ["stage2.controller.policy=later"])
    mix = load_config(TINY, ["stage2.controller.policy=mix", "stage2.regime=online_teacher"])
    assert mix.stage2.controller.policy == "mix"


# ------------------------------------------------------------------------------------------ report


def test_the_report_shows_the_actions_in_a_table_and_on_the_curves(shared, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    from kdlab.analysis import analyse
    from kdlab.report import plots, write_report

    stopped = _stop_run(shared, monkeypatch)
    monkeypatch.setattr(controller, "fired", FiresAt(4))
    acted = quiet(tiny(shared, "report-refresh", "stage2.controller.policy=refresh", "stage2.steps=12",
                       "stage2.controller.cooldown_evals=1", "stage2.controller.max_actions=2"))
    steps = [a["step"] for a in actions(acted)]
    assert len(steps) == 2
    page = write_report([acted, stopped], tmp_path / "report").read_text()
    assert "<h2>Controller actions</h2>" in page and "weights of step 4 restored" in page
    for step in steps:
        assert f"<td>report-refresh</td><td>{step}</td><td>refresh</td>" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    by_name = {r["run"]: r for r in summary["runs"]}
    assert [a["step"] for a in by_name["report-refresh"]["controller_actions"]] == steps
    fig, ax = plt.subplots()
    plots._curves_panel(ax, analyse(acted))
    labels = [ln.get_label() for ln in ax.get_lines()]
    xs = sorted({float(ln.get_xdata()[0]) for ln in ax.get_lines() if ln.get_color() == plots.ACTION_COLOR})
    plt.close(fig)
    assert labels.count("controller: refresh") == 1 and xs == [float(s) for s in steps]
    from kdlab.analysis import synthetic as syn

    plain = syn.write_run(tmp_path / "plain", syn.run_rows(syn.healthy_run(np.random.default_rng(0))), {"seed": 0})
    assert "controller_actions" not in analyse(plain).summary(), "no controller log, no key"


def test_a_bare_yaml_off_is_the_off_policy(tmp_path):
    """YAML 1.1 reads `policy: off` as false; the config takes it as 'off'."""
    (tmp_path / "c.yaml").write_text(f"base: {TINY}\nstage2:\n  controller:\n    policy: off\n")
    assert load_config(tmp_path / "c.yaml").stage2.controller.policy == "off"
    assert load_config(TINY, ["stage2.controller.policy=off"]).stage2.controller.policy == "off"
    with pytest.raises(ConfigError, match="stage2.controller.policy = True"):
        load_config(TINY, ["stage2.controller.policy=on"])
