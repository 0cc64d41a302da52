"""Stage 2: distil the student from the teacher under a data regime. One loop, written out in full.

setup  : world (stage 1, cached) -> student init -> data source -> optimizer -> evaluator
train  : for each step: batch -> teacher target (cached, or a live teacher forward) -> student
         forward -> loss (sum over response tokens / tokens in the batch) -> backward -> clip -> step;
         evaluate at log-spaced steps; checkpoint every `checkpoint_every` steps and at the end
cleanup: final summary, report
A killed run resumes from its last checkpoint and continues the same trajectory (every random draw
is derived from (seed, step), see kdlab.seeding).
Under `accelerate launch` each process is one data-parallel rank (kdlab.pipeline.distributed): every
rank draws the same global batch and trains on its slice; the loss is the global batch's mean; rank 0
alone writes the run directory, the metrics and the checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdlab import losses, record
from kdlab.config import RunConfig, dump_config
from kdlab.data.offline import build_offline_dataset, load_offline_dataset, offline_dataset_ready
from kdlab.data.regimes import (Batch, MixedSource, OfflineSource, OnlineStudentSource, OnlineTeacherSource,
                                SamplingParams)
from kdlab.models import LM, bf16_autocast, check_vocab_compatible, set_dropout
from kdlab.models.sampling import sample
from kdlab.models.vllm_backend import check_backend, make_sampler
from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.evaluate import Evaluator, eval_steps
from kdlab.pipeline.rundir import (atomic_write_json, atomic_write_text, latest_checkpoint,
                                   read_metrics, save_checkpoint, truncate_metrics)
from kdlab.pipeline.trackers import make_logger
from kdlab.pipeline.world import World, build_world
from kdlab.seeding import generator_for


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept on disk."""


class RunDirectoryInUse(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loss(cfg: RunConfig):
    c = cfg.loss
    params = {"generalized_jsd": {"beta": c.beta}, "skew_kl": {"alpha": c.alpha},
              "skew_reverse_kl": {"alpha": c.alpha}}.get(c.name, {})
    return losses.get(c.name, **params)


def make_taid_schedule(cfg: RunConfig):
    if cfg.loss.name != "taid":
        return None
    c = cfg.loss
    return losses.TAIDSchedule(cfg.stage2.steps, t_start=c.taid_t_start, t_end=c.taid_t_end,
                               alpha=c.taid_step_size, beta=c.taid_momentum)


def source_params(cfg: RunConfig, world: World, sampler=sample, compile_step: bool = False) -> SamplingParams:
    """How a batch source samples responses: the run's sampling settings and the world's EOS."""
    sp = cfg.stage2.sampling
    return SamplingParams(max_new_tokens=cfg.world.max_response_tokens, temperature=sp.temperature,
                          top_k=sp.top_k, top_p=sp.top_p, eos_token_id=world.eos_token_id, sampler=sampler,
                          compile_step=compile_step)


def make_source(cfg: RunConfig, world: World, run_dir: Path, log, regime: str | None = None, sampler=None,
                shard: tuple[int, int] = (0, 1)):
    """The stage-2 batch source of the configured regime, and the prompts it trains on. ``shard`` =
    (rank, number of processes): the online sources sample only this rank's rows."""
    s2 = cfg.stage2
    regime = regime or s2.regime
    pool_ids, pool_mask = world.prompts["stage2"]
    sp = s2.sampling
    if sampler is None:  # the online regimes' sampler: transformers generate, or vLLM engines
        sampler = sample if regime == "offline" else make_sampler(
            sp.backend, teacher=world.teacher, teacher_dir=world.teacher_dir,
            student_dir=world.student_init_dir, gpu_memory_utilization=sp.vllm_gpu_memory, seed=cfg.seed)
    # The sampling model's compile switch compiles its decode step (builtin sampler only).
    compile_step = sp.backend == "builtin" and (s2.compile_teacher if regime == "online_teacher" else s2.compile_student)
    params = source_params(cfg, world, sampler, compile_step=compile_step and regime != "offline")
    if regime == "offline":
        o = s2.offline
        # The run seed chooses which prompts of the pool form the dataset (the seed varies the data).
        perm = torch.randperm(len(pool_ids), generator=generator_for(cfg.seed, "offline-prompts"))[:o.num_prompts]
        ids, mask = pool_ids[perm], pool_mask[perm]
        path = run_dir / record.OFFLINE_DATA
        if not offline_dataset_ready(path):
            log(f"[stage 2] offline dataset: {o.num_prompts} prompts x {o.generations_per_prompt} teacher samples")
            build_offline_dataset(
                world.teacher, ids, mask, generations_per_prompt=o.generations_per_prompt,
                max_new_tokens=params.max_new_tokens, generator=generator_for(cfg.seed, "offline-samples"),
                out_dir=path, targets=o.targets, topk=o.topk, target_memory_mb=o.target_memory_mb,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                eos_token_id=params.eos_token_id, batch_size=cfg.generation_batch_size)
        return OfflineSource(load_offline_dataset(path), s2.batch_size, cfg.seed), (ids, mask)
    if regime == "online_teacher":
        return (OnlineTeacherSource(world.teacher, pool_ids, pool_mask, s2.batch_size, cfg.seed, params, shard),
                (pool_ids, pool_mask))
    if regime == "online_student":
        return OnlineStudentSource(pool_ids, pool_mask, s2.batch_size, cfg.seed, params, shard), (pool_ids, pool_mask)
    if regime == "mixed":
        other, prompts = make_source(cfg, world, run_dir, log, regime=s2.mixed.other, sampler=sampler, shard=shard)
        on_policy = OnlineStudentSource(pool_ids, pool_mask, s2.batch_size, cfg.seed, params, shard)
        return MixedSource(on_policy, other, s2.mixed.lmbda, cfg.seed), prompts
    raise ValueError(f"unknown regime {regime!r}")


def make_optimizer(params, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where torch has one for the parameters' device and dtype.

    The default on CPU is a Python loop over the parameters (a dozen ops each); the fused kernel
    does the same update in one pass: 2.2 ms -> 0.6 ms per step for the 21 tensors of the issue-7
    student on 2 CPU threads (docs/LOG.md, 2026-11-23). Same update rule, equal to rounding.
    """
    params = list(params)
    kw = dict(lr=cfg.stage2.lr, weight_decay=cfg.stage2.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:  # no fused kernel for this device or dtype: torch's default implementation
        return torch.optim.AdamW(params, **kw)


def compiled(lm: LM) -> LM:
    """``lm`` with a ``torch.compile``d forward (``stage2.compile_teacher`` / ``compile_student``).

    Shares the weights (a compiled module wraps the original, so gradients, the optimizer and
    checkpoints see the same parameters); sampling and evaluation keep the eager model. Inductor fuses
    the norms, rotary and SwiGLU element-wise ops that an eager forward runs one kernel at a time:
    53 -> 42 ms median for the issue-7 teacher forward (batch 16 x 63 tokens, 2 CPU threads), and
    32 -> 26 ms for a student training step (forward, loss, backward, AdamW), each for about 15 s of
    compilation (docs/LOG.md, 2026-11-23). Shapes: the first graph is static; a batch of another shape
    (task prompts trimmed to their batch's longest) recompiles once with dynamic shapes.
    """
    out = LM(torch.compile(lm.hf), lm.tokenizer)
    out._has_logits_to_keep = lm._has_logits_to_keep
    return out


def lr_at(step: int, cfg: RunConfig) -> float:
    warm = cfg.stage2.warmup_steps
    return cfg.stage2.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)


def lr_sum_at(step: int, cfg: RunConfig) -> float:
    """Σ_{t<step} lr_at(t): the optimisation time the proxy-only detector measures convergence in
    (`kdlab.analysis.sequential`, issue 16), so that a schedule is not read as a departure. Closed form
    of the linear warm-up: lr · m(m+1) / 2W over its first m = min(step, W) steps."""
    warm, lr = cfg.stage2.warmup_steps, cfg.stage2.lr
    if not warm:
        return lr * step
    m = min(step, warm)
    return lr * (m * (m + 1) / (2 * warm) + max(step - warm, 0))


def loss_on_batch(student: LM, teacher: LM, batch: Batch, loss_fn, cfg: RunConfig, taid_t: float | None,
                  device) -> tuple[torch.Tensor, int]:
    """Sum of per-token losses over the batch's response tokens, and the number of those tokens.

    The caller divides by the token count (globally, across accumulation steps or ranks), so that the
    result equals one big batch's mean whatever the split.
    """
    p_ids, p_mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
    r_ids, r_mask = batch.response_ids.to(device), batch.response_mask.to(device)
    target = batch.teacher_target
    if target is None:
        with torch.no_grad():
            target = teacher.response_logits(p_ids, p_mask, r_ids, r_mask)
    elif isinstance(target, torch.Tensor):
        target = target.to(device)
    else:
        target = type(target)(*(t.to(device) for t in target))
    extra = {"t": taid_t} if taid_t is not None else {}
    T = cfg.loss.temperature
    if cfg.loss.lean:
        hidden = student.response_hidden(p_ids, p_mask, r_ids, r_mask)
        total = losses.lean_loss(loss_fn, hidden, student.lm_head_weight, target, r_mask,
                                 chunk_size=cfg.loss.chunk_size, reduction="sum", temperature=T, **extra)
    else:
        logits = student.response_logits(p_ids, p_mask, r_ids, r_mask)
        total = loss_fn(logits, target, r_mask, reduction="sum", temperature=T, **extra)
    return total, int(r_mask.sum())


def run(cfg: RunConfig, resume: bool = False, log=print, progress: bool = True, on_step=None) -> Path:
    """Run (or resume) one experiment into `cfg.output_dir`. Returns the run directory.

    `on_step(step, total)`, when given, is called after every optimizer step (the demo uses it to
    report the progress of runs in worker processes)."""
    # ---------------------------------------------------------------------------------- setup
    run_dir = Path(cfg.output_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = Distributed.from_environment(cfg.device)  # a no-op unless started by `accelerate launch`
    dist.check_supported(cfg)
    if cfg.stage2.regime != "offline":
        check_backend(cfg.stage2.sampling.backend)  # a missing vLLM is reported before any work
    device = dist.device or resolve_device(cfg.device)
    if not dist.is_main:
        log, progress, on_step = (lambda message: None), False, None
    metrics_path = run_dir / record.METRICS
    config_path = run_dir / record.CONFIG
    if run_dir.exists() and config_path.exists() and not resume:
        if (run_dir / record.SUMMARY).exists() or metrics_path.exists():
            raise RunDirectoryInUse(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and config_path.exists():
        saved = config_path.read_text()
        if saved != dump_config(cfg):
            differences = record.config_differences(saved, dump_config(cfg))
            raise ValueError(f"{config_path} differs from the config given in "
                             f"{len(differences)} field(s) (saved -> given):\n  " + "\n  ".join(differences)
                             + "\nresume with the same config, or choose another output_dir")
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if dist.is_main:
        atomic_write_text(config_path, dump_config(cfg))

    world = build_world(cfg, device=device, log=log, dist=dist)  # stage 1: every rank trains, rank 0 writes
    with dist.main_first():  # rank 0 builds (or loads) the caches, the others then load them
        source, train_prompts = make_source(cfg, world, run_dir, log, shard=(dist.rank, dist.world_size))
        evaluator = Evaluator(cfg, world, train_prompts, run_dir)
    student = world.load_student_init(device=device)
    if cfg.models.dropout is not None:
        set_dropout(student.hf, cfg.models.dropout)
    check_vocab_compatible(world.teacher, student, ("teacher", "student"))
    loss_fn = make_loss(cfg)
    taid = make_taid_schedule(cfg)
    target_teacher = compiled(world.teacher) if cfg.stage2.compile_teacher else world.teacher
    bf16 = cfg.precision == "bf16"
    # dropout None keeps the checkpoints' own rates, which may be non-zero (T5: 0.1)
    dropout_active = cfg.models.dropout != 0.0
    optimizer = make_optimizer(student.hf.parameters(), cfg)
    # `model` is what trains (DDP/FSDP-wrapped under accelerate, else student.hf itself); `student`
    # keeps the plain module for sampling, evaluation and checkpoints.
    model, optimizer = dist.prepare(student.hf, optimizer)
    trainee = dist.trainee(student, model)
    if cfg.stage2.compile_student:
        if dist.enabled:
            raise ValueError("stage2.compile_student supports single-process runs; under accelerate launch "
                             "set it to false")
        trainee = compiled(student)  # the same parameters: the optimizer and checkpoints are unchanged
    model.train()
    logger = make_logger(cfg, run_dir) if dist.is_main else None
    alignment = None
    if cfg.eval.grad_alignment:
        if dist.enabled:
            raise ValueError("eval.grad_alignment supports single-process runs; under accelerate launch set it to false")
        from kdlab.pipeline.alignment import GradientAlignment

        alignment = GradientAlignment.for_world(world, *world.prompts["stage2"], cfg.stage2.batch_size, cfg.seed,
                                                source_params(cfg, world))
    aligned: dict = {}  # the last alignment measurement, written into the next evaluation row

    step, tokens, loss_sum, loss_count = 0, 0, 0.0, 0
    ckpt = latest_checkpoint(run_dir / record.CHECKPOINTS) if resume else None
    if ckpt is not None:
        state = dist.load_checkpoint(ckpt, student.hf, model, optimizer)
        step, tokens = state["step"], state["tokens"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        if taid is not None:
            taid.load_state_dict(state["taid"])
        if dist.is_main:
            truncate_metrics(metrics_path, step)
        log(f"[stage 2] resumed {run_dir} at step {step}")
    elif dist.is_main:
        metrics_path.unlink(missing_ok=True)
    dist.barrier()
    if logger is not None:
        logger.start(step)

    total = cfg.stage2.steps
    evals = set(eval_steps(total, cfg.eval.num_points))
    done = {r[record.STEP] for r in read_metrics(metrics_path)}
    epochs_per_step = source.epochs(1) if isinstance(source, OfflineSource) else None
    regime = cfg.stage2.regime
    latest: dict = {}

    def evaluate() -> None:
        # Every rank evaluates (same weights, same prompts: the same numbers; FSDP needs all ranks in
        # the forward pass); rank 0 alone writes.
        nonlocal loss_sum, loss_count, latest
        model.eval()
        row = {record.STEP: step, record.TOKENS: tokens, record.REGIME: regime, record.CONDITION: cfg.name,
               record.SEED: cfg.seed, record.TRAIN_LOSS: loss_sum / loss_count if loss_count else None,
               record.EPOCHS: step * epochs_per_step if epochs_per_step is not None else None,
               # the rate of the last step taken, and the cumulative rate (the detector's time axis)
               record.LR: lr_at(max(step - 1, 0), cfg), record.LR_SUM: lr_sum_at(step, cfg)}
        row.update(evaluator(student, step, per_prompt_dir=run_dir / record.PER_PROMPT if dist.is_main else None))
        if taid is not None:
            row[record.TAID_T] = taid.t
        if aligned.get("step") == step:
            row.update({k: v for k, v in aligned.items() if k != "step"})
        if logger is not None:
            logger.log(row)
        latest = row
        if plain_progress:  # output is not a terminal: one plain line per evaluation instead of a bar
            log(f"[stage 2] {cfg.name} seed {cfg.seed}: step {step}/{total}, loss {_fmt(row[record.TRAIN_LOSS])}, "
                f"proxy {_fmt(row.get(record.PROXY))}, golden {_fmt(row.get(record.GOLDEN))}")
        loss_sum, loss_count = 0.0, 0
        model.train()

    def checkpoint() -> None:
        weights, optimizer_state = dist.checkpoint_views(model, optimizer)  # FSDP: every rank gathers
        if not dist.is_main:
            return
        save_checkpoint(run_dir / record.CHECKPOINTS, step, weights, optimizer_state, {
            "tokens": tokens, "loss_sum": loss_sum, "loss_count": loss_count,
            "taid": taid.state_dict() if taid is not None else None},
            hf_config=student.hf.config, tokenizer=student.tokenizer)

    # ---------------------------------------------------------------------------------- train
    # A progress bar redraws itself with carriage returns, which litter a log file: on a terminal
    # only; elsewhere `evaluate` logs a plain line per evaluation (log-spaced steps).
    interactive = progress and sys.stderr.isatty()
    plain_progress = progress and not interactive
    if step == 0 and 0 not in done:
        evaluate()
    bar = tqdm(total=total, initial=step, desc=f"stage 2: {cfg.name} (seed {cfg.seed})", disable=not interactive,
               dynamic_ncols=True, leave=False)
    t0 = time.time()
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.eval()  # sampling mode for on-policy batches (no dropout in kdlab's models either way)
        with bf16_autocast(device, bf16):
            batch = dist.shard(source.batch(step, student))  # this rank's rows of the global batch
        model.train()
        if dropout_active:
            # Dropout draws from the global RNG: seed it from (seed, step) so that a resumed run repeats
            # the uninterrupted one. (With dropout 0, the default, the caller's global RNG is left alone.)
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator_for(cfg.seed, "dropout", step))))
        with bf16_autocast(device, bf16):  # the losses themselves compute in float32 (kdlab.losses)
            loss_rank, n_rank = loss_on_batch(trainee, target_teacher, batch, loss_fn, cfg,
                                              taid.t if taid is not None else None, device)
        # Token count of the whole global batch (float64 all-reduce: exact for any realistic count).
        n_tokens = int(dist.sum(torch.tensor(float(n_rank), dtype=torch.float64, device=loss_rank.device)).item())
        loss = dist.sum(loss_rank.detach()) / max(n_tokens, 1)  # the global batch's mean per-token loss
        if not torch.isfinite(loss):
            last = latest_checkpoint(run_dir / record.CHECKPOINTS)
            raise TrainingDiverged(
                f"the {cfg.loss.name} loss became {loss.item()} at step {step + 1} of {cfg.name!r}. "
                f"The last good checkpoint is {last or 'none (no checkpoint written yet)'}; "
                f"lower stage2.lr (now {cfg.stage2.lr}), set stage2.grad_clip, or check the teacher targets, "
                "then rerun (with --resume to continue from that checkpoint).")
        optimizer.zero_grad(set_to_none=True)
        # DDP/FSDP average gradients over the W ranks, so each backpropagates W x its share of the
        # global mean; the average is then the gradient of the global mean (2 x 8 == 1 x 16).
        (loss_rank * dist.world_size / max(n_tokens, 1)).backward()
        if alignment is not None and step + 1 in evals:
            def fresh_loss(b):
                with bf16_autocast(device, bf16):
                    total, n = loss_on_batch(trainee, target_teacher, b, loss_fn, cfg, taid.t if taid is not None else None, device)
                return total / max(n, 1)
            aligned = {"step": step + 1, **alignment.measure(step, list(student.hf.parameters()), fresh_loss)}
        if cfg.stage2.grad_clip:
            dist.clip_grad_norm_(model, cfg.stage2.grad_clip)
        optimizer.step()
        if taid is not None:
            taid.update(loss.item())
        step += 1
        tokens += n_tokens
        loss_sum += loss.item()
        loss_count += 1
        if step in evals:
            evaluate()
            bar.set_postfix(loss=f"{latest[record.TRAIN_LOSS]:.3f}", proxy=_fmt(latest.get(record.PROXY)),
                            golden=_fmt(latest.get(record.GOLDEN)))
        if step % cfg.stage2.checkpoint_every == 0 or step == total:
            checkpoint()
        bar.update(1)
        if on_step is not None:
            on_step(step, total)
    bar.close()

    # ---------------------------------------------------------------------------------- cleanup
    if logger is not None:
        logger.close()
    dist.barrier()
    if not dist.is_main:
        return run_dir
    rows = read_metrics(metrics_path)
    final = rows[-1] if rows else {}
    atomic_write_json(run_dir / record.WORLD, {**world.info, **evaluator.teacher_golden})
    atomic_write_json(run_dir / record.DONE, {"steps": total, "seconds_this_session": round(time.time() - t0, 1),
                                              "processes": dist.world_size})
    log(f"[done] {cfg.name} seed {cfg.seed}: {total} steps, proxy {_fmt(final.get('proxy_fkl'))}, "
        f"golden {_fmt(final.get('golden_fkl'))} nats/response -> {run_dir}")
    return run_dir


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / record.DONE).exists()

