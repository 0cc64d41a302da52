"""``stage2.compile_student`` / ``compile_teacher`` = 'auto' (the default): compile when the run is long enough for
the compile to pay for itself (issue 23, item 1).

`torch.compile` makes a step faster (on the issue-7 CPU workload: 1.2x per student step, ~20% per teacher forward,
1.4x per on-policy sample; docs/LOG.md 2026-11-23) but costs 15-25 s before the first compiled step, so it pays
only in long runs. The rule, once per run:

1. The first `WARMUP` steps run eager, untimed (first calls, the allocator); the next `PROBE` steps are timed and
   t_e is their median.
2. The compile cost C and the fraction f of a step that compiling saves come from `compile-costs.json` in the
   stage-1 cache directory, measured by an earlier run of the same workload (`workload_key`: model shapes, lengths,
   regime, batch, loss, device, precision, threads, torch version); without one, the priors `PRIOR_COST_S` per
   model compiled and `PRIOR_SAVING`.
3. Compile iff steps left × t_e × f > C.
4. After compiling, the first compiled step's time less t_e is the measured C. The next 2 x `PROBE` steps alternate
   eager and compiled (the views share the weights, so switching is free), and the medians of each kind, t_e' and
   t_c, give f = 1 − t_c / t_e'. Alternating steps see the same host: a machine that slows down or speeds up while
   the run goes on (another process starting, a CPU that changes speed) moves both medians alike, where compiled
   steps timed after eager ones would charge the change to the compile. C and f are written to the record, so the
   next run of this workload decides from measurements. If compiling did not make steps faster (t_c ≥ t_e'), the
   run goes back to eager; if the compile raised, the run goes back to eager and retries that step
   (`compile_failed`).

Compiled views share the models' parameters (`distill.compiled`), so switching mid-run changes no number the
run computes beyond float rounding. The Inductor cache lives in the stage-1 cache directory too
(`inductor_cache`): a sweep's later runs reuse the compiled kernels and pay a fraction of the first compile.

Not decided here: distributed runs (compile_student is single-process; 'auto' stays eager under accelerate), and
machines without a C++ compiler on CPU (Inductor needs one: 'auto' stays eager).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

AUTO = "auto"
WARMUP, PROBE = 2, 5
# Steps after which a compiling run's choice is final: the eager probe, the compiling step, the alternating measurement.
SETTLED_AFTER = WARMUP + PROBE + 1 + 2 * PROBE
PRIOR_COST_S = 20.0  # per model compiled (the student's training forward, the teacher's forward): 15-25 s measured
PRIOR_SAVING = 0.15  # fraction of an eager step saved (measured 0.17-0.2 on the issue-7 workload; rounded down)
RECORD = "compile-costs.json"
INDUCTOR_DIR = "inductor"
_set_here: str | None = None  # the value inductor_cache last set (a later run in this process may replace it)


def inductor_cache(cache_dir: Path) -> None:
    """Keep Inductor's compiled kernels under the stage-1 cache directory, unless the user chose a place
    (``$TORCHINDUCTOR_CACHE_DIR`` set to anything but torch's default)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    global _set_here
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == _set_here or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        _set_here = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / INDUCTOR_DIR)


def compiler_available(device: torch.device) -> bool:
    """Inductor on CPU builds C++: without a compiler 'auto' stays eager (True on accelerators)."""
    if device.type != "cpu":
        return True
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))


def workload_key(cfg, regime: str, models: tuple[str, ...], prompt_cache: bool = False) -> str:
    """What makes steps cost the same: the models' architectures, the vocabulary and sequence lengths, regime,
    batch, loss, device, precision, threads, whether the teacher prompt cache is on (its 'auto' turns it on by run
    length: the setting alone does not say) and the torch version (not the seeds or stage-1 budgets: the runs of a
    study over world seeds share one measurement)."""
    w, s2 = cfg.world, cfg.stage2
    shapes = json.dumps({"models": cfg.models.model_dump(), "oracle": w.oracle, "vocab": w.vocab_size,
                         "prompt": w.prompt_length, "response": w.response_length}, sort_keys=True)
    return "|".join(str(x) for x in (shapes, regime, s2.batch_size, cfg.loss.name, cfg.loss.lean, cfg.device,
                                      cfg.precision, torch.get_num_threads(), torch.__version__, "+".join(models))
                    + (("teacher-prompt-cache",) if prompt_cache else ()))


@dataclasses.dataclass
class Decision:
    compile: bool
    reason: str


def decide(steps_left: int, eager_step_s: float, cost_s: float, saving: float) -> Decision:
    """Compile iff the time the remaining steps would save exceeds the compile cost."""
    gain = steps_left * eager_step_s * saving
    verdict = gain > cost_s
    return Decision(verdict, f"{steps_left} steps left x {eager_step_s * 1e3:.1f} ms x {saving:.0%} saved = "
                             f"{gain:.1f} s {'>' if verdict else '<='} {cost_s:.1f} s to compile")


class AutoCompile:
    """Times the stage-2 loop's steps and compiles the 'auto' models once it pays (module docstring).

    `switch(True/False)` is the loop's callback that compiles (or restores the eager models); `log` reports the
    decision in one line."""

    def __init__(self, key: str, models: tuple[str, ...], record_dir: Path, switch, log,
                 prior_cost_s: float = PRIOR_COST_S, prior_saving: float = PRIOR_SAVING, clock=time.perf_counter):
        self.key, self.models, self.switch, self.log, self.clock = key, models, switch, log, clock
        self.path = Path(record_dir) / RECORD
        known = self._read().get(key, {})
        self.cost_s = float(known.get("compile_s", prior_cost_s * len(models)))
        self.saving = float(known.get("saving", prior_saving))
        self.measured = bool(known)
        self.state = "probing"
        self.eager: list[float] = []
        self.compiled: list[float] = []  # compiled steps of the measurement
        self.paired: list[float] = []  # eager steps of the measurement, alternating with those
        self.seen = 0
        self._t = None
        self.decision: Decision | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # no record yet, or an unreadable one: decide from the priors

    def _write(self, entry: dict) -> None:
        data = self._read()
        data[self.key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    def start_step(self) -> None:
        self._t = self.clock()

    def compile_failed(self, err: Exception) -> bool:
        """Called when a training step raised. True (and back to eager, for the rest of the run) when it was the
        first step after 'auto' switched to compiled views, so the caller retries the step eagerly: a compiler that
        fails here (no working toolchain, an unsupported op) must not end a run the user never asked to compile.
        False otherwise: the error is the caller's to raise."""
        if self.state != "compiling":
            return False
        self.switch(False)
        self.state = "failed"
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        self.log(f"[compile auto] the compile failed ({type(err).__name__}: {first_line}); eager for the rest of the run")
        self._t = self.clock()  # the eager retry is timed, not the failed attempt
        return True

    def end_step(self, steps_left: int) -> None:
        """After a training step (not counting evaluation): record its time, and act when the probe is over."""
        dt = self.clock() - self._t
        self.seen += 1
        if self.state == "probing":
            if self.seen > WARMUP:
                self.eager.append(dt)
            if len(self.eager) == PROBE:
                t_e = statistics.median(self.eager)
                self.decision = decide(steps_left, t_e, self.cost_s, self.saving)
                source = "measured by an earlier run" if self.measured else "priors"
                self.log(f"[compile auto] {', '.join(self.models)}: {'compile' if self.decision.compile else 'eager'} "
                         f"({self.decision.reason}; cost and saving: {source})")
                self.state = "eager"
                if self.decision.compile:
                    self.switch(True)
                    self.state = "compiling"
        elif self.state == "compiling":
            self.first_compiled_s = dt
            self.state = "measuring"
            self.switch(False)  # the measured steps alternate, starting eager
        elif self.state == "measuring":
            was_compiled = len(self.compiled) < len(self.paired)
            (self.compiled if was_compiled else self.paired).append(dt)
            if len(self.compiled) < PROBE:
                self.switch(not was_compiled)
                return
            t_e, t_c = statistics.median(self.paired), statistics.median(self.compiled)
            cost = max(self.first_compiled_s - statistics.median(self.eager), 0.0)
            saving = 1.0 - t_c / t_e
            self._write({"compile_s": round(cost, 3), "saving": round(saving, 4), "eager_step_s": t_e,
                         "compiled_step_s": t_c, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
            kept = saving > 0
            self.log(f"[compile auto] measured over {2 * PROBE} alternating steps: compile {cost:.1f} s, step "
                     f"{t_e * 1e3:.1f} -> {t_c * 1e3:.1f} ms ({saving:+.0%}); {'kept' if kept else 'no gain: eager'}")
            self.switch(kept)
            self.state = "done"
