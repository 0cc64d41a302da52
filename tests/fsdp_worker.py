"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): FSDP2 checkpoints through the
`Distributed` calls `distill.run` makes (checkpoint_views, load_checkpoint). Writes what it measured to
<out>/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

from kdlab.models import tiny_llama_config
from accelerate.utils import DistributedType

from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.rundir import latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


class FSDPAccelerator:
    """What `Distributed` reads from accelerate's Accelerator under an FSDP launch (accelerate's FSDP
    plugin needs GPUs; the sharding below is real FSDP2)."""

    num_processes, process_index, distributed_type = world, rank, DistributedType.FSDP


kd = Distributed(FSDPAccelerator())
assert kd.uses_fsdp()
torch.set_num_threads(1)
BATCHES = [torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(100))] * 6  # learnt step by step


def model(seed: int, sharded: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config(16, 16, 2, 2))
    if sharded:  # one FSDP unit per decoder layer, as configs/accelerate/fsdp.yaml
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
    return m


def optimizer(m) -> torch.optim.AdamW:
    return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)


def train(m, opt, batches, sharded: bool) -> list[float]:
    """The global batch's mean loss per step; each rank trains on its half when sharded."""
    losses = []
    for x in batches:
        if sharded:
            per = len(x) // world
            x = x[rank * per:(rank + 1) * per]
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()  # FSDP averages the gradients over ranks: the gradient of the global mean
        opt.step()
        total = loss.detach().clone()
        if sharded:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


m = model(0, sharded=True)
opt = optimizer(m)
before = train(m, opt, BATCHES[:3], sharded=True)
weights, opt_state = kd.checkpoint_views(m, opt)  # what distill.run saves; every rank takes part
if rank == 0:
    save_checkpoint(out / "checkpoints", 3, weights, opt_state, {"tokens": 0})
dist.barrier()
uninterrupted = train(m, opt, BATCHES[3:], sharded=True)

# Resume under FSDP into a differently initialised model and a fresh optimizer.
path = latest_checkpoint(out / "checkpoints")
m2 = model(1, sharded=True)
opt2 = optimizer(m2)
_, o, _ = read_checkpoint(path)
saved = {"adam_steps": sorted({int(s["step"]) for s in o["state"].values()}), "saved_state_entries": len(o["state"])}
state = kd.load_checkpoint(path, None, m2, opt2)  # what distill.run does on --resume
resumed = train(m2, opt2, BATCHES[3:], sharded=True)

result = {"rank": rank, "before": before, "uninterrupted": uninterrupted, "resumed_fsdp": resumed,
          "state": state, "gathered_on_this_rank": bool(weights.state_dict()), **saved}
if rank == 0:  # the same checkpoint resumes a single unsharded process
    m3 = model(2, sharded=False)
    opt3 = optimizer(m3)
    load_checkpoint(path, m3, opt3)
    result["resumed_one_process"] = train(m3, opt3, BATCHES[3:], sharded=False)
    result["parameters"] = len(list(m3.parameters()))
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
