"""A world's prompt pools: disjoint `stage1`, `stage2` and `eval` pools of left-padded prompts.

Synthetic worlds draw them from the world's prompt distribution (uniform tokens, or oracle
continuations of a fixed start token); task worlds take them from the task's dataset
(kdlab.data.tasks) and tokenize them with the models' tokenizer.
"""

from __future__ import annotations

import torch

from kdlab.config import RunConfig
from kdlab.models import LM
from kdlab.models.sampling import sample
from kdlab.seeding import generator_for

POOLS = ("stage1", "stage2", "eval")

Pools = dict[str, tuple[torch.Tensor, torch.Tensor]]  # pool -> (ids_NxP, mask_NxP)


def pool_sizes(cfg: RunConfig) -> dict[str, int]:
    p = cfg.world.pools
    return {"stage1": p.stage1, "stage2": p.stage2, "eval": p.eval}


def task_pools(cfg: RunConfig, tokenizer, log) -> tuple[Pools, dict, list]:
    """Disjoint pools from the task dataset (kdlab.data.tasks), tokenized with the models' tokenizer.

    Returns the pools, their truncation reports, and the eval pool's examples (prompt, reference) in
    pool order, which the task metrics score against."""
    from kdlab.data.tasks import load_pools, tokenize_prompts

    task = cfg.world.task
    if tokenizer is None:
        raise ValueError(f"world.task={task.name!r} needs a tokenizer: the oracle (or, without one, the teacher) "
                         "must be an 'hf:' model directory or hub name that includes its tokenizer files")
    texts = load_pools(task, pool_sizes(cfg), cfg.world.seed)
    pools, reports = {}, {}
    for name in POOLS:
        ids, mask, report = tokenize_prompts(texts[name], tokenizer, task.max_input_tokens,
                                             max_output_tokens=task.max_output_tokens, pool=name)
        pools[name] = (ids, mask)
        reports[name] = report.as_dict()
        log(f"[stage 1] {report.summary()}")
    return pools, reports, texts["eval"]


def synthetic_pools(cfg: RunConfig, oracle: LM, device, vocab_size: int) -> Pools:
    """Disjoint prompt pools drawn from the world's prompt distribution (duplicates removed across pools)."""
    w = cfg.world
    sizes = pool_sizes(cfg)
    total = sum(sizes.values())
    gen = generator_for(w.seed, "prompts")
    seen: set[tuple[int, ...]] = set()
    rows: list[torch.Tensor] = []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50:
            raise ValueError(
                f"cannot draw {total} distinct prompts of length {w.prompt_length} from this world; "
                "lower world.pools.* or raise world.prompt_length / world.vocab_size"
            )
        n = (total - len(rows)) * 2 + 16
        if w.prompt_source == "uniform":
            batch = torch.randint(0, vocab_size, (n, w.prompt_length), generator=gen)
        else:  # oracle: continue a fixed start token (0) with oracle samples
            start = torch.zeros(n, 1, dtype=torch.long)
            out = sample(oracle, start.to(device), None, max_new_tokens=w.prompt_length - 1, generator=gen)
            batch = torch.cat([start, out.response_ids_BxR.cpu()], 1)
        for row in batch:
            key = tuple(row.tolist())
            if key not in seen:
                seen.add(key)
                rows.append(row)
                if len(rows) == total:
                    break
    ids = torch.stack(rows)
    pools, start = {}, 0
    for name in POOLS:
        chunk = ids[start:start + sizes[name]]
        pools[name] = (chunk, torch.ones_like(chunk, dtype=torch.bool))
        start += sizes[name]
    return pools
