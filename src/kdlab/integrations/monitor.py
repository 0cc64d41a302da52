"""`TeacherHackingMonitor`: a `transformers.TrainerCallback` that watches any distillation job for
teacher hacking (Tiapkin et al. 2025) — `Trainer`, TRL's `SFTTrainer`, `GKDTrainer`,
`DistillationTrainer`, or any subclass.

At log-spaced optimizer steps (0, then ``num_points`` steps spread evenly in log step up to
``max_steps``) it measures, on held-out prompts,

    proxy  = E_x E_{y~teacher} Σ_t KL(teacher_t ‖ student_t)     (always)
    golden = E_x E_{y~oracle}  Σ_t KL(oracle_t ‖ student_t)      (when an oracle is given)

with kdlab's `ReferenceCache` (the teacher's and oracle's samples and per-position distributions are
computed once, at the start, so each measurement is one student forward pass) and the evaluation probe
that kdlab's own runs use (`kdlab.metrics.probe.EvalProbe`: the same columns, SEs and storage labels).
The distributions are held exactly at any vocabulary size (full log-probs, or the reference's hidden
states and head: ``storage``); top-k, a lower bound, only when asked for.
It then runs the proxy-only detector (`kdlab.analysis.detect_proxy_deviation`: the proxy leaves its
early power-law convergence upwards; or, with ``detect_proxy=None``, the experimental sequential one,
`kdlab.analysis.sequential.SequentialProxyDetector`, one `update` per measurement in time measured as
the cumulative learning rate, which the monitor sums over every optimizer step) and, with an oracle, the golden detector, and when either fires
it acts as ``on_hacking`` says: it warns (``"warn"``, the default); stops training and restores the best weights
(``"stop"``, also ``stop_on_hacking=True``: the last measurement before the onset; with an oracle, the lowest
golden), which it also keeps on disk; or calls a hook ``hook(trainer, monitor, verdict)`` that can change the
training, e.g. give it fresh teacher samples (`SwappableDataset`). The action is logged in the JSONL row of the
measurement that fired (``hacking_action``, ``hacking_action_detail``).

Metrics go to the trainer's own loggers (its ``on_log`` callbacks: TensorBoard, W&B, ... whatever
``report_to`` says; not through ``trainer.log``, which would drop the trainer's own loss log at that
step) and to ``trainer.state.log_history`` when the monitor is attached to the trainer, and always to a JSONL file that
``kdlab detect`` reads::

    monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=128)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, ..., callbacks=[monitor])
    monitor.attach(trainer)          # route the metrics to the trainer's loggers
    trainer.train()
    # kdlab detect <output_dir>/teacher_hacking_monitor.jsonl

A callback is not handed the trainer by `transformers`; TRL's own metric callbacks
(``LogCompletionsCallback``, ``WinRateCallback``) take it the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import TrainerCallback

from kdlab.analysis.detectors import (DETECTORS, GOLDEN, PROXY_DEVIATION, PROXY_SEQUENTIAL, detect_golden,
                                      detect_proxy_deviation)
from kdlab.analysis.alarms import EXPERIMENTAL, alarm_column, check_alarms
from kdlab.analysis.sequential import SequentialProxyDetector
from kdlab.metrics import ReferenceCache
from kdlab.metrics.drift import DriftPanel
from kdlab.metrics.probe import EvalProbe, Reference, log_spaced_steps
from kdlab.models import LM
from kdlab.models.sampling import eos_ids
from kdlab.seeding import generator_for

logger = logging.getLogger(__name__)

PREFIX = "teacher_hacking/"
WARN, STOP = "warn", "stop"
ON_HACKING = (WARN, STOP)  # the named actions of `on_hacking` (or a callable hook)
ACTION_KEY, ACTION_DETAIL_KEY = "hacking_action", "hacking_action_detail"  # where the JSONL row logs the action


class TeacherHackingWarning(UserWarning):
    """Raised (as a warning) when a detector flags teacher hacking during training."""


class SwappableDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows an `on_hacking` hook can replace while the trainer runs.

    `transformers.Trainer` makes its dataloader once per ``train()`` call and the dataloader keeps the dataset
    object it was given, so a hook cannot swap ``trainer.train_dataset``; it can swap what this wrapper holds.
    Every row fetched after ``swap`` comes from the new data (accelerate's dataloader fetches one batch ahead,
    so that batch is the old data's). The new data must have the same length: the epoch's sampler has already
    drawn its indices."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]

    def swap(self, new):
        """Serve `new` from now on; returns the data it replaces."""
        if len(new) != len(self.data):
            raise ValueError(f"the new data has {len(new)} rows, the old {len(self.data)}: the running epoch's "
                             "sampler drew indices for the old length; give data of the same length")
        old, self.data = self.data, new
        return old


def _left_padded(prompts, tokenizer, pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) left-padded from strings (with a tokenizer), token-id lists, or an (ids, mask) pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and isinstance(prompts[0], Tensor):
        from kdlab.models.lm import left_pad

        return left_pad(prompts[0].long(), prompts[1].bool())
    if len(prompts) and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("eval_prompts are strings: pass tokenizer= to tokenize them")
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("eval_prompts must be non-empty prompts")
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = True
    return ids, mask


def _as_lm(model) -> LM:
    """kdlab's LM view of a transformers model, leaving the model's train/eval mode as it was."""
    if isinstance(model, LM):
        return model
    was_training = model.training
    lm = LM(model)  # LM() puts the model in eval mode
    model.train(was_training)
    return lm


class TeacherHackingMonitor(TrainerCallback):
    """Measure proxy (and golden) at log-spaced steps, detect teacher hacking online, warn or stop.

    Args:
        teacher: the teacher (a transformers causal LM or a kdlab ``LM``); the proxy is KL(teacher ‖ student).
        eval_prompts: held-out prompts: strings (with ``tokenizer``), lists of token ids, or a
            left- or right-padded ``(ids_NxP, mask_NxP)`` pair. A few hundred give usable error bars.
        oracle: optional ground-truth model; enables the golden metric and the golden detector.
        tokenizer: tokenizes string prompts; its ``eos_token_id`` and every EOS id the teacher's generation
            config lists end sampled responses.
        max_new_tokens: length of the reference responses.
        samples_per_prompt: reference samples per prompt (SEs are clustered by prompt).
        num_points: log-spaced measurements after step 0 (the proxy detector needs ≥ 8 with step > 0).
        max_steps: the schedule's last step (default: the trainer's ``state.max_steps``).
        temperature: sampling temperature of the reference responses (1 = the contract's fkl).
        batch_size: sequences per forward pass when measuring.
        storage: how the references' distributions are held (``ReferenceCache``): 'auto' (full log-probs
            if they fit ``memory_budget_bytes``, else the hidden states and head, else the live model: all
            exact), 'full', 'hidden', 'none', or 'topk' (a lower bound, labelled so in every row).
        memory_budget_bytes, topk: the budget 'auto' fits in; k for 'topk'.
        seed: seeds the reference samples.
        on_hacking: what to do when a detector first fires: ``"warn"`` (default) warns and logs; ``"stop"`` also
            stops training and restores the best weights; a callable ``hook(trainer, monitor, verdict)`` is called
            after the warning (``verdict``: ``detector``, ``onset_step``, ``reason``; the trainer is the one given
            to :meth:`attach` or ``trainer=``) and may return a JSON-able dict saying what it did, logged as
            ``hacking_action_detail``. A hook that swaps the training data must change the data the running
            dataloader reads: `transformers.Trainer` builds its dataloader once per ``train()``, so assigning
            ``trainer.train_dataset`` does nothing until the next ``train()``; wrap the dataset in
            `SwappableDataset` and call its ``swap``.
        stop_on_hacking: the older spelling of ``on_hacking="stop"`` (kept; both together must agree).
        keep_best: keep weight snapshots at each measurement and, at the end, the best one in
            ``<snapshot_dir>/best`` (default: ``on_hacking == "stop"``). Costs one model on disk per measurement
            until the end of training.
        snapshot_dir: where snapshots go (default ``<output_dir>/teacher_hacking_monitor``).
        jsonl_path: the metrics file (default ``<output_dir>/teacher_hacking_monitor.jsonl``).
        proxy_config / golden_config: detector thresholds (``ProxyDeviationConfig``, or ``SequentialConfig`` with ``detect_proxy=None``;
            ``GoldenConfig``).
        detect_proxy / detect_golden_fn: the detector functions (replaceable, e.g. in tests). The default
            proxy-only detector is the fixed-window one; ``detect_proxy=None`` runs the experimental
            sequential detector online, one measurement at a time (held-out detection 8 %, false alarms
            up to 24 %: bench/DETECTION.md; not the default for that reason).
        trainer: the trainer whose loggers receive the metrics (or call :meth:`attach` later).
        drift: also log the drift panel at each measurement (``kdlab.metrics.drift``: student against teacher
            lengths and samples without EOS, EOS mass, entropies, repetition, top-k overlap, exposure gap) and
            the failure-mode alarms on it (``kdlab.analysis.alarms``: ``alarm_<name>`` = 1 once fired). Costs a
            student sampling pass and three forward passes per measurement.
        alignment_prompts: prompts (as ``eval_prompts``) from which the gradient alignment of issue 16 draws fresh
            batches: at each measurement step, between backward and the optimizer step, the cosine between the
            trainer's gradient and the gradient of forward KL(teacher ‖ student) on fresh teacher samples
            (``grad_cos_fresh``), and with an oracle on fresh oracle samples (``grad_cos_golden``). Two extra
            forward/backward passes per measurement; the trainer's gradients are not touched.
        stop_on_alarm: stop training when one of those alarms first fires (implies ``drift``); the alarms
            measured not to be specific (``kdlab.analysis.alarms.EXPERIMENTAL``: exposure-gap growth) never stop it.
    """

    def __init__(
        self,
        teacher,
        eval_prompts,
        *,
        oracle=None,
        tokenizer=None,
        max_new_tokens: int,
        samples_per_prompt: int = 1,
        num_points: int = 16,
        max_steps: int | None = None,
        temperature: float = 1.0,
        batch_size: int = 64,
        storage: str = "auto",
        memory_budget_bytes: int = 1 << 30,
        topk: int = 256,
        seed: int = 0,
        on_hacking: str | Callable | None = None,
        stop_on_hacking: bool = False,
        keep_best: bool | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        jsonl_path: str | os.PathLike | None = None,
        proxy_config=None,
        golden_config=None,
        detect_proxy: Callable | None = detect_proxy_deviation,
        detect_golden_fn: Callable = detect_golden,
        trainer=None,
        drift: bool = False,
        stop_on_alarm: bool = False,
        alignment_prompts=None,
    ):
        self.teacher = _as_lm(teacher)
        self.oracle = _as_lm(oracle) if oracle is not None else None
        self.tokenizer = tokenizer
        # The tokenizer's EOS first (it pads finished rows), then any other the teacher lists (chat models
        # end a turn with one of several).
        eos = dict.fromkeys(eos_ids(getattr(tokenizer, "eos_token_id", None)) + eos_ids(self.teacher.eos_token_id))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.prompt_ids, self.prompt_mask = _left_padded(eval_prompts, tokenizer, pad if pad is not None else 0)
        self.eos_token_id = tuple(eos) or None
        self.max_new_tokens = max_new_tokens
        self.samples_per_prompt = samples_per_prompt
        self.num_points = num_points
        self.max_steps = max_steps
        self.temperature = temperature
        self.batch_size = batch_size
        self.storage, self.memory_budget_bytes, self.topk = storage, memory_budget_bytes, topk
        self.seed = seed
        if on_hacking is None:
            on_hacking = STOP if stop_on_hacking else WARN
        if not callable(on_hacking) and on_hacking not in ON_HACKING:
            raise ValueError(f"on_hacking={on_hacking!r}: must be one of {', '.join(map(repr, ON_HACKING))} or a "
                             "callable hook(trainer, monitor, verdict)")
        if stop_on_hacking and on_hacking != STOP:
            raise ValueError(f"stop_on_hacking=True and on_hacking={on_hacking!r} disagree; give on_hacking only")
        self.on_hacking = on_hacking
        self.stop_on_hacking = on_hacking == STOP
        self.keep_best = self.stop_on_hacking if keep_best is None else keep_best
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self.proxy_config, self.golden_config = proxy_config, golden_config
        self.detect_proxy, self.detect_golden = detect_proxy, detect_golden_fn
        self.trainer = trainer
        self.drift = drift or stop_on_alarm
        self.alignment_prompts = None
        if alignment_prompts is not None:
            self.alignment_prompts = _left_padded(alignment_prompts, tokenizer, pad if pad is not None else 0)
        self._aligned: dict[str, float] = {}  # the cosines of the step in progress
        self.alignment = None  # kdlab.pipeline.alignment.GradientAlignment, made at its first measurement
        self.stop_on_alarm = stop_on_alarm
        self.drift_panel: DriftPanel | None = None
        self.alarms: dict[str, Any] = {}  # name -> AlarmVerdict of the drift panel's alarms, once fired
        # state
        self.steps: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.caches: dict[str, ReferenceCache] = {}
        self.probe: EvalProbe | None = None  # over the caches, made once they are built (on_train_begin)
        self.detected_at: int | None = None  # the step at which a detector first fired
        self.verdict: dict[str, Any] | None = None
        self.lr_sum = 0.0  # Σ of the learning rate over the optimizer steps seen (the detector's time)
        self._lr_now: float | None = None
        self.proxy_detector = SequentialProxyDetector(proxy_config, time_axis="lr_sum") if detect_proxy is None else None
        self.best_step: int | None = None
        self.best_checkpoint: Path | None = None

    def attach(self, trainer) -> "TeacherHackingMonitor":
        """Log to the trainer's loggers (its TensorBoard / W&B / ... callbacks), and register with it."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ----------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        out = Path(args.output_dir)
        self.snapshot_dir = self.snapshot_dir or out / "teacher_hacking_monitor"
        self.jsonl_path = self.jsonl_path or out / "teacher_hacking_monitor.jsonl"
        self._main = state.is_world_process_zero
        self.steps = log_spaced_steps(self.max_steps or state.max_steps, self.num_points)
        if self._main:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            if state.global_step == 0:
                self.jsonl_path.unlink(missing_ok=True)
        build = dict(samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature, eos_token_id=self.eos_token_id, batch_size=self.batch_size,
                     storage=self.storage, memory_budget_bytes=self.memory_budget_bytes, topk=self.topk)
        for name, ref in (("proxy", self.teacher), ("golden", self.oracle)):
            if ref is not None and name not in self.caches:
                dev = ref.device
                self.caches[name] = ReferenceCache.build(
                    ref, self.prompt_ids.to(dev), self.prompt_mask.to(dev),
                    generator=generator_for(self.seed, "monitor", name), **build)
                logger.info("teacher-hacking monitor: the %s reference is held as '%s'", name, self.caches[name].label)
        self.probe = EvalProbe([Reference(name, cache, self.teacher if name == "proxy" else self.oracle)
                                for name, cache in self.caches.items()], batch_size=self.batch_size)
        if self.drift and self.drift_panel is None:
            self.drift_panel = DriftPanel(self.teacher, self.prompt_ids, self.prompt_mask, self.max_new_tokens,
                                          oracle=self.oracle, eos_token_id=self.eos_token_id, seed=self.seed,
                                          batch_size=self.batch_size)
        if state.global_step in self.steps:
            self._measure(args, state, control, model)
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # The rate this step will use (the scheduler steps after the optimizer, before on_step_end).
        self._lr_now = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The trainer's gradient of the step that is about to end is in .grad (after clipping: a cosine does not
        # see the scale). Measured only at the steps where the monitor measures.
        if self.alignment_prompts is not None and state.global_step + 1 in self.steps and model is not None:
            self._aligned = self._alignment(model, state.global_step + 1)
        return control

    @torch.enable_grad()
    def _alignment(self, model, step: int) -> dict[str, float]:
        """kdlab's own measurement (kdlab.pipeline.alignment.GradientAlignment, which puts the trainer's gradients
        back), with forward KL to the fresh batch's reference logits as the loss: they come out of its sampling
        pass, so no extra reference forward."""
        from kdlab.data.sources import SamplingParams
        from kdlab.losses import forward_kl
        from kdlab.pipeline.alignment import GradientAlignment, _FreshOracle, _FreshTeacher

        if self.alignment is None:
            ids, mask = self.alignment_prompts
            params = SamplingParams(self.max_new_tokens, self.temperature, eos_token_id=self.eos_token_id)
            refs = {"fresh": _FreshTeacher(self.teacher, ids, mask, self.batch_size, self.seed, params)}
            if self.oracle is not None:
                refs["golden"] = _FreshOracle(self.oracle, ids, mask, self.batch_size, self.seed, params)
            self.alignment = GradientAlignment(refs)
        student = _as_lm(model)
        dev = student.device

        def loss_of(b):
            logits = student.response_logits(b.prompt_ids.to(dev), b.prompt_mask.to(dev), b.response_ids.to(dev),
                                              b.response_mask.to(dev))
            return forward_kl(logits, b.teacher_target.to(dev), b.response_mask.to(dev))

        return self.alignment.measure(step, [p for p in model.parameters() if p.requires_grad], loss_of)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.lr_sum += self._lr_now if self._lr_now is not None else 0.0
        if state.global_step in self.steps and state.global_step not in {r["step"] for r in self.history}:
            self._measure(args, state, control, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.keep_best and self.history and self._main:
            self._keep_only_best()
        return control

    # ------------------------------------------------------------------------------ measurement
    @torch.no_grad()
    def _measure(self, args, state, control, model) -> None:
        step = state.global_step
        student = _as_lm(model)
        row: dict[str, Any] = {"step": step}
        if self._lr_now is not None or step == 0:
            row["lr"], row["lr_sum"] = self._lr_now, self.lr_sum
        row.update(self.probe(student)[0])
        if self._aligned:
            row.update(self._aligned)
            self._aligned = {}
        if self.drift_panel is not None:
            row.update(self.drift_panel(student))
        self.history.append(row)
        if self.drift_panel is not None:
            for name, alarm in check_alarms(self.history).items():
                if alarm.fired and name not in self.alarms:
                    self.alarms[name] = alarm
                    acts = self.stop_on_alarm and name not in EXPERIMENTAL  # shown, not acted on (alarms.py)
                    stop = " Training stopped (stop_on_alarm)." if acts else ""
                    warnings.warn(f"kdlab monitor: alarm {name} at step {alarm.onset_step}: {alarm.reason}.{stop}",
                                  TeacherHackingWarning, stacklevel=2)
                    if acts:
                        control.should_training_stop = True
                row[alarm_column(name)] = int(name in self.alarms)
        if self.keep_best and self._main:
            self._snapshot(model, step)
        verdict = self._detect()
        row["hacking_detected"] = bool(self.detected_at is not None or verdict["detected"])
        if verdict["detected"] and self.detected_at is None:
            self.detected_at = step
            self.verdict = verdict
            row["hacking_onset_step"] = verdict["onset_step"]
            row.update(self._on_detection(model, state, control, verdict))
        self._log(row, state)

    def _detect(self) -> dict[str, Any]:
        rows = [r for r in self.history if r["step"] > 0]
        steps = [r["step"] for r in self.history]
        proxy = [r["proxy_fkl"] for r in self.history]
        proxy_se = [r["proxy_fkl_se"] for r in self.history]
        out = {"detected": False, "onset_step": None, "detector": None, "reason": ""}
        last = self.history[-1]
        if self.proxy_detector is not None and last["step"] > 0:  # step 0 is not on a log axis
            time = last.get("lr_sum") or None
            if time is None:  # the trainer hands no optimizer: time is the step
                self.proxy_detector.time_axis = "step"
            self.proxy_detector.update(last["step"], last["proxy_fkl"], last["proxy_fkl_se"], time)
        if len(rows) < 3:
            return out
        if self.proxy_detector is not None:
            pv = self.proxy_detector.verdict()
        else:
            pv = self.detect_proxy(steps, proxy, proxy_se, **({"config": self.proxy_config} if self.proxy_config else {}))
        if pv.detected:
            name = PROXY_SEQUENTIAL if self.proxy_detector is not None else PROXY_DEVIATION
            return {"detected": True, "onset_step": pv.onset_step, "detector": name, "reason": pv.reason}
        if "golden" in self.caches:
            gv = self.detect_golden(steps, [r["golden_fkl"] for r in self.history],
                                    [r["golden_fkl_se"] for r in self.history], proxy, proxy_se,
                                    **({"config": self.golden_config} if self.golden_config else {}))
            if gv.detected and getattr(gv, "kind", "hacking") == "hacking":
                return {"detected": True, "onset_step": gv.onset_step, "detector": GOLDEN, "reason": gv.reason}
        return out

    def _on_detection(self, model, state, control, verdict) -> dict[str, Any]:
        """Act on the first detection as `on_hacking` says; returns what the JSONL row logs of the action."""
        message = (f"teacher hacking detected at step {state.global_step} by the {verdict['detector']} detector "
                   f"(onset at step {verdict['onset_step']}): {DETECTORS.get(verdict['detector'], 'see reason')}. "
                   + (verdict.get("reason") or ""))
        if callable(self.on_hacking):
            name = getattr(self.on_hacking, "__name__", type(self.on_hacking).__name__)
            warnings.warn(message + f" Calling the on_hacking hook {name}.", TeacherHackingWarning, stacklevel=2)
            logger.warning(message)
            if self.trainer is None:
                raise RuntimeError("the on_hacking hook is called with the trainer: pass trainer= or call "
                                   "monitor.attach(trainer)")
            detail = self.on_hacking(self.trainer, self, dict(verdict))
            return {ACTION_KEY: name, ACTION_DETAIL_KEY: detail}
        if self.stop_on_hacking:
            control.should_training_stop = True
            best = self._best_step(verdict["onset_step"])
            if best is not None and self.keep_best:
                self._restore(model, best)
                message += f" Training stopped; the weights of step {best} were restored."
            else:
                message += " Training stopped."
        warnings.warn(message, TeacherHackingWarning, stacklevel=2)
        logger.warning(message)
        return {ACTION_KEY: STOP if self.stop_on_hacking else WARN}

    def _best_step(self, onset: int | None) -> int | None:
        """With an oracle the lowest golden so far; without, the last measurement before the onset."""
        if "golden" in self.caches:
            return min(self.history, key=lambda r: r["golden_fkl"])["step"]
        before = [r["step"] for r in self.history if onset is None or r["step"] < onset]
        return before[-1] if before else None

    def _log(self, row: dict[str, Any], state) -> None:
        if not self._main:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in row.items()}) + "\n")
        metrics = {PREFIX + k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and v is not None}
        state.log_history.append({**metrics, "step": row["step"]})
        if self.trainer is not None:
            self._to_loggers(metrics, state)

    def _to_loggers(self, metrics: dict[str, float], state) -> None:
        """Hand `metrics` to the trainer's loggers (report_to: TensorBoard, W&B, ...) without `trainer.log`.

        `Trainer.log` would reset `control.should_log`, so the trainer's own loss log due at this step would
        be skipped and its next one averaged over twice the steps; TRL trainers override `log` to flush
        their buffered metrics (`completions/*`, `entropy`) into whichever row is logged, ours included.
        The loggers get a copy of the trainer's control, so nothing they set leaks into the training loop.
        Loggers name the tags as they name every training scalar: TensorBoard ``train/teacher_hacking/...``.
        """
        import dataclasses

        trainer = self.trainer
        control = dataclasses.replace(trainer.control)
        trainer.callback_handler.call_event("on_log", trainer.args, state, control, logs=dict(metrics))

    # -------------------------------------------------------------------------------- snapshots
    def _snapshot(self, model, step: int) -> None:
        from safetensors.torch import save_file

        tmp = self.snapshot_dir / f".tmp-step-{step:08d}"
        tmp.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # Tied weights (embedding == lm_head) share storage; safetensors stores each tensor once.
        seen: dict[int, str] = {}
        unique = {}
        for k, v in weights.items():
            ptr = v.data_ptr()
            if ptr not in seen:
                seen[ptr] = k
                unique[k] = v
        save_file(unique, str(tmp / "model.safetensors"))
        final = self.snapshot_dir / f"step-{step:08d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def _restore(self, model, step: int) -> None:
        from safetensors.torch import load_file

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 has written the snapshot
        weights = load_file(str(self.snapshot_dir / f"step-{step:08d}" / "model.safetensors"))
        model.load_state_dict(weights, strict=False)  # tied weights were stored once
        self.best_step = step

    def _keep_only_best(self) -> None:
        best = self.best_step
        if best is None:
            best = self._best_step(self.verdict["onset_step"] if self.verdict else None)
            if self.verdict is None and "golden" not in self.caches:
                best = self.history[-1]["step"]  # no hacking seen: the final weights are the best known
        src = self.snapshot_dir / f"step-{best:08d}"
        dst = self.snapshot_dir / "best"
        shutil.rmtree(dst, ignore_errors=True)
        if src.exists():
            os.replace(src, dst)
            (dst / "step.json").write_text(json.dumps({"step": best, "verdict": self.verdict}) + "\n")
            self.best_checkpoint = dst
        for old in self.snapshot_dir.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.best_step = best

