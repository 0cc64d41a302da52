"""`ReferenceCache`: the reference model's samples and per-position distributions, computed once.

During stage 2 the reference A (teacher for proxy, oracle for golden) never changes, so neither do
its samples y ~ A(·|x) on the eval prompts nor its next-token distributions A(·|x, y<t) along them.
The cache holds both, so each evaluation of

    fkl = E_x E_{y~A} Σ_t KL(A_t ‖ S_t)

costs one student forward pass instead of reference sampling + reference forward + student forward.
The reference's distributions are held exactly, in the first form that fits ``memory_budget_bytes``:

* ``full``: float32 log-probs (M×R×V), when they fit;
* ``hidden``: the reference's final hidden states (M×R×H, in its dtype) and its output head (V×H);
  the log-probs are recomputed chunk by chunk beside the student's (``kdlab.losses.HiddenTarget``,
  the lean path), so neither model's B×R×V logits are held. H is 25-100x smaller than V at real sizes;
* ``none``: nothing stored; the reference model runs live on the cached samples (exact too).

``topk`` (the k largest log-probs, a ``SparseTarget``; ``kdlab.losses`` puts the remaining mass in one
bucket) is a *lower bound* of the KL. It is only used when asked for (``storage="topk"``), and every
number it produces says so (:attr:`ReferenceCache.label`).

Layout: N prompts, m = ``samples_per_prompt``, M = N·m sequences; row ``i*m + j`` is sample j of
prompt i. On disk: ``reference_cache.safetensors`` (tensors) + ``reference_cache.json`` (metadata).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdlab import record
from kdlab.losses import HiddenTarget, SparseTarget
from kdlab.losses.names import TARGET_STORAGES
from kdlab.metrics.divergence import DivergenceEstimate, eval_mode, sample_responses, sequence_kl_sums
from kdlab.models import LM, check_vocab_compatible
from kdlab.models.lm import CheckpointError, check_safetensors

__all__ = ["ReferenceCache", "sequence_fkl"]

TENSORS_FILE = "reference_cache.safetensors"
META_FILE = "reference_cache.json"
FORMAT = "kdlab.reference_cache/1"
STORAGES = TARGET_STORAGES  # kdlab.losses.names: the one table, which the config reads too


def _storage_for(lm: LM, M: int, R: int, budget: int) -> str:
    """The first exact storage that fits ``budget``: full log-probs, else hidden states + head, else none.

    Top-k is never chosen here: it is a lower bound, used only when asked for.
    """
    V = lm.vocab_size
    if M * R * V * 4 <= budget:
        return "full"
    if lm.has_linear_head:
        H = lm.lm_head_weight.shape[1]
        item = lm.lm_head_weight.element_size()
        if M * R * H * item + V * H * item <= budget:
            return "hidden"
    return "none"


@dataclass
class ReferenceCache:
    """Reference samples on eval prompts and, budget permitting, the reference's log-probs along them.

    prompt_ids_NxP, prompt_mask_NxP: the eval prompts (left-padded), once each.
    response_ids_MxR, response_mask_MxR: reference samples, M = N * samples_per_prompt.
    targets: None (the reference runs live), float32 log-probs (M, R, V), a HiddenTarget (hidden states
        (M, R, H) and head (V, H)), or a SparseTarget (top-k, a lower bound; indices int32 in storage).
    vocab_size: the reference's V (checked against the student).
    meta: how the samples were drawn (max_new_tokens, temperature, eos_token_id, topk, ...), saved as JSON.
    """

    prompt_ids_NxP: Tensor
    prompt_mask_NxP: Tensor
    response_ids_MxR: Tensor
    response_mask_MxR: Tensor
    samples_per_prompt: int
    vocab_size: int
    targets: Tensor | SparseTarget | HiddenTarget | None = None
    meta: dict = field(default_factory=dict)

    # -------------------------------------------------------------------------------- properties
    @property
    def storage(self) -> str:
        """'full', 'hidden', 'topk' or 'none': what ``targets`` holds."""
        if self.targets is None:
            return "none"
        if isinstance(self.targets, HiddenTarget):
            return "hidden"
        return "topk" if isinstance(self.targets, SparseTarget) else "full"

    @property
    def label(self) -> str:
        """What produced a number from this cache, as the record writes it: 'full', 'hidden', 'live', or
        'top-K lower bound'."""
        if self.storage == "topk":
            return f"top-{int(self.targets.indices.shape[-1])} lower bound"
        return "live" if self.storage == "none" else self.storage

    @property
    def num_sequences(self) -> int:
        return int(self.response_ids_MxR.shape[0])

    @property
    def nbytes(self) -> int:
        ts = [self.prompt_ids_NxP, self.prompt_mask_NxP, self.response_ids_MxR, self.response_mask_MxR]
        if isinstance(self.targets, (SparseTarget, HiddenTarget)):
            ts += [t for t in self.targets if t is not None]
        elif self.targets is not None:
            ts.append(self.targets)
        return sum(t.numel() * t.element_size() for t in ts)

    def prompts_for_sequences(self) -> tuple[Tensor, Tensor]:
        """Prompt ids and mask repeated to one row per sequence (M, P)."""
        m = self.samples_per_prompt
        return self.prompt_ids_NxP.repeat_interleave(m, 0), self.prompt_mask_NxP.repeat_interleave(m, 0)

    # ------------------------------------------------------------------------------------- build
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        reference_lm: LM,
        prompt_ids_NxP: Tensor,
        prompt_mask_NxP: Tensor | None = None,
        *,
        samples_per_prompt: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        eos_token_id: int | tuple[int, ...] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
        memory_budget_bytes: int = 1 << 30,
        topk: int | None = 256,
        storage: str = "auto",
    ) -> "ReferenceCache":
        """Sample ``samples_per_prompt`` responses per prompt from the reference and cache its log-probs.

        ``temperature`` changes how y is drawn (T = 1 is the fkl of the contract); the stored
        log-probs are always the reference's own T = 1 distributions. ``storage="auto"`` picks the first
        exact form that fits ``memory_budget_bytes`` (full, else hidden, else none: see the module
        docstring); 'full' / 'hidden' / 'topk' (a lower bound) / 'none' force it.
        """
        with eval_mode(reference_lm):
            _, _, responses, masks = sample_responses(
                reference_lm, prompt_ids_NxP, prompt_mask_NxP, samples_per_prompt=samples_per_prompt,
                max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id,
                generator=generator, batch_size=batch_size,
            )
        meta = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id)
        return cls.from_samples(
            reference_lm, prompt_ids_NxP, prompt_mask_NxP, responses, masks,
            samples_per_prompt=samples_per_prompt, batch_size=batch_size, memory_budget_bytes=memory_budget_bytes,
            topk=topk, storage=storage, meta=meta,
        )

    @classmethod
    @torch.no_grad()
    def from_samples(
        cls,
        reference_lm: LM,
        prompt_ids_NxP: Tensor,
        prompt_mask_NxP: Tensor | None,
        response_ids_MxR: Tensor,
        response_mask_MxR: Tensor | None = None,
        *,
        samples_per_prompt: int = 1,
        batch_size: int = 64,
        memory_budget_bytes: int = 1 << 30,
        topk: int | None = 256,
        storage: str = "auto",
        meta: dict | None = None,
    ) -> "ReferenceCache":
        """A cache around reference samples that already exist (e.g. an offline dataset's)."""
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r}; allowed: {STORAGES}")
        N, m = prompt_ids_NxP.shape[0], samples_per_prompt
        M, R = response_ids_MxR.shape
        if M != N * m:
            raise ValueError(f"{M} responses for {N} prompts x samples_per_prompt={m}; expected {N * m}")
        V = reference_lm.vocab_size
        if prompt_mask_NxP is None:
            prompt_mask_NxP = torch.ones_like(prompt_ids_NxP, dtype=torch.bool)
        if response_mask_MxR is None:
            response_mask_MxR = torch.ones(M, R, dtype=torch.bool)
        if storage == "auto":
            storage = _storage_for(reference_lm, M, R, memory_budget_bytes)
        if storage == "topk" and topk is None:
            raise ValueError("storage='topk' needs topk (an int >= 1)")
        if storage == "hidden" and not reference_lm.has_linear_head:
            raise ValueError(f"storage='hidden' needs a reference whose logits are hidden @ lm_head.T; "
                             f"{type(reference_lm.hf).__name__} post-processes them: use storage='full' or 'none'")
        cache = cls(
            prompt_ids_NxP.cpu(), prompt_mask_NxP.cpu().bool(), response_ids_MxR.cpu().long(),
            response_mask_MxR.cpu().bool(), m, V, None,
            dict(meta or {}, storage=storage, topk=topk if storage == "topk" else None),
        )
        if storage == "none":
            return cache
        ids, mask = cache.prompts_for_sequences()
        chunks = []
        with eval_mode(reference_lm):
            for start in range(0, M, batch_size):
                sl = slice(start, start + batch_size)
                args = (ids[sl], mask[sl], cache.response_ids_MxR[sl], cache.response_mask_MxR[sl])
                if storage == "hidden":
                    chunks.append(reference_lm.response_hidden(*args).detach().cpu())
                    continue
                logits = reference_lm.response_logits(*args)
                if storage == "full":
                    chunks.append(logits.log_softmax(-1).cpu())
                else:
                    t = SparseTarget.from_logits(logits, min(topk, V))
                    chunks.append(SparseTarget(t.indices.to(torch.int32).cpu(), t.logprobs.float().cpu()))
        if storage == "full":
            cache.targets = torch.cat(chunks)
        elif storage == "hidden":  # the head is the model's own tensor when the model is on the CPU (no copy)
            cache.targets = HiddenTarget(torch.cat(chunks), reference_lm.lm_head_weight.detach().cpu())
        else:
            cache.targets = SparseTarget(torch.cat([c.indices for c in chunks]), torch.cat([c.logprobs for c in chunks]))
        return cache

    # --------------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tensors (safetensors) and the metadata (JSON), each atomically (temp + rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "prompt_ids": self.prompt_ids_NxP,
            "prompt_mask": self.prompt_mask_NxP,
            "response_ids": self.response_ids_MxR,
            "response_mask": self.response_mask_MxR,
        }
        if isinstance(self.targets, SparseTarget):
            tensors["topk_indices"], tensors["topk_logprobs"] = self.targets.indices, self.targets.logprobs
        elif isinstance(self.targets, HiddenTarget):
            tensors["hidden"], tensors["head_weight"] = self.targets.hidden, self.targets.weight
            if self.targets.bias is not None:
                tensors["head_bias"] = self.targets.bias
        elif self.targets is not None:
            tensors["logprobs"] = self.targets
        meta = dict(self.meta, format=FORMAT, samples_per_prompt=self.samples_per_prompt,
                    vocab_size=self.vocab_size, storage=self.storage)
        tmp = directory / (TENSORS_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        record.publish(tmp, directory / TENSORS_FILE)  # safetensors writes 0600
        tmp = directory / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ReferenceCache":
        from safetensors.torch import load_file

        directory = Path(directory)
        advice = "rebuild it with ReferenceCache.build(...).save(dir)"
        meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
        for f in (meta_path, tensors_path):
            if not f.exists():
                raise FileNotFoundError(f"reference cache file {f} is missing; {advice}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"reference cache metadata {meta_path} is not valid JSON ({e}); {advice}") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; {advice}")
        check_safetensors([tensors_path], advice=advice)
        t = load_file(str(tensors_path))
        if "logprobs" in t:
            targets = t["logprobs"]
        elif "hidden" in t:
            targets = HiddenTarget(t["hidden"], t["head_weight"], t.get("head_bias"))
        elif "topk_indices" in t:
            targets = SparseTarget(t["topk_indices"], t["topk_logprobs"])
        else:
            targets = None
        m, V = int(meta.pop("samples_per_prompt")), int(meta.pop("vocab_size"))
        meta.pop("format")
        cache = cls(t["prompt_ids"], t["prompt_mask"], t["response_ids"], t["response_mask"], m, V, targets, meta)
        if cache.storage != meta.get("storage"):
            raise CheckpointError(f"{tensors_path} holds '{cache.storage}' targets but {meta_path} says "
                                  f"'{meta.get('storage')}'; {advice}")
        return cache


def sequence_fkl_sums(
    student: LM, cache: ReferenceCache, *, reference_lm: LM | None = None, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Per-sequence Σ_t KL(A_t ‖ S_t) on the cached reference samples, and their token counts.

    Uses the cached reference log-probs when the cache holds them (one student forward pass);
    otherwise ``reference_lm`` must be given and is run live on the cached samples. Rows
    ``i*m .. i*m+m-1`` are the m samples of prompt i (for per-prompt or paired statistics).
    """
    check_vocab_compatible(cache.vocab_size, student, names=("reference", "student"))
    reference = cache.targets if cache.targets is not None else reference_lm
    if reference is None:
        raise ValueError(
            "this ReferenceCache stores no reference log-probs (storage='none', over its memory budget); "
            "pass reference_lm= to run the reference live, or rebuild with a larger memory_budget_bytes / topk"
        )
    ids, mask = cache.prompts_for_sequences()
    # Hidden storage, or none (memory was short): both models' logits chunk by chunk, never B×R×V.
    return sequence_kl_sums(student, reference, ids, mask, cache.response_ids_MxR, cache.response_mask_MxR,
                            direction="forward", batch_size=batch_size, lean=cache.storage in ("hidden", "none"))


def sequence_fkl(
    student: LM, cache: ReferenceCache, *, reference_lm: LM | None = None, batch_size: int = 64
) -> DivergenceEstimate:
    """fkl = E_x E_{y~A} Σ_t KL(A_t ‖ S_t) on the cached reference samples (see `sequence_fkl_sums`)."""
    sums, counts = sequence_fkl_sums(student, cache, reference_lm=reference_lm, batch_size=batch_size)
    return DivergenceEstimate.from_sums(sums, counts, cache.samples_per_prompt)
