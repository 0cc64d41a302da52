"""A study: many stage-2 runs of one world (conditions × seeds) run in parallel worker processes.

Stage 1 and the shared evaluation references are built once in the parent process before any worker
starts, so workers only read the caches. Each worker uses one torch thread (runs of tiny models
scale better across processes than across threads) and reports its step through a queue, so the
parent shows one progress bar with the condition, the step and an ETA for the whole study. Workers end
when the parent dies, however it dies (`_start_worker`), so a killed study can be run again at once.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kdlab import record, threads
from kdlab.config import RunConfig, build_config
from kdlab.pipeline.distill import run
from kdlab.pipeline.evaluate import Evaluator
from kdlab.pipeline.rundir import is_finished
from kdlab.pipeline.world import build_world


@dataclass
class Condition:
    """One experimental condition: a name, the group of comparisons it belongs to, its overrides."""

    name: str
    group: str
    overrides: list[str] = field(default_factory=list)


def study_configs(base: RunConfig, conditions: list[Condition], seeds: list[int], out: Path,
                  cache_dir: Path | None = None) -> list[RunConfig]:
    """One config per (condition, seed), run directories `<out>/<condition>/seed-<s>`. Stage 1 is
    cached in `cache_dir` (default `<out>/.kdlab-cache`; pass a shared one to reuse a world)."""
    data = base.model_dump(mode="json")
    cache = str(cache_dir or out / ".kdlab-cache")
    configs = []
    for cond in conditions:
        for seed in seeds:
            configs.append(build_config(data, [*cond.overrides, f"name={cond.name}", f"seed={seed}",
                                               f"output_dir={out / cond.name / f'seed-{seed}'}",
                                               f"cache_dir={cache}", "threads=1"]))
    return configs


_progress_queue = None  # a worker's queue to the parent (set by _start_worker)
_stop_event = None  # set by the parent when the study is interrupted: each run stops after its current step
STOP_WAIT_S = 10.0  # how long an interrupted study waits for a worker to reach the end of a step (then terminates it)


class _Stopped(Exception):
    """A worker's run stopped because the study was interrupted."""


def _start_worker(progress_queue, stop_event) -> None:
    """Each worker process, once: keep the parent's progress queue, and end this process when the parent dies.

    A parent killed without cleanup (SIGKILL, SIGTERM, a closed terminal) used to leave its workers training, holding
    their run directories' locks, so that running the study again found its runs "in use". Each worker now exits
    when its parent's sentinel closes: the run stops where it is, its last checkpoint stays on disk, and the next
    `kdlab study` resumes it."""
    global _progress_queue, _stop_event
    _progress_queue, _stop_event = progress_queue, stop_event
    # Ctrl-C reaches the whole process group; the parent alone acts on it (`_stop`), so a worker neither dies with
    # a traceback of its own nor, as ProcessPoolExecutor's workers do, reports the interrupt and starts the next run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="kdlab-parent-watch", daemon=True).start()


def _stop(pool: ProcessPoolExecutor, stop_event) -> None:
    """End a pool's workers now: the runs not started are cancelled, the running ones stop after their current step
    (their last checkpoints stay on disk and the next `kdlab study` resumes them), and a worker still busy after
    `STOP_WAIT_S` (inside an evaluation) is terminated. `shutdown` alone would wait for every run of the study."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    stop_event.set()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.time() + STOP_WAIT_S
    for w in workers:
        w.join(timeout=max(deadline - time.time(), 0.0))
    for w in workers:
        if w.is_alive():
            w.terminate()
            w.join(timeout=30)


def _worker(cfg_json: str, resume: bool) -> str:
    import torch

    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json(cfg_json)
    key = f"{cfg.name}/seed-{cfg.seed}"
    last = [0.0]

    def on_step(step: int, total: int) -> None:
        if _stop_event.is_set():
            raise _Stopped(key)
        now = time.time()
        if now - last[0] > 0.5 or step == total:
            last[0] = now
            _progress_queue.put((key, step))

    run(cfg, resume=resume, log=lambda m: None, progress=False, on_step=on_step)
    return key


def run_study(configs: list[RunConfig], jobs: int = 2, log=print) -> list[Path]:
    """Run every config (skipping finished runs, resuming interrupted ones); returns the run dirs."""
    if not configs:
        return []
    # Stage 1 and the shared eval references, once, before the workers (they only read them).
    t0 = time.time()
    threads.apply(None)  # the parent builds stage 1 on the cores free now (its workers use one thread each)
    world = build_world(configs[0], log=log)
    Evaluator(configs[0], world, None, Path(configs[0].output_dir))
    log(f"[study] world ready in {time.time() - t0:.0f} s; {len(configs)} runs on {jobs} worker(s)")

    todo = [c for c in configs if not is_finished(Path(c.output_dir))]
    total_steps = sum(c.stage2.steps for c in todo)
    done_steps: dict[str, int] = {}
    # The bar redraws with carriage returns: on a terminal only. Elsewhere (a log file, a pipe) a plain
    # line every `every` seconds and one per finished run, so a long study is never silent.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=total_steps, desc="study", unit="step", dynamic_ncols=True, disable=not interactive)
    every, last_line, t_start = 15.0, time.time(), time.time()

    def plain_line() -> None:
        done = sum(done_steps.values())
        elapsed = time.time() - t_start
        eta = f", about {elapsed * (total_steps - done) / done:.0f} s left" if done else ""
        log(f"[study] {done}/{total_steps} steps ({100 * done / max(total_steps, 1):.0f}%), {elapsed:.0f} s{eta}")

    failures = []
    ctx = mp.get_context("spawn")
    # handed to each worker as it starts (a manager process would outlive a killed parent)
    q, stop = ctx.Queue(), ctx.Event()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_start_worker, initargs=(q, stop)) as pool:
        futures = {pool.submit(_worker, c.model_dump_json(), (Path(c.output_dir) / record.CONFIG).exists()): c
                   for c in todo}
        pending = set(futures)
        try:
            while pending:
                try:
                    while True:
                        key, step = q.get(timeout=0.2)
                        bar.update(step - done_steps.get(key, 0))
                        done_steps[key] = step
                        bar.set_postfix_str(f"{key} step {step}")
                except queue.Empty:
                    pass
                if not interactive and time.time() - last_line > every:
                    plain_line()
                    last_line = time.time()
                for fut in [f for f in pending if f.done()]:
                    pending.discard(fut)
                    cfg = futures[fut]
                    try:
                        fut.result()
                        if not interactive:
                            n_done = len(todo) - len(pending)
                            log(f"[study] {cfg.name} seed {cfg.seed} finished ({n_done}/{len(todo)} runs)")
                    except Exception as err:  # a failed run must not hide the others' results
                        failures.append((cfg.name, cfg.seed, err))
                        log(f"[study] {cfg.name} seed {cfg.seed} failed: {err}")
                        log("".join(traceback.format_exception(err))[-2000:])
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or an error here: the workers stop with the parent
            _stop(pool, stop)
            raise
    bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: " + ", ".join(f"{n}/seed-{s}" for n, s, _ in failures))
    return [Path(c.output_dir) for c in configs]
