"""Offline distillation data: `num_prompts × generations_per_prompt` teacher samples, made once.

Stored as a Hugging Face `datasets` dataset on disk together with the teacher's per-position
targets, so training from it skips the teacher forward entirely:
- `full`: log-probs over the whole vocabulary at every response position (exact: softmax of
  log-probs / τ equals softmax of logits / τ, so full cached targets serve any temperature);
- `hidden`: the teacher's final hidden states (float32, H per position) and its output head
  (`head.safetensors`): a `HiddenTarget`, exact, 25-100x smaller than full at real vocabulary sizes;
  the losses recompute the teacher's logits per batch (the lean path: per chunk of tokens);
- `topk`: the k largest log-probs and their indices (a `SparseTarget`; the losses put the
  remaining mass in an explicit tail bucket): a biased target, the KL a lower bound; only when asked;
- `none`: no targets; the teacher runs live at every step (exact);
- `auto`: the first exact form that fits the memory budget: full, else hidden, else none.
The dataset is written to a temporary directory and renamed into place, with a `kdlab.json`
marker written last: a directory without the marker is an interrupted build and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdlab import record
from kdlab.losses import HiddenTarget, SparseTarget
from kdlab.models import LM
from kdlab.models.sampling import sample

MARKER = "kdlab.json"
HEAD_FILE = "head.safetensors"  # the teacher's output head, beside `hidden` targets


@dataclass
class OfflineData:
    """The whole offline dataset as tensors (it is small enough to hold in memory by design)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    target_logprobs: Tensor | None = None  # N×R×V (full)
    target_indices: Tensor | None = None  # N×R×k (top-k)
    target_topk_logprobs: Tensor | None = None  # N×R×k
    target_hidden: Tensor | None = None  # N×R×H (hidden), with the head below
    head_weight: Tensor | None = None  # V×H
    head_bias: Tensor | None = None  # V

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def has_targets(self) -> bool:
        return any(t is not None for t in (self.target_logprobs, self.target_indices, self.target_hidden))

    @property
    def target_kind(self) -> str:
        """How the targets are held: 'full', 'hidden', 'topk' or 'none' (`choose_target_kind`'s names)."""
        if self.target_logprobs is not None:
            return "full"
        if self.target_hidden is not None:
            return "hidden"
        return "topk" if self.target_indices is not None else "none"

    def with_rows(self, idx: Tensor, new: "OfflineData") -> "OfflineData":
        """A copy whose rows `idx` are `new`'s rows (in order); the head is kept. Both must hold the same
        kind of targets and the same widths (the stage-2 controller's refresh and diversify)."""
        if new.target_kind != self.target_kind:
            raise ValueError(f"new rows hold {new.target_kind!r} targets, the dataset {self.target_kind!r}")
        out = {}
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "target_logprobs",
                     "target_indices", "target_topk_logprobs", "target_hidden"):
            mine, theirs = getattr(self, name), getattr(new, name)
            if mine is None:
                out[name] = None
                continue
            if mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(f"new rows of {name} have shape {tuple(theirs.shape[1:])}, the dataset's "
                                 f"{tuple(mine.shape[1:])}")
            merged = mine.clone()
            merged[idx] = theirs.to(mine.dtype)
            out[name] = merged
        return OfflineData(**out, head_weight=self.head_weight, head_bias=self.head_bias)

    def target(self, idx: Tensor) -> Tensor | SparseTarget | HiddenTarget | None:
        if self.target_logprobs is not None:
            return self.target_logprobs[idx]
        if self.target_hidden is not None:
            return HiddenTarget(self.target_hidden[idx], self.head_weight, self.head_bias)
        if self.target_indices is not None:
            return SparseTarget(self.target_indices[idx], self.target_topk_logprobs[idx])
        return None


def offline_prompt_order(seed: int, pool_size: int) -> Tensor:
    """The order in which the stage-2 pool's prompts enter an offline dataset: the first `num_prompts` form
    it (the run seed chooses them), and the stage-2 controller's 'diversify' takes the next ones."""
    from kdlab.seeding import generator_for

    return torch.randperm(pool_size, generator=generator_for(seed, "offline-prompts"))


def choose_target_kind(kind: str, n_seq: int, response_length: int, teacher: LM, budget_mb: float) -> str:
    """`kind`, or for 'auto' the first exact form that fits `budget_mb`: full, else hidden, else none."""
    if kind != "auto":
        return kind
    budget, V = budget_mb * 2**20, teacher.vocab_size
    if n_seq * response_length * V * 4 <= budget:
        return "full"
    if teacher.has_linear_head:
        H = teacher.lm_head_weight.shape[1]
        if (n_seq * response_length + V) * H * 4 <= budget:
            return "hidden"
    return "none"


@torch.no_grad()
def build_offline_dataset(
    teacher: LM,
    prompt_ids_NxP: Tensor,
    prompt_mask_NxP: Tensor,
    *,
    generations_per_prompt: int,
    max_new_tokens: int,
    generator: torch.Generator,
    out_dir: Path,
    targets: str = "auto",
    topk: int = 64,
    target_memory_mb: float = 1024.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | tuple[int, ...] | None = None,
    batch_size: int = 256,
) -> Path:
    """Sample the teacher on each prompt `generations_per_prompt` times, compute its targets, save."""
    ids = prompt_ids_NxP.repeat_interleave(generations_per_prompt, 0)
    mask = prompt_mask_NxP.repeat_interleave(generations_per_prompt, 0)
    kind = choose_target_kind(targets, len(ids), max_new_tokens, teacher, target_memory_mb)
    if kind == "hidden" and not teacher.has_linear_head:
        raise ValueError(f"stage2.offline.targets=hidden needs a teacher whose logits are hidden @ lm_head.T; "
                         f"{type(teacher.hf).__name__} post-processes them: use 'full' or 'none'")
    data = sample_teacher_rows(teacher, ids, mask, kind=kind, topk=topk, max_new_tokens=max_new_tokens,
                               generator=generator, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_token_id=eos_token_id, batch_size=batch_size)
    return write_offline_dataset(data, out_dir, kind=kind, topk=topk, generations_per_prompt=generations_per_prompt,
                                 head_weight=teacher.lm_head_weight if kind == "hidden" else None)


@torch.no_grad()
def sample_teacher_rows(teacher: LM, ids_NxP: Tensor, mask_NxP: Tensor, *, kind: str, topk: int, max_new_tokens: int,
                        generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id: int | tuple[int, ...] | None = None,
                        batch_size: int = 256) -> dict[str, np.ndarray]:
    """One teacher sample per row of `ids_NxP`, with its targets of storage `kind` (not 'auto'), as the
    columns of an offline dataset: drawn `batch_size` rows at a time from one `generator`."""
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
    dev = teacher.device
    for i in range(0, len(ids_NxP), batch_size):
        p_ids, p_mask = ids_NxP[i:i + batch_size].to(dev), mask_NxP[i:i + batch_size].to(dev)
        s = sample(teacher, p_ids, p_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                   return_logits=kind in ("full", "topk"))
        columns["prompt_ids"].append(p_ids.cpu().numpy())
        columns["prompt_mask"].append(p_mask.cpu().numpy())
        columns["response_ids"].append(s.response_ids_BxR.cpu().numpy())
        columns["response_mask"].append(s.response_mask_BxR.cpu().numpy())
        if kind == "hidden":  # one teacher forward on the sampled responses gives its final hidden states
            h = teacher.response_hidden(p_ids, p_mask, s.response_ids_BxR, s.response_mask_BxR)
            columns.setdefault("target_hidden", []).append(h.float().cpu().numpy())
        elif kind != "none":
            # The sampling pass already computed the teacher's logits at every position (KV cache).
            if kind == "full":
                logp = torch.log_softmax(s.logits_BxRxV, -1)
                columns.setdefault("target_logprobs", []).append(logp.cpu().numpy().astype(np.float32))
            else:  # SparseTarget.from_logits: a confident teacher's top log-prob must not round to 0
                top = SparseTarget.from_logits(s.logits_BxRxV, min(topk, s.logits_BxRxV.shape[-1]))
                columns.setdefault("target_indices", []).append(top.indices.cpu().numpy().astype(np.int32))
                columns.setdefault("target_topk_logprobs", []).append(top.logprobs.cpu().numpy().astype(np.float32))
    return {k: np.concatenate(v) for k, v in columns.items()}


def write_offline_dataset(data: dict[str, np.ndarray], out_dir: Path, *, kind: str, topk: int,
                          generations_per_prompt: int, head_weight: Tensor | None = None) -> Path:
    """Write the columns of `sample_teacher_rows` as an offline dataset at `out_dir` (a temporary directory
    renamed into place, the marker last; `head_weight` beside `hidden` targets)."""
    import datasets

    ds = datasets.Dataset.from_dict({k: list(v) for k, v in data.items()})
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.temp_dir(out_dir.parent, f".tmp-{out_dir.name}-")  # ordinary mode, not mkdtemp's 0700
    ds.save_to_disk(str(tmp / "data"))
    if kind == "hidden":
        from safetensors.torch import save_file

        save_file({"weight": head_weight.detach().float().cpu().contiguous()}, str(tmp / HEAD_FILE))
    (tmp / MARKER).write_text(json.dumps({"sequences": len(data["prompt_ids"]), "targets": kind, "exact": kind != "topk",
                                          "topk": topk if kind == "topk" else None,
                                          "generations_per_prompt": generations_per_prompt}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    record.publish(tmp, out_dir)
    return out_dir


def offline_dataset_ready(path: Path) -> bool:
    return (Path(path) / MARKER).exists()


def load_offline_dataset(path: Path) -> OfflineData:
    """Load a dataset written by `build_offline_dataset` into tensors; a clear error if it is damaged."""
    import datasets

    path = Path(path)
    if not offline_dataset_ready(path):
        raise FileNotFoundError(
            f"offline dataset {path} is missing or was interrupted while being written; "
            "delete the directory and run again (it is rebuilt from the teacher)."
        )
    try:
        ds = datasets.load_from_disk(str(path / "data")).with_format("numpy")
        cols = {name: torch.from_numpy(np.stack(ds[name])) for name in ds.column_names}
        head = {}
        if "target_hidden" in cols:
            from safetensors.torch import load_file

            head = load_file(str(path / HEAD_FILE))
    except Exception as err:  # arrow/IO errors of every kind on a damaged file
        raise RuntimeError(
            f"offline dataset {path} is unreadable ({type(err).__name__}: {err}); it may be truncated. "
            "Delete the directory and run again to rebuild it from the teacher."
        ) from None
    return OfflineData(
        prompt_ids=cols["prompt_ids"].long(), prompt_mask=cols["prompt_mask"].bool(),
        response_ids=cols["response_ids"].long(), response_mask=cols["response_mask"].bool(),
        target_logprobs=cols.get("target_logprobs"),
        target_indices=cols["target_indices"].long() if "target_indices" in cols else None,
        target_topk_logprobs=cols.get("target_topk_logprobs"),
        target_hidden=cols.get("target_hidden"), head_weight=head.get("weight"), head_bias=head.get("bias"),
    )
