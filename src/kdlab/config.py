"""Typed run configuration: YAML load/save, dotted overrides, validation.

Every field is documented where it is declared (`Field(description=...)`); `kdlab run --help` prints
them all (see `describe_fields`). Validation happens before any work: an unknown key, a wrong type or
an out-of-range value raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.data.regimes import (MIXED, OFF_POLICY_REGIMES, OFFLINE, ONLINE_STUDENT, ONLINE_TEACHER, REGIMES,
                                TEACHER_MIXED)
from kdlab.losses.names import LOSS_NAMES, SEQUENCE_LOSSES, TARGET_STORAGES
from kdlab.policies import DATA_POLICIES, DIVERSIFY, MIX, OFF, POLICIES, PROXY, PROXY_DETECTORS, TRIGGERS

# The allowed values of stage2.regime, stage2.mixed.other and loss.name come from the tables of the
# packages that own them (torch-free), so adding a regime or a loss touches that table only.
RegimeName = Literal[tuple(REGIMES)]
OffPolicyRegimeName = Literal[OFF_POLICY_REGIMES]
LossName = Literal[LOSS_NAMES]
StorageName = Literal[TARGET_STORAGES]
PolicyName = Literal[tuple(POLICIES)]
TriggerName = Literal[tuple(TRIGGERS)]
ProxyDetectorName = Literal[PROXY_DETECTORS]


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------
# World: the oracle and the prompt distribution


class ArchConfig(_Section):
    """A Llama-architecture model built from scratch (used for the synthetic oracle, teacher, student)."""

    hidden_size: int = Field(64, ge=8, le=65536, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, le=256, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, le=256, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width; default 4 x hidden_size."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        return self


class OracleConfig(ArchConfig):
    """The synthetic oracle: a seeded random Llama sharpened by a logit scale."""

    init_std: float = Field(1.0, gt=0, le=100, description="Std of the random weight init.")
    logit_scale: float = Field(
        4.0, gt=0, le=1000, description="Multiplies the oracle's logits: higher = peakier conditionals."
    )
    eos_token_id: int | None = Field(
        None, ge=0, description="A token that ends the synthetic oracle's responses (and so the teacher's and the "
        "student's, which learn it): responses then vary in length up to world.response_length. None (default): "
        "fixed-length responses, no EOS.")


class PoolsConfig(_Section):
    """Sizes of the disjoint prompt pools."""

    stage1: int = Field(8192, ge=1, description="Prompts for stage-1 SFT (teacher and student init).")
    stage2: int = Field(8192, ge=1, description="Prompts that stage-2 regimes draw training prompts from.")
    eval: int = Field(512, ge=2, description="Held-out prompts for proxy and golden evaluation.")


class TaskSplitsConfig(_Section):
    """Which dataset split feeds each prompt pool. Pools that share a split get disjoint slices of it."""

    stage1: str = Field("train", description="Split the stage-1 (SFT) prompts come from.")
    stage2: str = Field("train", description="Split the stage-2 training prompts come from.")
    eval: str | None = Field(
        None, description="Split the held-out evaluation prompts come from (None = the task's validation split, "
        "or its test split where it has none, as Natural Instructions).")


class TaskConfig(_Section):
    """Prompts from a real task dataset (Hugging Face `datasets`) instead of the synthetic world.

    The prompt templates of the named tasks live in one place, `kdlab.data.tasks.TASKS`."""

    name: Literal["xsum", "wmt14_en_de", "natural_instructions", "file"] = Field(
        ..., description="'xsum' (document -> summary), 'wmt14_en_de' (English -> German), "
        "'natural_instructions' (instruction + input -> output), or 'file' (a local JSONL/Parquet file "
        "with a prompt field and an optional reference field).")
    path: str | None = Field(
        None, description="Where to load the data: default the task's Hugging Face dataset name; a local "
        "directory with the same layout also works. Required for 'file': a .jsonl/.json/.parquet file.")
    config_name: str | None = Field(None, description="Dataset configuration (default: the task's, e.g. 'de-en').")
    prompt_field: str = Field("prompt", description="'file': the column holding the prompt text.")
    reference_field: str | None = Field(
        "reference", description="'file': the column holding a reference output (None = no references).")
    template: str | None = Field(
        None, description="Prompt template with {column} placeholders (default: the task's own template).")
    splits: TaskSplitsConfig = Field(default_factory=TaskSplitsConfig, description="Split of each pool.")
    max_input_tokens: int = Field(
        1024, ge=1, le=131072, description="Prompts longer than this are truncated (counted and reported).")
    max_output_tokens: int = Field(
        128, ge=1, le=131072, description="Longest response (max new tokens) sampled from any model.")


class WorldConfig(_Section):
    """The ground truth: an oracle LM and a prompt distribution."""

    oracle: str = Field(
        "synthetic",
        description="'synthetic' (a seeded random Llama, see world.synthetic), 'hf:<name or path>' "
        "for a real causal LM used as ground truth, or 'none' (no oracle: teacher and student must be "
        "'hf:' models, stage 1 is skipped, golden is not computed).",
    )
    seed: int = Field(0, ge=0, description="Seeds the oracle, the prompt pools and stage 1.")
    vocab_size: int = Field(32, ge=2, le=1_000_000, description="Synthetic world vocabulary size.")
    prompt_length: int = Field(8, ge=1, le=8192, description="Tokens per synthetic prompt (world.task: unused).")
    response_length: int = Field(
        16, ge=1, le=8192, description="Tokens per response, max new tokens (world.task: see max_output_tokens).")
    prompt_source: Literal["uniform", "oracle"] = Field(
        "uniform",
        description="How synthetic prompts are drawn: 'uniform' i.i.d. tokens, or 'oracle' samples from "
        "the oracle after a fixed start token.",
    )
    synthetic: OracleConfig = Field(default_factory=OracleConfig, description="Synthetic oracle architecture.")
    pools: PoolsConfig = Field(default_factory=PoolsConfig, description="Disjoint prompt pool sizes.")
    task: TaskConfig | None = Field(
        None, description="Prompts from a task dataset (XSum, WMT-14, Natural Instructions, a local file); "
        "None = synthetic prompts. With a task, lengths come from task.max_input/output_tokens.")

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt: the task's input limit, or the synthetic prompt length."""
        return self.task.max_input_tokens if self.task is not None else self.prompt_length

    @property
    def max_response_tokens(self) -> int:
        """Longest response (max new tokens): the task's output limit, or the synthetic response length."""
        return self.task.max_output_tokens if self.task is not None else self.response_length

    @field_validator("oracle")
    @classmethod
    def _oracle_kind(cls, value: str) -> str:
        if value not in ("synthetic", "none") and not value.startswith("hf:"):
            raise ValueError("must be 'synthetic', 'none' or 'hf:<name or path>'")
        return value

    @model_validator(mode="after")
    def _eos_in_vocabulary(self) -> "WorldConfig":
        eos = self.synthetic.eos_token_id
        if eos is not None and eos >= self.vocab_size:
            raise ValueError(f"world.synthetic.eos_token_id={eos} is not a token of the world's vocabulary "
                             f"(0..{self.vocab_size - 1}); choose one below world.vocab_size")
        return self

    @model_validator(mode="after")
    def _task_lengths(self) -> "WorldConfig":
        if self.task is None:
            return self
        for name, instead in (("prompt_length", "max_input_tokens"), ("response_length", "max_output_tokens")):
            # Compared with the default rather than `model_fields_set`: a saved config.yaml lists every field.
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"world.{name} applies to synthetic prompts; with world.task set, use "
                                 f"world.task.{instead}")
        if self.oracle == "synthetic":
            raise ValueError("world.task needs real text models: set world.oracle to 'hf:<name or path>' "
                             "(or 'none'); the synthetic oracle has no tokenizer")
        if self.task.name == "file" and not self.task.path:
            raise ValueError("world.task.name='file' needs world.task.path (a .jsonl/.json/.parquet file)")
        return self


# ----------------------------------------------------------------------------------------------
# Models and stage 1


class ModelsConfig(_Section):
    """Teacher and student architectures (or paths to pretrained models with 'hf:')."""

    teacher: ArchConfig | str = Field(
        default_factory=lambda: ArchConfig(hidden_size=64, num_layers=2, num_heads=4),
        description="Teacher architecture, or 'hf:<name or path>' to start from a pretrained model.",
    )
    student: ArchConfig | str = Field(
        default_factory=lambda: ArchConfig(hidden_size=32, num_layers=1, num_heads=2),
        description="Student architecture, or 'hf:<name or path>'.",
    )
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Weights of 'hf:' models as loaded (oracle, teacher, student): float32 master "
        "weights by default (hub checkpoints may be stored in bf16); 'auto' keeps the checkpoint's. For bf16 "
        "compute set precision: bf16.")
    @field_validator("teacher", "student")
    @classmethod
    def _pretrained_spec(cls, value):
        if isinstance(value, str) and (not value.startswith("hf:") or not value[len("hf:"):].strip()):
            raise ValueError(f"{value!r} is neither an architecture (a section such as {{hidden_size: 64, num_layers: 2, "
                             "num_heads: 4}) nor 'hf:<name or path>' (a pretrained model: hub name or save_pretrained "
                             "directory)")
        return value

    dropout: float | None = Field(
        0.0, ge=0, lt=1, description="Dropout of every model while it trains (stage-1 SFT and stage 2); "
        "pretrained checkpoints ship their own (T5: 0.1) and the paper trains with 0. None = keep the checkpoint's.")


class SFTConfig(_Section):
    """Supervised fine-tuning on oracle samples (cross-entropy on response tokens)."""

    num_samples: int = Field(4000, ge=1, description="Oracle samples (one per prompt) to train on.")
    steps: int = Field(2000, ge=0, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Sequences per step.")
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate.")


class TeacherErrorConfig(_Section):
    """A systematic, learnable teacher error on a known subset of prompts (synthetic worlds).

    The prompts whose first token is below `fraction` x vocab_size form the subset S (the prompt itself
    says whether it is in S, so a model can learn the error). On S the teacher's SFT samples come from
    the oracle at `temperature` instead of 1: below 1 the teacher learns an over-sharp oracle there,
    above 1 an over-flat one. The student's initialisation always trains on clean oracle samples.
    `fraction: 0` (the default) is a teacher trained on clean samples only."""

    fraction: float = Field(0.0, ge=0, le=1, description="Share of the vocabulary whose first-token prompts "
                            "form the error subset S (0 = no injected error).")
    temperature: float = Field(1.0, gt=0, le=100, description="Oracle sampling temperature of the teacher's "
                               "SFT samples on S (1 = no error; <1 over-sharp, >1 over-flat).")

    def subset_size(self, vocab_size: int) -> int:
        """First-token ids 0 .. k-1 form S."""
        return int(round(self.fraction * vocab_size))


class Stage1Config(_Section):
    """Stage 1: the teacher and the student initialisation, both SFT on oracle samples."""

    teacher: SFTConfig = Field(default_factory=SFTConfig, description="Teacher SFT budget.")
    student: SFTConfig = Field(
        default_factory=lambda: SFTConfig(num_samples=500, steps=300),
        description="Student initialisation SFT budget.",
    )
    teacher_error: TeacherErrorConfig = Field(
        default_factory=TeacherErrorConfig,
        description="Synthetic worlds: a systematic teacher error on a known prompt subset (off by default).")


# ----------------------------------------------------------------------------------------------
# Stage 2


class OfflineConfig(_Section):
    """A fixed dataset of teacher generations, made once and reused for many epochs."""

    num_prompts: int = Field(2048, ge=1, description="Distinct training prompts in the dataset.")
    generations_per_prompt: int = Field(1, ge=1, description="Teacher samples per prompt.")
    targets: StorageName = Field(
        "auto",
        description="Cached teacher targets: 'full' log-probs; 'hidden' (the teacher's final hidden states and "
        "output head: exact, H instead of V numbers per token); 'none' (live teacher forward every step); "
        "'auto' (the first of full, hidden, none that fits target_memory_mb: always exact); or 'topk' (the "
        "stage2.offline.topk largest log-probs: a biased target, only when asked).",
    )
    topk: int = Field(64, ge=1, description="k for top-k cached targets.")
    target_memory_mb: float = Field(1024.0, gt=0, description="Memory budget for cached targets under 'auto'.")


class MixedConfig(_Section):
    """GKD-style mixture: a fraction `lmbda` of batches on-policy, the rest from `other`."""

    lmbda: float = Field(0.5, ge=0, le=1, description="Fraction of on-policy (student-sampled) batches.")
    teacher_alpha: float = Field(
        0.2, ge=0, le=1, description="teacher_mixed regime: the teacher's share of each token's sampling "
        "distribution (MiniLLM's alpha, 0.2 in the paper).")
    other: OffPolicyRegimeName = Field(
        ONLINE_TEACHER, description="Regime of the remaining batches."
    )


class SamplingConfig(_Section):
    """How the teacher/student sample responses during stage 2."""

    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling (None = off).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (None = off).")
    backend: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="Sampler of the online regimes: 'builtin' (transformers generate, anywhere) or 'vllm' "
        "(vLLM engines on the GPU for the teacher and the weight-synced student; needs kdlab[vllm]).",
    )
    vllm_gpu_memory: float = Field(
        0.3, gt=0, lt=1, description="vllm backend: fraction of GPU memory each vLLM engine may take."
    )


class ControllerConfig(_Section):
    """The closed-loop controller (issue 20; kdlab.pipeline.controller): after each evaluation it runs the
    detectors on the curve so far and, when its trigger fires, applies a policy. Off by default. Every
    action is logged in <run>/controller.jsonl with its step, trigger and cost."""

    policy: PolicyName = Field(
        OFF, description="What to do when the trigger fires: " + "; ".join(f"'{k}': {v}" for k, v in POLICIES.items())
        + ".")
    trigger: TriggerName = Field(
        PROXY, description="Which detectors fire the controller: " + "; ".join(f"'{k}': {v}" for k, v in TRIGGERS.items())
        + ". The detectors are the ones `kdlab detect` runs, on the run's metrics so far (kdlab.analysis.analyse).")
    proxy_detector: ProxyDetectorName = Field(
        PROXY_DETECTORS[0], description="The proxy-only detector of the 'proxy' and 'any' triggers: 'proxy_deviation' "
        "(the default one of `kdlab detect`) or 'proxy_sequential' (the experimental sequential one).")
    min_step: int = Field(
        0, ge=0, description="No action at evaluations before this step (the detectors also refuse to fire until "
        "they have enough evaluations).")
    cooldown_evals: int = Field(
        2, ge=1, description="Evaluations after an action before the next one may fire (the detectors keep an "
        "alarm raised while the curve stays off its law; this gives the new data time to show).")
    max_actions: int = Field(3, ge=1, description="The most actions in one run ('mix' and 'stop' act once).")
    extra_teacher_samples: int | None = Field(
        None, ge=0, description="refresh / diversify: the most extra teacher samples (sequences) the controller may "
        "draw in the whole run (None = one offline dataset's worth, num_prompts x generations_per_prompt). An "
        "action that would pass it replaces fewer sequences; none are left = no more actions.")
    refresh_fraction: float = Field(
        0.25, gt=0, le=1, description="refresh / diversify: the fraction of the offline dataset's sequences replaced "
        "per action (the oldest first: actions go round the dataset in a fixed random order).")
    mix_lmbda: float = Field(
        0.5, gt=0, le=1, description="mix: the fraction of on-policy batches after the action (stage2.mixed.lmbda's "
        "meaning).")

    @field_validator("policy", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` (in a file or `--set stage2.controller.policy=off`) as false
        return OFF if value is False else value


class Stage2Config(_Section):
    """Stage 2: distil the student from the teacher under a data regime."""

    regime: RegimeName = Field(
        OFFLINE, description="Where (prompt, response) batches come from."
    )
    steps: int = Field(3000, ge=1, description="Optimizer steps (the budget shared across regimes).")
    batch_size: int = Field(64, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate after the warm-up: 'constant', or a 'linear' or 'cosine' decay "
        "from lr towards lr x lr_final_ratio at the end of training (as transformers' schedulers of those names). The "
        "proxy-only detector measures time in cumulative learning rate, so a decay is not read as hacking.")
    lr_final_ratio: float = Field(
        0.0, ge=0, le=1, description="Decaying schedules: the last step's learning rate as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None = no clipping).")
    offline: OfflineConfig = Field(default_factory=OfflineConfig, description="Offline dataset.")
    mixed: MixedConfig = Field(default_factory=MixedConfig, description="Mixed regime.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Response sampling.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (also at the end).")
    controller: ControllerConfig = Field(
        default_factory=ControllerConfig, description="The closed-loop controller (off by default).")
    compile_teacher: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the teacher forward that makes live targets (offline without cached "
        "targets, on-policy), and in the online_teacher regime its decode step: ~20% faster per forward on the "
        "issue-7 CPU workload, for a compile of ~15 s (needs a C++ compiler on CPU). 'auto' (default): compile "
        "once the run's first steps show that the steps left would save more than the compile costs "
        "(kdlab.pipeline.autocompile; the cost and saving measured by earlier runs are kept in the cache directory).")
    compile_student: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the student's training forward (and so its backward), and in the "
        "on-policy and mixed regimes its decode step: ~1.2x per training step and ~1.4x per on-policy sample on "
        "the issue-7 CPU workload, for a compile of ~15-25 s. Single-process runs only ('auto' stays eager under "
        "accelerate launch). 'auto' (default): as compile_teacher. Evaluation keeps the eager student (same "
        "weights).")
    teacher_prompt_cache: bool | Literal["auto"] = Field(
        "auto", description="Keep the frozen teacher's keys and values of each prompt (and its first response "
        "token's logits), so that the live teacher forward (offline without cached targets, on-policy, mixed) runs "
        "only the response tokens: the same targets up to float rounding, fewer FLOPs by prompt ÷ (prompt + "
        "response) (kdlab.models.prefix). Llama and Qwen2 teachers, single process. 'auto' (default): on where it applies and "
        "the run uses each prompt at least twice on average (steps x batch_size >= 2 x the distinct prompts): the "
        "prompt pool run once before step 1, the cache capped at 1 GiB (prompts past it run the full forward); "
        "true: on whatever the run's length, without the cap, and an error where the teacher or the run cannot use "
        "it; false: off.")


class LossConfig(_Section):
    """The token-level distillation loss (kdlab.losses)."""

    name: LossName = Field("forward_kl", description="Divergence between teacher and student at each response position; "
                           "'minillm' is MiniLLM's sequence-level reverse KL by policy gradient (stage2.regime "
                           "online_student or teacher_mixed).")
    beta: float = Field(0.5, ge=0, le=1, description="generalized_jsd: 0 = forward KL, 1 = reverse KL. "
                        "ab_divergence: β, the confidence concentration (α = 0, β = 1: reverse KL).")
    alpha: float = Field(0.1, ge=0, lt=1, description="skew_kl / skew_reverse_kl mixing weight. ab_divergence: α, "
                         "the hardness concentration (α → 1 with β = 0: forward KL; use forward_kl for that end).")
    mu: float = Field(0.5, ge=0, le=1, description="adaptive_kl: the teacher's head holds the tokens whose "
                      "cumulative probability reaches mu (0.5 in the AKL paper).")
    target: Literal["teacher", "delta"] = Field(
        "teacher", description="What the student is distilled towards: 'teacher' (its distribution), or 'delta' "
        "(Delta-KD, Cao et al. 2025: the student's own starting distribution shifted by what SFT did to the "
        "teacher, log π* = log π_student_init + delta_alpha (log π_teacher − log π_teacher_before_SFT); two extra "
        "forward passes per step; not with top-k offline targets).")
    delta_alpha: float = Field(1.0, ge=0, le=4, description="target delta: the size of the teacher's shift applied.")
    minillm_weights: Literal["none", "token", "sequence"] = Field(
        "token", description="minillm: importance weights of teacher-mixed samples: 'token' (the paper's per-token "
        "ratio, clipped at minillm_clip; biased), 'sequence' (the whole response's ratio; unbiased, higher variance) "
        "or 'none'.")
    minillm_clip: float = Field(3.0, gt=0, le=100, description="minillm: the largest per-token importance weight.")
    minillm_length_norm: bool = Field(True, description="minillm: average the future rewards over the tokens left "
                                      "(MiniLLM's length normalisation) instead of summing them.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature on both sides.")
    taid_t_start: float = Field(0.4, ge=0, le=1, description="taid: initial interpolation t.")
    taid_t_end: float = Field(1.0, ge=0, le=1, description="taid: final interpolation t.")
    taid_momentum: float = Field(0.99, ge=0, lt=1, description="taid: momentum of the adaptive update.")
    taid_step_size: float = Field(5e-4, ge=0, le=1, description="taid: step size of the adaptive update.")
    lean: bool = Field(
        False,
        description="Compute the loss from hidden states chunk by chunk (never materialising all "
        "student logits); for large vocabularies.",
    )
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk on the lean path.")


class EvalConfig(_Section):
    """Evaluation at log-spaced steps on held-out prompts."""

    num_points: int = Field(24, ge=2, le=10_000, description="Log-spaced evaluation steps (plus 0 and the last).")
    num_prompts: int = Field(512, ge=2, description="Held-out prompts (at most world.pools.eval).")
    samples_per_prompt: int = Field(1, ge=1, description="Reference samples per prompt.")
    batch_size: int = Field(256, ge=1, description="Sequences per evaluation forward pass.")
    reverse: bool = Field(False, description="Also compute reverse KL (needs fresh student samples each time).")
    storage: StorageName = Field(
        "auto",
        description="How the held-out references' distributions are held. 'auto': full log-probs if they fit "
        "eval.memory_mb, else the reference's final hidden states and output head (logits recomputed chunk by "
        "chunk), else the live model: all exact. 'topk' keeps the eval.topk largest log-probs: a LOWER BOUND "
        "of the KL, labelled so in every metrics row (<metric>_storage).",
    )
    memory_mb: int = Field(1024, ge=0, description="Memory each evaluation reference may use under 'auto' (MiB).")
    topk: int = Field(256, ge=1, description="k for eval.storage=topk.")
    train_prompts: int = Field(
        256, ge=0, description="Training prompts on which the divergence to the teacher is also logged (0 = off)."
    )
    task_metrics: Literal["off", "auto", "rouge", "bleu"] = Field(
        "off", description="Task metrics on greedy-decoded student outputs at each evaluation (world.task only): "
        "'auto' = the task's metric (ROUGE for xsum/natural_instructions/file, BLEU for wmt14_en_de). "
        "Scored against the dataset references and against the oracle's greedy outputs. Off by default: "
        "decoding costs far more than a divergence evaluation.")
    task_metric_prompts: int = Field(
        128, ge=1, description="Held-out prompts decoded for the task metrics (at most eval.num_prompts).")
    drift: bool = Field(
        False, description="Log the drift panel at each evaluation (kdlab.metrics.drift): student against teacher "
        "response length and runs without EOS, EOS mass, per-token entropy (and the oracle's), n-gram repetition, "
        "top-k overlap and the exposure gap, each with its SE, on the first eval.drift_prompts held-out prompts. "
        "Costs one student sampling pass and three forward passes per evaluation.")
    drift_prompts: int = Field(256, ge=2, description="Held-out prompts of the drift panel (at most eval.num_prompts).")
    grad_alignment: bool = Field(
        False, description="At each evaluation step, log the cosine between the training batch's gradient and "
        "the gradient on fresh prompts with fresh teacher samples (grad_cos_fresh) and, with an oracle, fresh "
        "oracle samples (grad_cos_golden): an oracle-free early warning (kdlab.pipeline.alignment). Costs two "
        "extra forward/backward passes per evaluation; single-process runs only.")


class TrackersConfig(_Section):
    """Optional mirrors of metrics.jsonl (which is always written; kdlab.pipeline.trackers)."""

    tensorboard: bool = Field(False, description="Also write TensorBoard event files to <run>/tensorboard.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (files under <run>/wandb).")
    wandb_project: str = Field("kdlab", description="W&B project name.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode: 'offline' needs no network (upload later with `wandb sync`)."
    )


class RunConfig(_Section):
    """One experiment: world, models, stage 1, stage 2, loss, evaluation."""

    name: str = Field("run", description="Condition name (used in reports; seeds of one condition share it).")
    seed: int = Field(0, ge=0, description="Seeds stage 2: data order, sampling, offline dataset.")
    output_dir: str = Field("runs/run", description="Run directory.")
    cache_dir: str | None = Field(
        None,
        description="Where stage-1 results and evaluation references are cached by config hash "
        "(default: <output_dir>/../.kdlab-cache).",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = the cores free when the run starts, "
                                   "at most the physical cores; $KDLAB_THREADS or $OMP_NUM_THREADS override it: kdlab.threads).")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N', or 'auto'.")
    generation_batch_size: int = Field(
        512, ge=1, description="Prompts per sampling call when stage 1 samples the oracle and when an offline "
        "dataset is built; lower it for large models (the KV cache grows with it).")
    precision: Literal["float32", "bf16"] = Field(
        "float32", description="'bf16': forward passes of training and sampling (stage 1 and 2) run under "
        "bfloat16 autocast; weights, optimizer state, losses and evaluation stay float32.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="Oracle and prompts.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Teacher and student.")
    stage1: Stage1Config = Field(default_factory=Stage1Config, description="Stage-1 SFT budgets.")
    stage2: Stage2Config = Field(default_factory=Stage2Config, description="Stage-2 distillation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Distillation loss.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    trackers: TrackersConfig = Field(default_factory=TrackersConfig, description="TensorBoard / W&B mirrors.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.eval.task_metrics != "off":
            if self.world.task is None:
                raise ValueError(f"eval.task_metrics={self.eval.task_metrics!r} needs world.task (text with references); "
                                 "use 'off' in a synthetic world")
            if self.eval.task_metric_prompts > self.eval.num_prompts:
                raise ValueError(f"eval.task_metric_prompts={self.eval.task_metric_prompts} exceeds "
                                 f"eval.num_prompts={self.eval.num_prompts}")
        if self.eval.num_prompts > self.world.pools.eval:
            raise ValueError(
                f"eval.num_prompts={self.eval.num_prompts} exceeds world.pools.eval={self.world.pools.eval}"
            )
        if self.stage2.offline.num_prompts > self.world.pools.stage2:
            raise ValueError(
                f"stage2.offline.num_prompts={self.stage2.offline.num_prompts} exceeds "
                f"world.pools.stage2={self.world.pools.stage2}"
            )
        if self.world.oracle == "none":
            for who in ("teacher", "student"):
                if not isinstance(getattr(self.models, who), str):
                    raise ValueError(
                        f"world.oracle='none' needs models.{who} = 'hf:<name or path>' (without an oracle "
                        "there are no samples to train it from)")
        o = self.stage2.offline
        uses_offline = self.stage2.regime == OFFLINE or (
            self.stage2.regime == MIXED and self.stage2.mixed.other == OFFLINE)
        if uses_offline and o.num_prompts * o.generations_per_prompt < self.stage2.batch_size:
            raise ValueError(
                f"stage2.batch_size={self.stage2.batch_size} exceeds the offline dataset "
                f"(stage2.offline.num_prompts x generations_per_prompt = {o.num_prompts * o.generations_per_prompt})"
            )
        self._check_controller(uses_offline)
        if self.loss.name in SEQUENCE_LOSSES and self.stage2.regime not in (ONLINE_STUDENT, TEACHER_MIXED):
            raise ValueError(f"loss.name={self.loss.name!r} learns from the student's own samples: it needs "
                             f"stage2.regime={ONLINE_STUDENT!r} or {TEACHER_MIXED!r}, not {self.stage2.regime!r}")
        if self.loss.name in SEQUENCE_LOSSES and (self.loss.lean or self.loss.target != "teacher"):
            raise ValueError(f"loss.name={self.loss.name!r} supports loss.lean=false and loss.target='teacher' only")
        only = REGIMES[self.stage2.regime].loss
        if only is not None and self.loss.name != only:
            raise ValueError(f"stage2.regime={self.stage2.regime!r} draws its samples for loss.name={only!r}; with "
                             f"{self.loss.name!r} use online_student or mixed")
        if self.loss.target == "delta":
            if uses_offline and o.targets == "topk":
                raise ValueError("loss.target='delta' needs the teacher's full distribution: stage2.offline.targets="
                                 "'topk' keeps only its top-k; use 'auto', 'full', 'hidden' or 'none'")
            if self.loss.lean:
                raise ValueError("loss.target='delta' builds dense targets; set loss.lean=false")
        if self.stage1.teacher_error.fraction > 0 and self.world.oracle != "synthetic":
            raise ValueError("stage1.teacher_error needs the synthetic world (world.oracle: synthetic): it "
                             "resamples the oracle on prompts chosen by their first token")
        for who in ("teacher", "student"):
            n = getattr(self.stage1, who).num_samples
            if n > self.world.pools.stage1:
                raise ValueError(
                    f"stage1.{who}.num_samples={n} exceeds world.pools.stage1={self.world.pools.stage1}"
                )
        return self

    def _check_controller(self, uses_offline: bool) -> None:
        c, s2 = self.stage2.controller, self.stage2
        if c.policy == OFF:
            return
        if c.trigger != PROXY and self.world.oracle == "none":
            raise ValueError(f"stage2.controller.trigger={c.trigger!r} needs the golden metric, and world.oracle is "
                             f"'none': use trigger '{PROXY}' (the oracle-free detector)")
        if c.policy in DATA_POLICIES and not uses_offline:
            raise ValueError(f"stage2.controller.policy={c.policy!r} changes the offline dataset: it needs "
                             f"stage2.regime={OFFLINE!r} (or {MIXED!r} with stage2.mixed.other={OFFLINE!r}), "
                             f"not {s2.regime!r}")
        if c.policy == DIVERSIFY and self.world.pools.stage2 <= s2.offline.num_prompts:
            raise ValueError(f"stage2.controller.policy={DIVERSIFY!r} draws prompts of the stage-2 pool that are not in "
                             f"the dataset, and world.pools.stage2={self.world.pools.stage2} are all in it "
                             f"(stage2.offline.num_prompts={s2.offline.num_prompts})")
        if c.policy == MIX:
            if s2.regime == ONLINE_STUDENT:
                raise ValueError(f"stage2.controller.policy={MIX!r} moves towards on-policy batches; "
                                 f"stage2.regime={ONLINE_STUDENT!r} is on-policy already")
            if s2.sampling.backend != "builtin":
                raise ValueError(f"stage2.controller.policy={MIX!r} samples the student with the builtin sampler; "
                                 "stage2.sampling.backend='vllm' is not supported with it yet")

    # -- hashing for caches -------------------------------------------------------------------
    def stage1_key(self) -> str:
        """Hash of everything stage 1 depends on (world, models, stage-1 budgets)."""
        # generation_batch_size too: the oracle's samples are drawn batch by batch from one generator.
        stage1 = self.stage1.model_dump()
        if self.stage1.teacher_error.fraction == 0:
            del stage1["teacher_error"]  # off: the same key (and cache) as before the lever existed
        world = self.world.model_dump()
        if world["synthetic"]["eos_token_id"] is None:
            del world["synthetic"]["eos_token_id"]  # no EOS: the same key (and cache) as before the field existed
        return _hash({"world": world, "models": self.models.model_dump(),
                      "stage1": stage1, "generation_batch_size": self.generation_batch_size})

    def eval_key(self) -> str:
        """Hash of everything the held-out references depend on."""
        return _hash({"stage1": self.stage1_key(), "eval": self.eval.model_dump(
            include={"num_prompts", "samples_per_prompt", "storage", "memory_mb", "topk"})})

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(self.output_dir).resolve().parent / ".kdlab-cache"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        if e["type"] == "string_type" and isinstance(e.get("input"), dict) and "str" in map(str, e["loc"]):
            continue  # the other arm of an `ArchConfig | str` union; its own error is the useful one
        field = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "ArchConfig", "str")))
        value = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `kdlab run --help` lists every field)"
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg = f"must be one of {ctx['expected']}"
        shown = value if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field or '<top level>'} = {shown!r}: {msg}")
    return "invalid config:\n" + "\n".join(dict.fromkeys(lines))


def parse_value(text: str) -> Any:
    """Parse the value of a `--set key=value` override with YAML rules (1e-3, true, null, [a, b])."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override value {text!r} is not valid YAML ({str(err).splitlines()[0]}); quote it "
                          "if it is a string") from None


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `dotted = "a.b.c"`, creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _not_plain(value: Any):
    """json.dumps' hook for a value YAML gives but a config never holds (a date, a timestamp, bytes)."""
    raise ConfigError(f"{value!r} is a {type(value).__name__}, not a number, string, list or section; "
                      "quote it if it is meant as a string")


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Validate a config dict with `key=value` overrides applied; raises ConfigError on any problem."""
    data = json.loads(json.dumps(data or {}, default=_not_plain))  # deep copy, also rejects non-JSON types early
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        apply_override(data, key.strip(), parse_value(raw))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a value in `over` replaces the one in `base`)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one section (first at line {seen[key] + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in a YAML config file, with `base: <file>` resolved: a config may name another
    (relative to its own directory) and give only what differs; chains are followed, cycles refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {_chain[-1]})" if _chain else ""))
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: 'base' chain loops back on itself ({' -> '.join(str(p) for p in _chain)})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): give a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base = {base!r}: must be the path of another config file")
    return _merge(read_config_file(path.parent / base, (*_chain, path.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config file (or the defaults if `path` is None) and apply overrides."""
    data = read_config_file(path) if path is not None else {}
    return build_config(data, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "", instance: BaseModel | None = None) -> list[str]:
    """One line per field: `dotted.name (type, default): description`, for --help.

    Defaults are read from a default instance of the config, not from the section classes: a section's
    own default can differ from its class's (`stage1.student` is `SFTConfig(num_samples=500, steps=300)`,
    `models.student` a 32-wide one-layer model). A field that takes a section or a string
    (`models.teacher`: an architecture or 'hf:<path>') is listed as a section with that note."""
    if instance is None and prefix == "":
        instance = model()
    lines = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        sub = _section_type(annotation)
        value = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
        if sub is not None:
            note = " (a section, or a string such as 'hf:<name or path>')" if _is_union_with_str(annotation) else ""
            if isinstance(value, str):
                note += f" Default {value!r}."
            lines.append(f"{dotted}: {field.description}{note}")
            lines.extend(describe_fields(sub, dotted + ".", value if isinstance(value, BaseModel) else None))
            continue
        if get_origin(annotation) is Literal:
            type_name = "one of " + "|".join(str(a) for a in get_args(annotation))
        else:
            type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            type_name = type_name.replace("NoneType", "None")
        default = "required" if field.is_required() else f"default {value!r}"
        lines.append(f"{dotted} ({type_name}, {default}): {field.description}")
    return lines


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_union_with_str(annotation: Any) -> bool:
    return str in (getattr(annotation, "__args__", ()) or ())
