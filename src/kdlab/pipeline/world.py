"""The world stage 2 runs in: the oracle, the teacher, the student init and disjoint prompt pools.

`build_world` loads it from the stage-1 build cache (kdlab.pipeline.world_cache), which builds it
once per world: prompt pools (kdlab.data.prompts), then stage 1 (kdlab.pipeline.stage1).
"""

from __future__ import annotations

import contextlib

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.config import RunConfig
from kdlab.models import LM, check_vocab_compatible
from kdlab.pipeline import world_cache
from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.stage1 import STUDENT_INIT, TEACHER, load_pretrained


@dataclass
class World:
    """Everything stage 2 needs from stage 1. Prompts are left-padded `ids`/`mask` pairs per pool.

    `eos_token_id` ends every sampled response (the oracle's, else the teacher's; a tuple when the model
    lists several, any of which ends a response; None in the synthetic world, where every response has
    full length)."""

    directory: Path
    oracle: LM | None
    teacher: LM
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    info: dict
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def teacher_dir(self) -> Path:
        return self.directory / TEACHER

    @property
    def student_init_dir(self) -> Path:
        return self.directory / STUDENT_INIT

    def load_student_init(self, device: str | torch.device = "cpu") -> LM:
        return LM.load(self.student_init_dir, device=device)

    def eval_texts(self) -> list[dict]:
        """Task worlds: the eval pool's prompt texts and references, in pool order (`[]` when synthetic)."""
        path = self.directory / world_cache.EVAL_TEXTS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_world(cfg: RunConfig, device="cpu", log=print, dist: Distributed | None = None) -> World:
    """Load stage 1 from the cache, or build it (oracle, pools, teacher SFT, student-init SFT) once.

    With `dist`, every rank must call this: all take part in building, rank 0 writes."""
    dist = dist or Distributed(None)
    root = world_cache.entry_dir(cfg)
    # Runs started at once on one cache (array jobs) build each world once: the first takes the entry's lock
    # and builds, the others wait for it and load. The lock dies with its process (a killed build frees it).
    with world_cache.build_lock(root) if dist.is_main else contextlib.nullcontext():
        if dist.main_says(not world_cache.is_built(root)):
            world_cache.build(cfg, root, device, log, dist)
        dist.barrier()  # rank 0 has renamed the finished cache entry into place
    return load_world(cfg, root, device)


def load_world(cfg: RunConfig, root: Path, device="cpu") -> World:
    """The world of the built cache entry `root`."""
    info = json.loads((root / world_cache.INFO).read_text())
    prompts = world_cache.load_prompts(root)
    if cfg.world.oracle == "none":
        oracle = None  # golden is skipped, not faked
    elif (root / world_cache.ORACLE).exists():
        oracle = LM.load(root / world_cache.ORACLE, device=device)
    else:
        oracle = load_pretrained(cfg.world.oracle, cfg, device)
    teacher = LM.load(root / TEACHER, device=device)
    if oracle is not None:
        check_vocab_compatible(oracle, teacher, ("oracle", "teacher"))
    eos = (oracle or teacher).eos_token_id
    return World(directory=root, oracle=oracle, teacher=teacher, prompts=prompts, info=info, eos_token_id=eos)
