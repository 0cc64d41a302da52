"""Stage 2: distil the student from the teacher under a data regime. One loop, written out in full.

setup  : run directory guarded, config.yaml written (rundir.prepare_run_dir) -> `setup`: world
         (stage 1, cached) -> data source -> evaluator -> student init -> optimizer -> `restore`
         (the last checkpoint when resuming)
train  : for each step, `train_step`: batch -> teacher target (cached, or a live teacher forward) ->
         student forward -> loss (sum over response tokens / tokens in the batch) -> backward -> clip
         -> step; `evaluate` at log-spaced steps; `checkpoint` every `checkpoint_every` steps and at the end
cleanup: `finish`: world.json, then done.json (the report is the caller's)
With stage2.controller on, `Controller.observe` runs after each evaluation row and may change the data
source or, with 'stop', roll the student back and end the loop (kdlab.pipeline.controller).
A killed run resumes from its last checkpoint and continues the same trajectory (every random draw
is derived from (seed, step), see kdlab.seeding).
Under `accelerate launch` each process is one data-parallel rank (kdlab.pipeline.distributed): every
rank draws the same global batch and trains on its slice; the loss is the global batch's mean; rank 0
alone writes the run directory, the metrics and the checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kdlab import losses, record, threads
from kdlab.config import RunConfig, dump_config
from kdlab.data.offline import (build_offline_dataset, load_offline_dataset, offline_dataset_ready,
                                offline_prompt_order)
from kdlab.data.regimes import MIXED, OFFLINE, ONLINE_STUDENT, ONLINE_TEACHER, TEACHER_MIXED
from kdlab.data.sources import (Batch, MixedSource, OfflineSource, OnlineStudentSource, OnlineTeacherSource,
                                TeacherMixedSource,
                                SamplingParams)
from kdlab.losses.names import LOSS_PARAMS, SEQUENCE_LOSSES
from kdlab.models import LM, bf16_autocast, check_vocab_compatible, set_dropout
from kdlab.models.decode import supports as decode_supports
from kdlab.models.prefix import PROMPT_CACHE_AUTO_BYTES, PROMPT_CACHE_MIN_USES, PromptCachedTeacher, distinct_prompts
from kdlab.models.sampling import sample
from kdlab.models.vllm_backend import check_backend, make_sampler
from kdlab.pipeline.alignment import GradientAlignment
from kdlab.pipeline.autocompile import AUTO, AutoCompile, compiler_available, inductor_cache, workload_key
from kdlab.pipeline.controller import Controller
from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.evaluate import Evaluator, eval_steps
from kdlab.pipeline.rundir import (checkpoints_newest_first, hold_run_dir, latest_checkpoint, prepare_run_dir,
                                   read_metrics, save_checkpoint, truncate_metrics, write_end_record)
from kdlab.pipeline.trackers import MultiLogger, make_logger
from kdlab.pipeline.world import World, build_world
from kdlab.policies import OFF
from kdlab.seeding import generator_for


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept on disk."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loss(cfg: RunConfig):
    c = cfg.loss
    if c.name in SEQUENCE_LOSSES:  # called by loss_on_batch with the sampled responses (kdlab.losses.minillm)
        return None
    # the loss's parameters that the config sets (loss.beta, loss.alpha, loss.mu); TAID's t comes from its schedule
    params = {p: getattr(c, p) for p in LOSS_PARAMS[c.name] if p in type(c).model_fields}
    return losses.get(c.name, **params)


def make_taid_schedule(cfg: RunConfig):
    if "t" not in LOSS_PARAMS.get(cfg.loss.name, ()):  # TAID: its interpolation t comes from this schedule
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
        sampler = sample if regime == OFFLINE else make_sampler(
            sp.backend, teacher=world.teacher, teacher_dir=world.teacher_dir,
            student_dir=world.student_init_dir, gpu_memory_utilization=sp.vllm_gpu_memory, seed=cfg.seed)
    # The sampling model's compile switch compiles its decode step (builtin sampler only).
    # ('auto' starts eager: kdlab.pipeline.autocompile turns it on mid-run when it pays)
    switch = s2.compile_teacher if regime == ONLINE_TEACHER else s2.compile_student
    compile_step = sp.backend == "builtin" and switch is True
    params = source_params(cfg, world, sampler, compile_step=compile_step and regime != OFFLINE)
    if regime == OFFLINE:
        o = s2.offline
        # The run seed chooses which prompts of the pool form the dataset (the seed varies the data).
        perm = offline_prompt_order(cfg.seed, len(pool_ids))[:o.num_prompts]
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
    if regime == ONLINE_TEACHER:
        return (OnlineTeacherSource(world.teacher, pool_ids, pool_mask, s2.batch_size, cfg.seed, params, shard),
                (pool_ids, pool_mask))
    if regime == ONLINE_STUDENT:
        return OnlineStudentSource(pool_ids, pool_mask, s2.batch_size, cfg.seed, params, shard), (pool_ids, pool_mask)
    if regime == TEACHER_MIXED:
        return (TeacherMixedSource(world.teacher, s2.mixed.teacher_alpha, pool_ids, pool_mask, s2.batch_size, cfg.seed,
                                   params, shard), (pool_ids, pool_mask))
    if regime == MIXED:
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


def teacher_view(teacher: LM | PromptCachedTeacher) -> LM | PromptCachedTeacher:
    """The compiled form of what makes live targets: `compiled` for a plain teacher; for the prompt-cached one, its
    response pass compiled (the same cache)."""
    return teacher.with_compile(True) if isinstance(teacher, PromptCachedTeacher) else compiled(teacher)


def lr_at(step: int, cfg: RunConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warm-up over `warmup_steps`, then
    constant or a linear / cosine decay towards lr x lr_final_ratio at the end of training. After the
    warm-up these are transformers' get_linear_schedule_with_warmup and
    get_cosine_with_min_lr_schedule_with_warmup (tests/test_detect_sequential.py compares them); the
    warm-up differs on purpose: step 0 trains at lr/W, not at 0."""
    s2 = cfg.stage2
    warm = s2.warmup_steps
    if warm and step < warm:
        return s2.lr * (step + 1) / warm
    if s2.lr_schedule == "constant":
        return s2.lr
    progress = min(1.0, (step - warm) / max(1, s2.steps - warm))
    shape = 1.0 - progress if s2.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return s2.lr * (s2.lr_final_ratio + (1.0 - s2.lr_final_ratio) * shape)


def lr_sum_at(step: int, cfg: RunConfig) -> float:
    """Σ_{t<step} lr_at(t): the optimisation time the proxy-only detector measures convergence in
    (`kdlab.analysis.sequential`, issue 16), so that a schedule is not read as a departure. Closed form
    for the linear warm-up and a constant rate (lr · m(m+1) / 2W over its first m = min(step, W) steps);
    a decaying schedule is summed term by term (one evaluation's cost: `steps` multiplications)."""
    warm, lr = cfg.stage2.warmup_steps, cfg.stage2.lr
    if cfg.stage2.lr_schedule != "constant":
        return math.fsum(lr_at(t, cfg) for t in range(step))
    if not warm:
        return lr * step
    m = min(step, warm)
    return lr * (m * (m + 1) / (2 * warm) + max(step - warm, 0))


@dataclass
class DeltaBases:
    """Delta-KD's two frozen reference models (loss.target: delta; kdlab.losses.delta)."""

    teacher_base: LM  # the teacher before its stage-1 SFT
    student_base: LM  # the student stage 2 starts from
    alpha: float

    @classmethod
    def for_world(cls, cfg: RunConfig, world: World, device) -> "DeltaBases":
        from kdlab.pipeline.stage1 import TEACHER, base_model

        t0 = base_model(TEACHER, cfg, world.teacher.vocab_size, device, world.teacher.tokenizer)
        s0 = world.load_student_init(device=device)
        for lm in (t0, s0):
            lm.hf.eval().requires_grad_(False)
        return cls(t0, s0, cfg.loss.delta_alpha)

    @torch.no_grad()
    def shift(self, target, p_ids, p_mask, r_ids, r_mask) -> torch.Tensor:
        """Delta-KD's target (log-probs) from the teacher's: dense logits or log-probs, or a HiddenTarget."""
        if isinstance(target, losses.HiddenTarget):
            B, T = target.hidden.shape[:2]
            target = target.flat_logits(None).view(B, T, -1)
        elif not isinstance(target, torch.Tensor):
            raise ValueError("loss.target='delta' needs the teacher's full distribution, not a top-k target")
        return losses.delta_target(target, self.teacher_base.response_logits(p_ids, p_mask, r_ids, r_mask),
                                   self.student_base.response_logits(p_ids, p_mask, r_ids, r_mask), self.alpha)


def loss_on_batch(student: LM, teacher: LM, batch: Batch, loss_fn, cfg: RunConfig, taid_t: float | None,
                  device, delta: DeltaBases | None = None) -> tuple[torch.Tensor, int]:
    """Sum of per-token losses over the batch's response tokens, and the number of those tokens.

    The caller divides by the token count (globally, across accumulation steps or ranks), so that the
    result equals one big batch's mean whatever the split. With `delta`, the target is Delta-KD's shift of the
    teacher's (kdlab.losses.delta).
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
        target = type(target)(*(None if t is None else t.to(device) for t in target))
    if delta is not None:
        target = delta.shift(target, p_ids, p_mask, r_ids, r_mask)
    if cfg.loss.name in SEQUENCE_LOSSES:  # MiniLLM: the policy-gradient surrogate on the sampled responses
        c = cfg.loss
        logits = student.response_logits(p_ids, p_mask, r_ids, r_mask)
        behaviour = batch.behaviour_logprobs.to(device) if batch.behaviour_logprobs is not None else None
        per_token = losses.minillm_surrogate(logits, target, r_ids, r_mask, behaviour_logprobs_BxT=behaviour,
                                             weights=c.minillm_weights, clip=c.minillm_clip,
                                             length_norm=c.minillm_length_norm)
        return per_token.sum(), int(r_mask.sum())
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


@dataclass
class Stage2:
    """What the stage-2 loop works with, made once by `setup`.

    `model` is what trains (DDP/FSDP-wrapped under accelerate, else `student.hf` itself); `student`
    keeps the plain module for sampling, evaluation and checkpoints; `trainee` is the student whose
    forward the loss runs (`student`, its wrapped view, or a compiled view sharing its parameters)."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    dist: Distributed
    world: World
    source: OfflineSource | OnlineTeacherSource | OnlineStudentSource | MixedSource
    evaluator: Evaluator
    student: LM
    model: torch.nn.Module
    trainee: LM
    target_teacher: LM | PromptCachedTeacher  # what makes live targets: the teacher (compiled or not, prompt cache or not)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    taid: losses.TAIDSchedule | None
    alignment: GradientAlignment | None
    logger: MultiLogger | None  # rank 0 only
    controller: Controller | None = None  # stage2.controller (None when its policy is 'off')
    delta: DeltaBases | None = None  # loss.target: delta
    autocompile: AutoCompile | None = None  # stage2.compile_* = 'auto' (kdlab.pipeline.autocompile)


@dataclass
class Counters:
    """Where the loop is; a checkpoint saves these beside the weights. `loss_sum` / `loss_count`
    accumulate the training loss since the last evaluation (its `train_loss`)."""

    step: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def run(cfg: RunConfig, resume: bool = False, log=print, progress: bool = True, on_step=None) -> Path:
    """Run (or resume) one experiment into `cfg.output_dir`. Returns the run directory.

    `on_step(step, total)`, when given, is called after every optimizer step (the demo uses it to
    report the progress of runs in worker processes). A second process on the same run directory is
    refused (`RunDirectoryInUse`) while this one runs; the lock dies with the process."""
    with hold_run_dir(Path(cfg.output_dir)):
        return _run(cfg, resume, log, progress, on_step)


def _run(cfg: RunConfig, resume: bool, log, progress: bool, on_step) -> Path:
    # ---------------------------------------------------------------------------------- setup
    threads.apply(cfg.threads)  # the cores free now, unless the config or $KDLAB_THREADS says (kdlab.threads)
    dist = Distributed.from_environment(cfg.device)  # a no-op unless started by `accelerate launch`
    dist.check_supported(cfg)
    if cfg.stage2.regime != OFFLINE:
        check_backend(cfg.stage2.sampling.backend)  # a missing vLLM is reported before any work
    device = dist.device or resolve_device(cfg.device)
    if not dist.is_main:
        log, progress, on_step = (lambda message: None), False, None
    run_dir = Path(cfg.output_dir)
    prepare_run_dir(run_dir, dump_config(cfg), resume, dist)
    s = setup(cfg, run_dir, device, dist, log)
    c = restore(s, resume, log)
    if s.logger is not None:
        s.logger.start(c.step)

    # ---------------------------------------------------------------------------------- train
    total = cfg.stage2.steps
    evals = set(eval_steps(total, cfg.eval.num_points))
    done = {r[record.STEP] for r in read_metrics(run_dir / record.METRICS)}
    # A progress bar redraws itself with carriage returns, which litter a log file: on a terminal
    # only; elsewhere one plain line per evaluation (log-spaced steps).
    interactive = progress and sys.stderr.isatty()
    plain_progress = progress and not interactive
    aligned: dict = {}  # the last alignment measurement, written into the next evaluation row
    stopped = s.controller is not None and s.controller.stopped  # a stopped run resumed: nothing left to train
    if c.step == 0 and 0 not in done:
        row = evaluate(s, c, aligned)
        if plain_progress:
            log(_progress_line(cfg, row, c.step))
        stopped = s.controller is not None and s.controller.observe(s, c.step)
        if stopped:
            checkpoint(s, c)
    bar = tqdm(total=total, initial=c.step, desc=f"stage 2: {cfg.name} (seed {cfg.seed})", disable=not interactive,
               dynamic_ncols=True, leave=False)
    t0 = time.time()
    while c.step < total and not stopped:
        if s.autocompile is not None:
            s.autocompile.start_step()
        align = s.alignment is not None and c.step + 1 in evals
        try:
            loss, n_tokens, measured = train_step(s, c.step, align=align)
        except Exception as err:  # noqa: BLE001 — only a failed 'auto' compile is caught; anything else re-raised
            if s.autocompile is None or not s.autocompile.compile_failed(err):
                raise
            # the compile failed in the step's forward or backward, before the optimizer step: the same step again,
            # eager (its batch and dropout come from (seed, step), so the retry trains on what the first try saw)
            loss, n_tokens, measured = train_step(s, c.step, align=align)
        if s.autocompile is not None:
            s.autocompile.end_step(total - c.step - 1)
        aligned = measured or aligned
        c.step += 1
        c.tokens += n_tokens
        c.loss_sum += loss
        c.loss_count += 1
        if c.step in evals:
            row = evaluate(s, c, aligned)
            if plain_progress:
                log(_progress_line(cfg, row, c.step))
            bar.set_postfix(loss=f"{row[record.TRAIN_LOSS]:.3f}", proxy=_fmt(row.get(record.PROXY)),
                            golden=_fmt(row.get(record.GOLDEN)))
            # the controller acts on the curve so far, before this step's checkpoint (which saves its state)
            stopped = s.controller is not None and s.controller.observe(s, c.step)
        if c.step % cfg.stage2.checkpoint_every == 0 or c.step == total or stopped:
            checkpoint(s, c)
        bar.update(1)
        if on_step is not None:
            on_step(c.step, total)
    bar.close()

    # ---------------------------------------------------------------------------------- cleanup
    if s.logger is not None:
        s.logger.close()
    dist.barrier()
    if dist.is_main:
        finish(s, c.step if stopped else total, time.time() - t0, log)
    return run_dir


def setup(cfg: RunConfig, run_dir: Path, device, dist: Distributed, log) -> Stage2:
    """The world (stage 1, cached), the batch source, the evaluator, the student, its optimizer."""
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
    if True in (cfg.stage2.compile_student, cfg.stage2.compile_teacher):
        inductor_cache(cfg.resolved_cache_dir())
    prompt_cache = make_prompt_cache(cfg, world.teacher, source, dist, log)
    target_teacher = prompt_cache if prompt_cache is not None else world.teacher
    if cfg.stage2.compile_teacher is True:
        target_teacher = teacher_view(target_teacher)
    optimizer = make_optimizer(student.hf.parameters(), cfg)
    model, optimizer = dist.prepare(student.hf, optimizer)
    trainee = dist.trainee(student, model)
    if cfg.stage2.compile_student is True:
        if dist.enabled:
            raise ValueError("stage2.compile_student supports single-process runs; under accelerate launch "
                             "set it to false")
        trainee = compiled(student)  # the same parameters: the optimizer and checkpoints are unchanged
    model.train()
    logger = make_logger(cfg, run_dir) if dist.is_main else None
    controller = None
    if cfg.stage2.controller.policy != OFF:
        if dist.enabled:
            raise ValueError("stage2.controller supports single-process runs; under accelerate launch set "
                             "stage2.controller.policy to 'off'")
        controller = Controller(cfg, run_dir, world.teacher, world.prompts["stage2"], source_params(cfg, world))
    alignment = None
    if cfg.eval.grad_alignment:
        if dist.enabled:
            raise ValueError("eval.grad_alignment supports single-process runs; under accelerate launch set it to false")
        alignment = GradientAlignment.for_world(world, *world.prompts["stage2"], cfg.stage2.batch_size, cfg.seed,
                                                source_params(cfg, world))
    s = Stage2(cfg=cfg, run_dir=run_dir, device=device, dist=dist, world=world, source=source,
                  evaluator=evaluator, student=student, model=model, trainee=trainee, target_teacher=target_teacher,
                  optimizer=optimizer, loss_fn=loss_fn, taid=taid, alignment=alignment, logger=logger,
                  delta=DeltaBases.for_world(cfg, world, device) if cfg.loss.target == "delta" else None,
                  controller=controller)
    s.autocompile = make_autocompile(s, log)
    return s


def _sampling_sources(source):
    """The online sources inside `source` (a mixed regime holds two), for their decode step's compile switch."""
    if isinstance(source, MixedSource):
        return [*_sampling_sources(source.on_policy), *_sampling_sources(source.other)]
    return [source] if isinstance(source, (OnlineStudentSource, OnlineTeacherSource)) else []


def _live_target_prompts(source, backend: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt pools of the sources in `source` whose batches get live teacher targets (a teacher forward in
    `loss_on_batch`): what the prompt cache runs and what 'auto' compiles the teacher forward for. `backend`:
    stage2.sampling.backend (vLLM returns no logits, so its online_teacher batches need the forward too)."""
    if isinstance(source, MixedSource):
        return [*_live_target_prompts(source.on_policy, backend), *_live_target_prompts(source.other, backend)]
    if isinstance(source, OfflineSource):
        return [] if source.use_cached_targets else [(source.data.prompt_ids, source.data.prompt_mask)]
    if isinstance(source, OnlineStudentSource) or (isinstance(source, OnlineTeacherSource) and backend == "vllm"):
        return [(source.prompt_ids, source.prompt_mask)]
    return []  # builtin online_teacher and teacher_mixed: the targets come out of the sampling pass


def make_prompt_cache(cfg: RunConfig, teacher: LM, source, dist: Distributed, log) -> PromptCachedTeacher | None:
    """`stage2.teacher_prompt_cache`: the teacher whose live targets reuse each prompt's keys and values
    (kdlab.models.prefix), its prompt pool run once here; None where it is off or does not apply."""
    setting = cfg.stage2.teacher_prompt_cache
    if setting is False:
        return None
    pools = _live_target_prompts(source, cfg.stage2.sampling.backend)
    if not pools:
        if setting is True:
            log("[stage 2] stage2.teacher_prompt_cache=true: this regime makes no live teacher targets; not used")
        return None
    if dist.enabled or not decode_supports(teacher.hf):
        if setting is True:
            why = ("supports single-process runs; under accelerate launch" if dist.enabled else
                   f"covers Llama and Qwen2 teachers (kdlab.models.decode.supports), not {type(teacher.hf).__name__}; for this teacher")
            raise ValueError(f"stage2.teacher_prompt_cache=true {why} set it to 'auto' or false")
        return None
    if setting == AUTO:
        distinct = distinct_prompts(pools)
        uses = cfg.stage2.steps * cfg.stage2.batch_size / max(distinct, 1)
        if uses < PROMPT_CACHE_MIN_USES:
            log(f"[stage 2] teacher prompt cache: off ({cfg.stage2.steps} steps x {cfg.stage2.batch_size} use each of "
                f"{distinct} prompts {uses:.2f} times on average; 'auto' runs the pool once from "
                f"{PROMPT_CACHE_MIN_USES:g} uses)")
            return None
    cache = PromptCachedTeacher(teacher, budget_bytes=None if setting is True else PROMPT_CACHE_AUTO_BYTES)
    t0 = time.time()
    with bf16_autocast(teacher.device, cfg.precision == "bf16"):
        for ids, mask in pools:
            cache.warm(ids, mask)
    st = cache.stats
    capped = (f" ({st['refused']} prompts past the {PROMPT_CACHE_AUTO_BYTES / 2**30:g} GiB cap of 'auto': they run "
              "the full forward)" if st["refused"] else "")
    log(f"[stage 2] teacher prompt cache: {st['prompts']} prompts, {st['bytes'] / 2**20:.1f} MiB, "
        f"run in {time.time() - t0:.1f} s{capped}")
    return cache


def make_autocompile(s: Stage2, log) -> AutoCompile | None:
    """The 'auto' compile switches of `s` (None when nothing is 'auto' or nothing could be compiled here).

    'auto' covers what the explicit switch would compile: the student's training forward and its on-policy
    decode step; the teacher's live-target forward and its online_teacher decode step."""
    s2, world = s.cfg.stage2, s.world
    regime = s2.regime
    auto = []
    if s2.compile_student == AUTO and not s.dist.enabled:
        auto.append("student")
    live_teacher = bool(_live_target_prompts(s.source, s2.sampling.backend))
    if s2.compile_teacher == AUTO and (live_teacher or regime == ONLINE_TEACHER):
        auto.append("teacher")
    if not auto:
        return None
    if not compiler_available(s.device):
        log("[compile auto] no C++ compiler found (g++, c++, clang++, $CXX): eager throughout")
        return None
    inductor_cache(s.cfg.resolved_cache_dir())
    eager_trainee, eager_teacher = s.trainee, s.target_teacher
    decoders = {OnlineStudentSource: "student", OnlineTeacherSource: "teacher"}  # whose decode step each samples

    views: dict = {}  # the compiled views, made once: the measurement switches back and forth

    def view(name: str, lm):
        if name not in views:
            views[name] = teacher_view(lm) if name == "teacher" else compiled(lm)
        return views[name]

    def switch(on: bool) -> None:
        if "student" in auto:
            s.trainee = view("student", s.student) if on else eager_trainee
            if s.controller is not None:
                s.controller.compile_student = on
        if "teacher" in auto and live_teacher:
            s.target_teacher = view("teacher", eager_teacher) if on else eager_teacher
        for src in _sampling_sources(s.source) if s2.sampling.backend == "builtin" else []:
            if decoders[type(src)] in auto:
                src.params = dataclasses.replace(src.params, compile_step=on)

    models = tuple(auto)
    key = workload_key(s.cfg, regime, models, prompt_cache=isinstance(eager_teacher, PromptCachedTeacher))
    return AutoCompile(key, models, s.cfg.resolved_cache_dir(), switch, log)


def train_step(s: Stage2, step: int, align: bool = False) -> tuple[float, int, dict | None]:
    """One optimizer step on the global batch of `step`: batch -> teacher target -> student forward ->
    loss (sum over this rank's response tokens / tokens in the global batch) -> backward -> clip -> step.

    Returns the global batch's mean per-token loss, its token count, and, with `align`, the gradient
    alignment measured between backward and the update (`kdlab.pipeline.alignment`; else None)."""
    cfg, dist, device, model = s.cfg, s.dist, s.device, s.model
    bf16 = cfg.precision == "bf16"
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    model.eval()  # sampling mode for on-policy batches (no dropout in kdlab's models either way)
    with bf16_autocast(device, bf16):
        batch = dist.shard(s.source.batch(step, s.student))  # this rank's rows of the global batch
    model.train()
    # dropout None keeps the checkpoints' own rates, which may be non-zero (T5: 0.1)
    if cfg.models.dropout != 0.0:
        # Dropout draws from the global RNG: seed it from (seed, step) so that a resumed run repeats
        # the uninterrupted one. (With dropout 0, the default, the caller's global RNG is left alone.)
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator_for(cfg.seed, "dropout", step))))
    taid_t = s.taid.t if s.taid is not None else None
    with bf16_autocast(device, bf16):  # the losses themselves compute in float32 (kdlab.losses)
        loss_rank, n_rank = loss_on_batch(s.trainee, s.target_teacher, batch, s.loss_fn, cfg, taid_t, device,
                                          s.delta)
    # Token count of the whole global batch (float64 all-reduce: exact for any realistic count).
    n_tokens = int(dist.sum(torch.tensor(float(n_rank), dtype=torch.float64, device=loss_rank.device)).item())
    loss = dist.sum(loss_rank.detach()) / max(n_tokens, 1)  # the global batch's mean per-token loss
    if not torch.isfinite(loss):
        last = latest_checkpoint(s.run_dir / record.CHECKPOINTS)
        raise TrainingDiverged(
            f"the {cfg.loss.name} loss became {loss.item()} at step {step + 1} of {cfg.name!r}. "
            f"The last good checkpoint is {last or 'none (no checkpoint written yet)'}; "
            f"lower stage2.lr (now {cfg.stage2.lr}), set stage2.grad_clip, or check the teacher targets, "
            "then rerun (with --resume to continue from that checkpoint).")
    s.optimizer.zero_grad(set_to_none=True)
    # DDP/FSDP average gradients over the W ranks, so each backpropagates W x its share of the
    # global mean; the average is then the gradient of the global mean (2 x 8 == 1 x 16).
    (loss_rank * dist.world_size / max(n_tokens, 1)).backward()
    aligned = None
    if align:
        def fresh_loss(b):
            with bf16_autocast(device, bf16):
                total, n = loss_on_batch(s.trainee, s.target_teacher, b, s.loss_fn, cfg, taid_t, device, s.delta)
            return total / max(n, 1)
        aligned = {"step": step + 1, **s.alignment.measure(step, list(s.student.hf.parameters()), fresh_loss)}
    if cfg.stage2.grad_clip:
        dist.clip_grad_norm_(model, cfg.stage2.grad_clip)
    s.optimizer.step()
    if s.taid is not None:
        s.taid.update(loss.item())
    return loss.item(), n_tokens, aligned


def evaluate(s: Stage2, c: Counters, aligned: dict) -> dict:
    """The evaluation row at step `c.step`, logged by rank 0; resets the running training loss.

    Every rank evaluates (same weights, same prompts: the same numbers; FSDP needs all ranks in the
    forward pass); rank 0 alone writes."""
    cfg, step = s.cfg, c.step
    s.model.eval()
    epochs_per_step = s.source.epochs(1) if isinstance(s.source, OfflineSource) else None
    row = {record.STEP: step, record.TOKENS: c.tokens, record.REGIME: cfg.stage2.regime, record.CONDITION: cfg.name,
           record.SEED: cfg.seed, record.TRAIN_LOSS: c.loss_sum / c.loss_count if c.loss_count else None,
           record.EPOCHS: step * epochs_per_step if epochs_per_step is not None else None,
           # the rate of the last step taken, and the cumulative rate (the detector's time axis)
           record.LR: lr_at(max(step - 1, 0), cfg), record.LR_SUM: lr_sum_at(step, cfg)}
    row.update(s.evaluator(s.student, step, per_prompt_dir=s.run_dir / record.PER_PROMPT if s.dist.is_main else None))
    if s.taid is not None:
        row[record.TAID_T] = s.taid.t
    if aligned.get("step") == step:
        row.update({k: v for k, v in aligned.items() if k != "step"})
    if s.controller is not None:
        row.update(s.controller.columns())
    if s.logger is not None:
        s.logger.log(row)
    c.loss_sum, c.loss_count = 0.0, 0
    s.model.train()
    return row


def checkpoint(s: Stage2, c: Counters) -> None:
    """checkpoints/step-N: weights, optimizer state and the counters (`restore` reads them back)."""
    weights, optimizer_state = s.dist.checkpoint_views(s.model, s.optimizer)  # FSDP: every rank gathers
    if not s.dist.is_main:
        return
    state = {"tokens": c.tokens, "loss_sum": c.loss_sum, "loss_count": c.loss_count,
             "taid": s.taid.state_dict() if s.taid is not None else None}
    if s.controller is not None:
        state["controller"] = s.controller.state_dict()
    save_checkpoint(s.run_dir / record.CHECKPOINTS, c.step, weights, optimizer_state, state,
                    hf_config=s.student.hf.config, tokenizer=s.student.tokenizer)


def restore(s: Stage2, resume: bool, log) -> Counters:
    """Where the loop starts. Resuming: the last checkpoint's weights, optimizer and TAID state are
    restored in place and the metrics rows after it dropped (they are redone). Otherwise step 0, with
    an empty metrics log."""
    metrics_path = s.run_dir / record.METRICS
    c, state, first_error = Counters(), None, None
    # The newest readable checkpoint: a truncated latest one (a kill or a full disk mid-write) falls back to
    # the previous one rather than stopping the resume.
    for ckpt in checkpoints_newest_first(s.run_dir / record.CHECKPOINTS) if resume else []:
        try:
            state = s.dist.load_checkpoint(ckpt, s.student.hf, s.model, s.optimizer)
            break
        except RuntimeError as err:
            first_error = first_error or err
            log(f"[stage 2] {err}; trying the previous checkpoint")
    if resume and state is None and first_error is not None:
        raise first_error
    if state is not None:
        c = Counters(step=state["step"], tokens=state["tokens"], loss_sum=state["loss_sum"],
                     loss_count=state["loss_count"])
        if s.taid is not None:
            s.taid.load_state_dict(state["taid"])
        if s.controller is not None:
            s.controller.load_state_dict(s, state.get("controller"))
        if s.dist.is_main:
            truncate_metrics(metrics_path, c.step)
        log(f"[stage 2] resumed {s.run_dir} at step {c.step}")
    elif s.dist.is_main:
        metrics_path.unlink(missing_ok=True)
        if s.controller is not None:
            s.controller.load_state_dict(s, None)  # a fresh start: no actions, no controller.jsonl
    s.dist.barrier()
    return c


def finish(s: Stage2, total: int, seconds: float, log) -> None:
    """The end-of-run record (rank 0): world.json, then done.json last. `total`: the steps trained (fewer than
    stage2.steps when the controller stopped the run; done.json then says so, and why)."""
    cfg = s.cfg
    rows = read_metrics(s.run_dir / record.METRICS)
    final = rows[-1] if rows else {}
    done = {"steps": total, "seconds_this_session": round(seconds, 1), "processes": s.dist.world_size}
    note = ""
    if s.controller is not None:
        done["controller"] = summary = s.controller.finish()
        if summary["stopped_early"]:
            stop = summary["stop"]
            final = {record.PROXY: stop["restored_proxy_fkl"], record.GOLDEN: stop["restored_golden_fkl"]}
            note = (f" (stopped by the controller: {stop['detector']} fired at step {stop['step']}, onset "
                    f"{stop['onset_step']}; the weights of step {stop['restored_step']} restored)")
    write_end_record(s.run_dir, {**s.world.info, **s.evaluator.world_info}, done)
    log(f"[done] {cfg.name} seed {cfg.seed}: {total} steps{note}, proxy {_fmt(final.get(record.PROXY))}, "
        f"golden {_fmt(final.get(record.GOLDEN))} nats/response -> {s.run_dir}")


def _progress_line(cfg: RunConfig, row: dict, step: int) -> str:
    """One plain line per evaluation, for output that is not a terminal."""
    return (f"[stage 2] {cfg.name} seed {cfg.seed}: step {step}/{cfg.stage2.steps}, loss {_fmt(row[record.TRAIN_LOSS])}, "
            f"proxy {_fmt(row.get(record.PROXY))}, golden {_fmt(row.get(record.GOLDEN))}")


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


