"""Deterministic randomness derived from (seed, names...).

Every random draw of a run (the prompts of a batch, a sampler call, the offline data order) uses a
generator seeded from the run seed and *where* it is used (e.g. the step number). A resumed run
therefore needs no saved RNG state to continue the same trajectory: the draws of step 1234 are the
same whether the run got there in one go or after a restart.
"""

from __future__ import annotations

import hashlib

import torch


def seed_for(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_for(*parts))
    return gen
