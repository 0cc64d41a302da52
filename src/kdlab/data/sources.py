"""The batch sources of the stage-2 data regimes (kdlab.data.regimes says what each regime is): where
each step's (prompt, response) batch comes from.

Every source is a function of (seed, step): `batch(step)` draws with generators seeded from the run
seed and the step number, so a resumed run sees exactly the batches an uninterrupted one would.

- `OfflineSource`: a fixed dataset reused for many epochs; a fresh permutation per epoch.
- `OnlineTeacherSource`: fresh prompts from the stage-2 pool, fresh teacher samples, every step.
- `OnlineStudentSource`: fresh prompts, fresh samples from the current student (on-policy, no grad).
- `MixedSource`: with probability λ on-policy, else the other regime (GKD, Agarwal et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kdlab.data.offline import OfflineData
from kdlab.losses import SparseTarget
from kdlab.models import LM
from kdlab.models.sampling import NextTokenLogits, Samples, sample
from kdlab.seeding import generator_for


@dataclass
class Batch:
    prompt_ids: Tensor  # B×P, left-padded
    prompt_mask: Tensor
    response_ids: Tensor  # B×R, right-padded
    response_mask: Tensor
    teacher_target: Tensor | SparseTarget | None = None  # cached targets, or None = live teacher forward
    on_policy: bool = False
    local: bool = False  # already this rank's rows of the global batch (the online sources sample only those)
    behaviour_logprobs: Tensor | None = None  # B×R: log-prob of each token under the distribution it was drawn from


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    sampler: Callable[..., Samples] = sample  # the backend (kdlab.models.vllm_backend.make_sampler)
    compile_step: bool = False  # the builtin sampler's compiled decode step (kdlab.models.decode)


class OfflineSource:
    def __init__(self, data: OfflineData, batch_size: int, seed: int, use_cached_targets: bool = True):
        if batch_size > len(data):
            raise ValueError(f"stage2.batch_size={batch_size} exceeds the offline dataset's {len(data)} sequences")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.use_cached_targets = use_cached_targets and data.has_targets
        self.batches_per_epoch = len(data) // batch_size  # drop the ragged tail: equal-size steps
        self._perm_epoch, self._perm = -1, None

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / len(self.data)

    def batch(self, step: int, student: LM | None = None) -> Batch:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(len(self.data), generator=generator_for(self.seed, "offline-order", epoch))
            self._perm_epoch = epoch
        idx = self._perm[k * self.batch_size:(k + 1) * self.batch_size]
        d = self.data
        return Batch(d.prompt_ids[idx], d.prompt_mask[idx], d.response_ids[idx], d.response_mask[idx],
                     teacher_target=d.target(idx) if self.use_cached_targets else None)


class _OnlineSource:
    """Fresh prompts from a pool every step, answered by a sampler model.

    Step t's global batch is a function of (seed, t): its prompts and one seed per row come from the
    step's generator, and each row is sampled from its own seed (``sample(row_seeds=...)``). Rank r of
    W (``shard=(r, W)``) samples only its rows ``[r·B/W, (r+1)·B/W)`` and returns them as a local
    batch: the same rows one process sampling the whole batch would give it, at 1/W of the sampling.
    """

    stream = "online"

    def __init__(self, prompt_ids: Tensor, prompt_mask: Tensor, batch_size: int, seed: int, params: SamplingParams,
                 shard: tuple[int, int] = (0, 1)):
        rank, world_size = shard
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the number of processes ({world_size})")
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.batch_size, self.seed, self.params = batch_size, seed, params
        per = batch_size // world_size
        self.rows = slice(rank * per, (rank + 1) * per)

    def _answer(self, model: LM, step: int, on_policy: bool, keep_logits: bool = False) -> Batch:
        gen = generator_for(self.seed, self.stream, step)
        idx = torch.randint(0, len(self.prompt_ids), (self.batch_size,), generator=gen)
        row_seeds = torch.randint(0, 2**62, (self.batch_size,), generator=gen)
        idx, row_seeds = idx[self.rows], row_seeds[self.rows]
        ids, mask = self.prompt_ids[idx], self.prompt_mask[idx]
        p = self.params
        extra = {"compile_step": True} if p.compile_step else {}
        with torch.no_grad():
            s = p.sampler(model, ids.to(model.device), mask.to(model.device), max_new_tokens=p.max_new_tokens,
                          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, eos_token_id=p.eos_token_id,
                          generator=gen, return_logits=keep_logits, row_seeds=row_seeds, **extra)
        return Batch(ids, mask, s.response_ids_BxR.cpu(), s.response_mask_BxR.cpu(), on_policy=on_policy,
                     teacher_target=s.logits_BxRxV, local=True)


class OnlineTeacherSource(_OnlineSource):
    stream = "online-teacher"

    def __init__(self, teacher: LM, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def batch(self, step: int, student: LM | None = None) -> Batch:
        # The teacher's logits at every position come out of its own sampling pass (KV cache):
        # they are the distillation targets, so the step needs no second teacher forward.
        return self._answer(self.teacher, step, on_policy=False, keep_logits=True)


class OnlineStudentSource(_OnlineSource):
    stream = "online-student"

    def batch(self, step: int, student: LM | None = None) -> Batch:
        if student is None:
            raise ValueError("the on-policy regime needs the current student to sample from")
        return self._answer(student, step, on_policy=True)


class MixedSource:
    def __init__(self, on_policy: OnlineStudentSource, other, lmbda: float, seed: int):
        self.on_policy, self.other, self.lmbda, self.seed = on_policy, other, lmbda, seed

    def batch(self, step: int, student: LM | None = None) -> Batch:
        u = torch.rand((), generator=generator_for(self.seed, "mixed-coin", step)).item()
        return self.on_policy.batch(step, student) if u < self.lmbda else self.other.batch(step, student)


class TeacherMixedSource(_OnlineSource):
    """MiniLLM's teacher-mixed sampling (Gu et al. 2024, Eq. 4): each token from α·teacher + (1 − α)·student,
    with its log-prob under that mixture (`Batch.behaviour_logprobs`, for the importance weights). Both models keep
    their KV caches through the loop (`NextTokenLogits`); worlds without EOS only (every response runs
    max_new_tokens)."""

    stream = "teacher-mixed"

    def __init__(self, teacher: LM, alpha: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha = teacher, alpha
        if self.params.eos_token_id is not None:
            raise ValueError("stage2.regime='teacher_mixed' supports worlds without EOS (the synthetic world) for now")

    def batch(self, step: int, student: LM | None = None) -> Batch:
        from kdlab.losses.minillm import sample_teacher_mixed

        if student is None:
            raise ValueError("the teacher_mixed regime needs the current student to sample from")
        gen = generator_for(self.seed, self.stream, step)
        idx = torch.randint(0, len(self.prompt_ids), (self.batch_size,), generator=gen)[self.rows]
        ids, mask = self.prompt_ids[idx], self.prompt_mask[idx]
        with torch.no_grad():
            # the teacher's logits at each position come out of the sampling loop: they are the targets
            r_ids, logps, targets = sample_teacher_mixed(
                NextTokenLogits(student, ids, mask), NextTokenLogits(self.teacher, ids, mask), ids,
                self.params.max_new_tokens, self.alpha, generator=gen, return_teacher_logits=True)
        return Batch(ids, mask, r_ids, torch.ones_like(r_ids), teacher_target=targets, on_policy=True, local=True,
                     behaviour_logprobs=logps.float())
