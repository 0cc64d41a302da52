"""Data-parallel training across processes with accelerate (DDP; FSDP through accelerate's config).

Run any `kdlab run` under ``accelerate launch`` and each process becomes one rank:

    accelerate launch --num_processes 2 -m kdlab.cli run configs/w0.yaml      # 2 GPUs, DDP
    accelerate launch --num_processes 2 --cpu -m kdlab.cli run configs/tiny.yaml   # 2 CPU processes (gloo)

The contract (DESIGN.md, losses): every step draws the *global* batch of ``stage2.batch_size`` exactly
as one process would (it is a function of (seed, step)), and rank r trains on rows
``[r·B/W, (r+1)·B/W)`` of it. Each rank sums its per-token losses; the sum is divided by the token
count of the whole global batch (all-reduced). DDP (and FSDP) *average* gradients over ranks, so each
rank backpropagates W × its share, and the averaged gradient is the gradient of the global mean:
2 processes × batch 8 give the loss and gradients of 1 process × batch 16, up to float summation order.
The online sources sample only the rank's rows (each row of the global batch is sampled from its own
seed, so the rank's rows are the ones one process would sample) and hand them over as a local batch.

A single process (no ``accelerate launch``, ``WORLD_SIZE`` unset or 1) creates no accelerate state and
no process group at all: `Distributed(None)` is a no-op on every call, so single-process runs are
bit-for-bit what they were before multi-process support existed.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
from torch import Tensor

from kdlab.data.sources import Batch
from kdlab.losses import SparseTarget


def launched_world_size() -> int:
    """Processes started by ``accelerate launch`` / ``torchrun`` (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank in an ``accelerate launch`` (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


class Distributed:
    """This process's place among the ranks, and the few collective operations the loops need."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls, device: str = "cpu") -> "Distributed":
        """One rank of an ``accelerate launch`` when started by one, else the single-process no-op."""
        if launched_world_size() <= 1:
            return cls(None)
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        # Stage 1 and the offline dataset are built by rank 0 while the others wait at a barrier;
        # torch's default 30-minute collective timeout would kill the waiting ranks of a large world.
        timeout = InitProcessGroupKwargs(timeout=timedelta(hours=6))
        return cls(Accelerator(cpu=(device == "cpu"), kwargs_handlers=[timeout]))

    # ----------------------------------------------------------------------------------- identity
    @property
    def enabled(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    # -------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (building caches, writing files); the others then run it
        and find what rank 0 wrote."""
        if not self.enabled:
            yield
            return
        with self.accelerator.main_process_first():
            yield

    def sum(self, x: Tensor) -> Tensor:
        """Sum of `x` over ranks (float64 for counts, so token totals stay exact)."""
        if not self.enabled:
            return x
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        return x

    # ------------------------------------------------------------------------------------ batches
    def check_supported(self, cfg) -> None:
        """Refuse, before any work, what multi-process training does not do."""
        if not self.enabled:
            return
        self.check_batch_size(cfg.stage2.batch_size, "stage2.batch_size")
        if cfg.loss.lean:
            raise ValueError("loss.lean=true runs the decoder outside the DDP/FSDP wrapper (gradients would not "
                             "be synchronised); use loss.lean=false with more than one process")

    def check_batch_size(self, batch_size: int, field: str) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"{field}={batch_size} must be divisible by the number of processes ({self.world_size}): "
                "each rank trains on an equal slice of the global batch")

    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of the global batch (the whole batch in a single process; a batch the source
        already sampled for this rank alone, ``batch.local``, as it is)."""
        if not self.enabled or batch.local:
            return batch
        B = batch.prompt_ids.shape[0]
        per = B // self.world_size
        sl = slice(self.rank * per, (self.rank + 1) * per)
        target = batch.teacher_target
        if isinstance(target, SparseTarget):
            target = SparseTarget(*(t[sl] for t in target))
        elif target is not None:
            target = target[sl]
        return Batch(batch.prompt_ids[sl], batch.prompt_mask[sl], batch.response_ids[sl], batch.response_mask[sl],
                     teacher_target=target, on_policy=batch.on_policy)

    def shard_indices(self, idx: Tensor) -> Tensor:
        """This rank's slice of a global minibatch of row indices (stage-1 SFT)."""
        if not self.enabled:
            return idx
        per = len(idx) // self.world_size
        return idx[self.rank * per:(self.rank + 1) * per]

    # ------------------------------------------------------------------------------ model wrapping
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Wrap for data parallel (DDP, or FSDP when accelerate's config says so)."""
        if not self.enabled:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def trainee(self, lm, model: torch.nn.Module):
        """The LM whose forward goes through the wrapped `model` (gradient synchronisation hooks)."""
        if not self.enabled:
            return lm
        from kdlab.models import LM

        out = LM(model, lm.tokenizer)
        # DDP's forward takes **kwargs, so LM cannot see that the inner model accepts
        # `logits_to_keep`; pass it on as the unwrapped model would (same lm_head rows as one process).
        out._has_logits_to_keep = lm._has_logits_to_keep
        return out

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model) if self.enabled else model

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> None:
        if self.enabled:
            self.accelerator.clip_grad_norm_(model.parameters(), max_norm)  # FSDP: norm over all shards
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def uses_fsdp(self) -> bool:
        if not self.enabled:
            return False
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def checkpoint_views(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """What `save_checkpoint` should read the weights and optimizer state from.

        DDP and one process: the plain module and the optimizer. FSDP: the whole-model weights and
        optimizer state, gathered from the shards onto rank 0 (a collective: every rank must call this)
        in a single process's layout, so the checkpoint resumes under FSDP, DDP or one process alike."""
        if not self.uses_fsdp():
            return self.unwrap(model), optimizer
        weights, optimizer_state = gather_sharded_state(model, optimizer)
        return _StateOnly(weights), _StateOnly(optimizer_state)

    def load_checkpoint(self, path, lm_module: torch.nn.Module, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
        """Restore a checkpoint into the training state; returns its JSON state. Under FSDP every rank
        reads the whole checkpoint and keeps its shards (`load_sharded_state`); otherwise the plain
        module `lm_module` and the optimizer load it directly."""
        from kdlab.pipeline.rundir import load_checkpoint, read_checkpoint

        if not self.uses_fsdp():
            return load_checkpoint(path, lm_module, optimizer)
        weights, optimizer_state, state = read_checkpoint(path)
        load_sharded_state(model, optimizer, weights, optimizer_state)
        return state

    def full_weights(self, module: torch.nn.Module) -> dict[str, Tensor] | None:
        """Under FSDP the whole model's weights, gathered from the shards (every rank must call);
        otherwise None: the module holds its full weights and saves them itself."""
        return self.accelerator.get_state_dict(module) if self.uses_fsdp() else None

    def main_says(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every rank (a decision all ranks must take together)."""
        if not self.enabled:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag], from_process=0)[0])



def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its state_dict's indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = sum(id(p) not in names for p in params)
    if missing:
        raise ValueError(f"{missing} optimizer parameters are not parameters of the model being checkpointed")
    return [names[id(p)] for p in params]


def gather_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Whole-model weights and optimizer state of an FSDP-sharded ``model``, gathered to full CPU tensors
    on rank 0 (a collective: every rank must call it; the other ranks get empty dicts).

    The optimizer state comes back in ``torch.optim.Optimizer.state_dict()``'s own layout (parameters
    by index, in the optimizer's order), i.e. what one process would save, so `save_checkpoint` writes
    the same checkpoint as a single-process run and any world size can resume from it.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    by_name = get_optimizer_state_dict(model, optimizer, options=full)
    if not by_name:  # not rank 0
        return weights, {"state": {}, "param_groups": []}
    index = {n: i for i, n in enumerate(_parameter_names(model, optimizer))}
    unknown = sorted(set(by_name["state"]) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for parameters the model does not name: {unknown[:3]}")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return weights, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor],
                       optimizer_state: dict) -> None:
    """The inverse of `gather_sharded_state`: every rank passes the whole checkpoint and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _parameter_names(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


class _StateOnly:
    """Stands in for a module or optimizer whose state dict has already been gathered."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state
