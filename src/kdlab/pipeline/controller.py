"""The closed-loop controller of stage 2 (issue 20): act on the detectors while the student trains.

Where it sits. `distill._run` calls `Controller.observe` right after each evaluation row is logged (step 0
included) and before that step's checkpoint. `observe` runs the detectors on the curve so far: the same
analysis `kdlab detect` and `kdlab report` run (`kdlab.analysis.analyse` on the run directory, whose
metrics.jsonl then holds exactly the rows up to this step), so a verdict the controller acts on is the
verdict `kdlab detect` gives for the metrics truncated at that step. When the trigger fires, and the
budget, `max_actions`, `min_step` and the cool-down allow, it applies the policy (kdlab.policies):

- refresh   : the next `refresh_fraction` x N sequences of the offline dataset, in a fixed random order
              (so repeated actions replace the oldest), get fresh teacher samples on the same prompts from a
              new random stream (seed, "controller-refresh", action);
- diversify : the same sequences get one fresh teacher sample each on prompts of the stage-2 pool that are
              not in the dataset (the pool's prompts past the dataset's in `offline_prompt_order`);
- mix       : the batch source becomes MixedSource(on-policy, current source, mix_lmbda) from the next step;
- stop      : the student gets back its weights of the last evaluation at or before the detector's onset
              (a snapshot is written at every evaluation under controller/, as the monitor's keep_best
              does), and the run ends: a checkpoint of those weights, then done.json saying why.
The extra teacher samples are counted as sequences; an action that would pass `extra_teacher_samples`
replaces fewer. Each action is one line of controller.jsonl (record.ACTION_FIELDS: step, trigger, onset,
cost in teacher samples and seconds), and the evaluation rows after it carry the running totals
(record.CONTROLLER_ACTIONS, CONTROLLER_TEACHER_SAMPLES).

State and resume. `ControllerState` (the actions taken, the extra samples drawn, the two cursors, whether
the source is mixed, whether the run stopped) goes into every checkpoint's state.json. Each refresh or
diversify writes only its new sequences, to controller/action-N (an offline dataset of those rows); the
rows they replace are a function of the cursor, so a resumed run rebuilds the dataset from the base one and
the actions its checkpoint lists, and the mixed source from the flag. controller.jsonl is cut back to the
checkpoint's step, as metrics.jsonl is; an action after the checkpoint is redone identically (every draw is
a function of (seed, action)). So a run resumed after an action continues exactly as the uninterrupted one
(tests/test_controller.py).

Not supported: runs under `accelerate launch` (one process decides and changes the data), and 'mix' with
the vLLM sampler (config errors).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kdlab import record
from kdlab.analysis.detectors import GOLDEN as GOLDEN_DETECTOR
from kdlab.analysis.detectors import PROXY_DEVIATION
from kdlab.config import RunConfig
from kdlab.data.offline import load_offline_dataset, offline_prompt_order, sample_teacher_rows, write_offline_dataset
from kdlab.data.sources import MixedSource, OfflineSource, OnlineStudentSource, SamplingParams
from kdlab.models import LM
from kdlab.pipeline.evaluate import eval_steps
from kdlab.pipeline.rundir import read_metrics
from kdlab.policies import ANY, DATA_POLICIES, DIVERSIFY, GOLDEN, MIX, OFF, PROXY, REFRESH, STOP
from kdlab.seeding import generator_for


@dataclass
class Trigger:
    """A detector that fired on the curve so far."""

    detector: str  # a key of kdlab.analysis.detectors.DETECTORS
    onset_step: int | None
    reason: str


def fired(run_dir: Path, trigger: str, proxy_detector: str) -> Trigger | None:
    """The trigger's detectors on the run's metrics so far, through `kdlab.analysis.analyse` (what `kdlab
    detect` runs): the detector that fired, or None. With trigger 'any' and both firing, the earlier onset
    (golden on a tie). Tests replace this function to fire at a known evaluation."""
    from kdlab.analysis.runs import analyse

    a = analyse(run_dir)
    hits = []
    if trigger in (GOLDEN, ANY) and a.golden is not None and a.golden.detected:
        hits.append(Trigger(GOLDEN_DETECTOR, a.golden.onset_step, a.golden.reason))
    if trigger in (PROXY, ANY):
        v = a.proxy if proxy_detector == PROXY_DEVIATION else a.sequential
        if v is not None and v.detected:
            hits.append(Trigger(proxy_detector, v.onset_step, v.reason))
    if not hits:
        return None
    return min(hits, key=lambda t: (t.onset_step if t.onset_step is not None else float("inf"),
                                    t.detector != GOLDEN_DETECTOR))


@dataclass
class ControllerState:
    """What a checkpoint saves of the controller (JSON)."""

    actions: list[dict] = field(default_factory=list)  # the records of controller.jsonl, in order
    teacher_samples: int = 0  # extra teacher samples drawn so far
    replaced: int = 0  # sequences replaced so far: the cursor into the replacement order
    fresh_prompts: int = 0  # pool prompts diversify has taken so far: the cursor past the dataset's prompts
    mixed: bool = False  # the source is the mixture of a 'mix' action
    stopped: dict | None = None  # the 'stop' action's record, once the run stopped


class Controller:
    """See the module docstring. Made by `distill.setup` when stage2.controller.policy is not 'off'."""

    def __init__(self, cfg: RunConfig, run_dir: Path, teacher: LM, pool: tuple[torch.Tensor, torch.Tensor],
                 params: SamplingParams):
        self.cfg, self.c = cfg, cfg.stage2.controller
        self.run_dir = Path(run_dir)
        self.teacher, self.params = teacher, params  # params: the run's sampling settings (offline build's)
        # whether the student's decode step is compiled ('auto' sets it when it compiles: kdlab.pipeline.autocompile)
        self.compile_student = cfg.stage2.compile_student is True
        self.pool_ids, self.pool_mask = pool
        o = cfg.stage2.offline
        self.dataset_size = o.num_prompts * o.generations_per_prompt
        self.budget = self.c.extra_teacher_samples if self.c.extra_teacher_samples is not None else self.dataset_size
        self.evals = eval_steps(cfg.stage2.steps, cfg.eval.num_points)
        self.state = ControllerState()
        self._order: torch.Tensor | None = None
        self.seconds = 0.0  # spent in `observe` this session (snapshots, detectors, actions): the overhead

    # ------------------------------------------------------------------------------------ loop
    def columns(self) -> dict:
        """The running totals an evaluation row carries (actions before this evaluation)."""
        return {record.CONTROLLER_ACTIONS: len(self.state.actions),
                record.CONTROLLER_TEACHER_SAMPLES: self.state.teacher_samples}

    @property
    def stopped(self) -> bool:
        return self.state.stopped is not None

    def observe(self, s, step: int) -> bool:
        """After the evaluation of `step` (`s` is distill's Stage2): snapshot the weights ('stop'), run the
        detectors, act when they fire. Returns True when the run is to end now ('stop')."""
        t0 = time.perf_counter()
        try:
            return self._observe(s, step)
        finally:
            self.seconds += time.perf_counter() - t0

    def _observe(self, s, step: int) -> bool:
        if self.c.policy == STOP:
            self._snapshot(s.student, step)
        if not self._may_act(step):
            return False
        trigger = fired(self.run_dir, self.c.trigger, self.c.proxy_detector)
        if trigger is None:
            return False
        t0 = time.perf_counter()
        rec = {"step": step, "policy": self.c.policy, "detector": trigger.detector, "onset_step": trigger.onset_step,
               "reason": trigger.reason, "teacher_samples": 0, "sampling_seconds": 0.0}
        if self.c.policy in DATA_POLICIES:
            rec.update(self._replace(s, len(self.state.actions)))
        elif self.c.policy == MIX:
            s.source = self._mixed(s.source)
            self.state.mixed = True
            rec["lmbda"] = self.c.mix_lmbda
        elif self.c.policy == STOP:
            rec.update(self._rollback(s.student, step, trigger.onset_step))
        rec["teacher_samples_total"] = self.state.teacher_samples
        rec["budget"] = self.budget if self.c.policy in DATA_POLICIES else None
        rec["seconds"] = time.perf_counter() - t0
        assert set(rec) <= set(record.ACTION), set(rec) - set(record.ACTION)
        record.append_row(self.run_dir / record.CONTROLLER_LOG, rec)
        self.state.actions.append(rec)
        if self.c.policy == STOP:
            self.state.stopped = rec
        return self.stopped

    def _may_act(self, step: int) -> bool:
        st, c = self.state, self.c
        if c.policy == OFF or self.stopped or len(st.actions) >= c.max_actions or step < c.min_step:
            return False
        if st.actions:
            last = st.actions[-1]["step"]
            if sum(1 for e in self.evals if last < e <= step) < c.cooldown_evals:
                return False
        if c.policy in DATA_POLICIES:
            return self._batch_size() > 0
        return not (c.policy == MIX and st.mixed)

    # --------------------------------------------------------------------------- refresh, diversify
    def _batch_size(self) -> int:
        """Sequences the next refresh / diversify replaces: refresh_fraction x N, within the budget (and the
        pool's unused prompts for diversify)."""
        k = min(max(1, round(self.c.refresh_fraction * self.dataset_size)), self.budget - self.state.teacher_samples)
        if self.c.policy == DIVERSIFY:
            k = min(k, len(self.pool_ids) - self.cfg.stage2.offline.num_prompts - self.state.fresh_prompts)
        return max(k, 0)

    def _rows(self, start: int, k: int) -> torch.Tensor:
        """The dataset rows replaced by sequences start .. start+k-1 of the replacement order (a fixed random
        permutation of the rows, gone round again and again)."""
        if self._order is None:
            gen = generator_for(self.cfg.seed, "controller-replace")
            self._order = torch.randperm(self.dataset_size, generator=gen)
        return self._order[(start + torch.arange(k)) % self.dataset_size]

    def _replace(self, s, index: int) -> dict:
        """One refresh or diversify: sample, write the new sequences to controller/action-N, load them back
        and put them in (the path a resumed run takes too)."""
        source = _offline(s.source)
        st, k = self.state, self._batch_size()
        rows = self._rows(st.replaced, k)
        out = {"replaced": k}
        if self.c.policy == REFRESH:
            ids, mask = source.data.prompt_ids[rows], source.data.prompt_mask[rows]
        else:
            first = self.cfg.stage2.offline.num_prompts + st.fresh_prompts
            new = offline_prompt_order(self.cfg.seed, len(self.pool_ids))[first:first + k]
            ids, mask = self.pool_ids[new], self.pool_mask[new]
            out["new_prompts"] = k
        p, kind = self.params, source.data.target_kind
        t0 = time.perf_counter()
        new_rows = sample_teacher_rows(
            self.teacher, ids, mask, kind=kind, topk=self.cfg.stage2.offline.topk, max_new_tokens=p.max_new_tokens,
            generator=generator_for(self.cfg.seed, f"controller-{self.c.policy}", index), temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, eos_token_id=p.eos_token_id, batch_size=self.cfg.generation_batch_size)
        out["sampling_seconds"] = time.perf_counter() - t0
        name = record.action_dir(index)
        write_offline_dataset(new_rows, self.run_dir / record.CONTROLLER_DIR / name, kind=kind,
                              topk=self.cfg.stage2.offline.topk, generations_per_prompt=1,
                              head_weight=self.teacher.lm_head_weight if kind == "hidden" else None)
        out.update(data=name, teacher_samples=k)
        self._apply(source, out)
        return out

    def _apply(self, source: OfflineSource, rec: dict) -> None:
        """Put an action's sequences (read from its directory) into the dataset and move the cursors."""
        st, k = self.state, rec["replaced"]
        delta = load_offline_dataset(self.run_dir / record.CONTROLLER_DIR / rec["data"])
        source.data = source.data.with_rows(self._rows(st.replaced, k), delta)
        st.replaced += k
        st.teacher_samples += rec["teacher_samples"]
        st.fresh_prompts += rec.get("new_prompts") or 0

    # ------------------------------------------------------------------------------------------ mix
    def _mixed(self, current):
        """The source after a 'mix' action: on-policy batches at rate mix_lmbda, the rest from the current
        source (a mixed regime keeps its other source and gets the new rate)."""
        other = current.other if isinstance(current, MixedSource) else current
        # the student's sampler as a mixed regime's (its decode step compiled under stage2.compile_student)
        params = dataclasses.replace(self.params, compile_step=self.compile_student)
        on_policy = OnlineStudentSource(self.pool_ids, self.pool_mask, self.cfg.stage2.batch_size, self.cfg.seed,
                                        params)
        return MixedSource(on_policy, other, self.c.mix_lmbda, self.cfg.seed)

    # ----------------------------------------------------------------------------------------- stop
    def _snapshot_path(self, step: int) -> Path:
        return self.run_dir / record.CONTROLLER_DIR / record.snapshot_file(step)

    def _snapshot(self, student: LM, step: int) -> None:
        from safetensors.torch import save_model

        final = self._snapshot_path(step)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}")
        save_model(student.hf, str(tmp))  # shared (tied) tensors stored once; load_model restores them
        record.publish(tmp, final)

    def _rollback(self, student: LM, step: int, onset: int | None) -> dict:
        """Load the weights of the last evaluation at or before `onset` (without an onset, this evaluation's; with
        an onset before every evaluation of this session's metrics, the first one's)."""
        from safetensors.torch import load_model

        rows = [r for r in read_metrics(self.run_dir / record.METRICS) if r[record.STEP] <= step]
        before = [r for r in rows if onset is None or r[record.STEP] <= onset]
        row = before[-1] if before else rows[0]
        path = self._snapshot_path(row[record.STEP])
        if not path.exists():
            raise FileNotFoundError(f"{path}: the weights of step {row[record.STEP]} are gone; the controller "
                                    "cannot roll back to them")
        load_model(student.hf, str(path))
        return {"restored_step": row[record.STEP], "restored_proxy_fkl": row.get(record.PROXY),
                "restored_golden_fkl": row.get(record.GOLDEN)}

    # ------------------------------------------------------------------------------ resume, finish
    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, s, state: dict | None) -> None:
        """Continue from a checkpoint's controller state (None: from the start): the actions' sequences are
        put back into the base dataset in order, the mixture rebuilt, controller.jsonl cut back to them."""
        self.state = ControllerState()
        state = state or {}
        for rec in state.get("actions", []):
            if rec["policy"] in DATA_POLICIES:
                self._apply(_offline(s.source), rec)
        self.state = ControllerState(**state) if state else ControllerState()
        if self.state.mixed:
            s.source = self._mixed(s.source)
        log = self.run_dir / record.CONTROLLER_LOG
        kept = self.state.actions
        if kept:
            record.write_text(log, "".join(_json_line(r) for r in kept))
        else:
            log.unlink(missing_ok=True)

    def finish(self) -> dict:
        """What done.json says of the controller; the weight snapshots are removed (the run's final weights are
        in its last checkpoint)."""
        import shutil

        directory = self.run_dir / record.CONTROLLER_DIR
        for snap in [*directory.glob(record.SNAPSHOT_GLOB), *directory.glob(".tmp-*")]:
            shutil.rmtree(snap, ignore_errors=True) if snap.is_dir() else snap.unlink(missing_ok=True)
        out = {"policy": self.c.policy, "trigger": self.c.trigger, "actions": len(self.state.actions),
               "teacher_samples": self.state.teacher_samples, "stopped_early": self.stopped,
               "seconds_this_session": round(self.seconds, 3)}
        if self.stopped:
            st = self.state.stopped
            out["stop"] = {k: st.get(k) for k in ("step", "detector", "onset_step", "reason", "restored_step",
                                                  "restored_proxy_fkl", "restored_golden_fkl")}
        return out


def _offline(source) -> OfflineSource:
    """The offline source inside the run's source (itself, or a mixture's other part)."""
    if isinstance(source, MixedSource):
        source = source.other
    if not isinstance(source, OfflineSource):
        raise TypeError(f"the controller's refresh / diversify need an offline dataset; the source is "
                        f"{type(source).__name__}")
    return source


def _json_line(row: dict) -> str:
    import json
    import math

    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean) + "\n"
