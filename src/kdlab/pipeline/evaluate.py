"""Evaluation during stage 2: proxy (vs teacher) and golden (vs oracle) sequence-level divergences.

The references never change during stage 2, so their samples on the held-out prompts and their
per-position log-probs are computed once (`ReferenceCache`) and shared by every run of a sweep (they
live in the stage-1 cache directory, keyed by the evaluation settings). An evaluation then costs one
student forward pass per reference. The divergence to the teacher on the run's own *training* prompts
is logged too (`train_proxy_fkl`): held-out proxy rising with it is over-fitting, golden rising while
held-out proxy falls is teacher hacking (WORLD-NOTES lesson 3).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kdlab.config import RunConfig
from kdlab.metrics import DivergenceEstimate, ReferenceCache, sequence_fkl, sequence_fkl_sums, sequence_rkl
from kdlab.models import LM
from kdlab.pipeline.world import World
from kdlab.seeding import generator_for


def eval_steps(total_steps: int, num_points: int) -> list[int]:
    """0, then `num_points` log-spaced steps in [1, total], always including the last step."""
    pts = np.unique(np.round(np.geomspace(1, total_steps, num_points)).astype(int))
    return sorted({0, *pts.tolist(), total_steps})


def _cache(path: Path, build) -> ReferenceCache:
    if path.exists():
        try:
            return ReferenceCache.load(path)
        except Exception:  # an interrupted write: rebuild it, it is derived data
            shutil.rmtree(path, ignore_errors=True)
    cache = build()
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    cache.save(tmp)
    tmp.replace(path)
    return cache


class Evaluator:
    def __init__(self, cfg: RunConfig, world: World, train_prompts: tuple[torch.Tensor, torch.Tensor] | None,
                 run_dir: Path):
        self.cfg = cfg
        self.world = world
        e = cfg.eval
        ids, mask = world.prompts["eval"]
        ids, mask = ids[:e.num_prompts], mask[:e.num_prompts]
        self.eval_prompts = (ids, mask)
        shared = world.directory / f"eval-{cfg.eval_key()}"
        shared.mkdir(parents=True, exist_ok=True)
        build = dict(samples_per_prompt=e.samples_per_prompt, max_new_tokens=cfg.world.response_length,
                     batch_size=e.batch_size)
        dev = world.teacher.device
        self.proxy_cache = _cache(shared / "teacher", lambda: ReferenceCache.build(
            world.teacher, ids.to(dev), mask.to(dev), generator=generator_for(cfg.world.seed, "eval-teacher"), **build))
        self.golden_cache = None
        if world.oracle is not None:
            self.golden_cache = _cache(shared / "oracle", lambda: ReferenceCache.build(
                world.oracle, ids.to(dev), mask.to(dev), generator=generator_for(cfg.world.seed, "eval-oracle"), **build))
            info_path = shared / "teacher_golden.json"
            if not info_path.exists():  # the teacher's own distance to the truth: the floor it offers
                est = sequence_fkl(world.teacher, self.golden_cache, batch_size=e.batch_size)
                info_path.write_text(f'{{"teacher_golden_fkl": {est.mean}, "teacher_golden_fkl_se": {est.se}}}')
            import json

            self.teacher_golden = json.loads(info_path.read_text())
        else:
            self.teacher_golden = {}
        self.train_cache = None
        if train_prompts is not None and e.train_prompts > 0:
            t_ids, t_mask = train_prompts
            t_ids, t_mask = t_ids[:e.train_prompts], t_mask[:e.train_prompts]
            self.train_cache = _cache(run_dir / "eval_train_reference", lambda: ReferenceCache.build(
                world.teacher, t_ids.to(dev), t_mask.to(dev), generator=generator_for(cfg.seed, "eval-train"), **build))

    @torch.no_grad()
    def __call__(self, student: LM, step: int, per_prompt_dir: Path | None = None) -> dict[str, float | None]:
        """One evaluation. With `per_prompt_dir`, the per-prompt KL sums are also written there
        (`step-N.safetensors`): the same prompts are evaluated at every step, so the change of a
        metric between two steps has a *paired* standard error (the SE of per-prompt differences),
        far smaller than combining the two per-step SEs as if they were independent."""
        bs = self.cfg.eval.batch_size
        row: dict[str, float | None] = {}
        per_prompt: dict[str, torch.Tensor] = {}
        w = self.world
        for name, cache, ref in (("proxy", self.proxy_cache, w.teacher), ("golden", self.golden_cache, w.oracle),
                                 ("train_proxy", self.train_cache, w.teacher)):
            if cache is None:
                continue  # golden is skipped, not faked, when there is no oracle
            # Cached reference log-probs when they fit the cache's budget, else a live reference forward.
            sums, counts = sequence_fkl_sums(student, cache, reference_lm=ref, batch_size=bs)
            est = DivergenceEstimate.from_sums(sums, counts, cache.samples_per_prompt)
            per_prompt[f"{name}_fkl"] = sums.double().view(-1, cache.samples_per_prompt).mean(1).contiguous()
            row[f"{name}_fkl"] = est.mean
            row[f"{name}_fkl_se"] = est.se
            row[f"{name}_fkl_per_token"] = est.per_token
        if per_prompt_dir is not None and per_prompt:
            from safetensors.torch import save_file

            per_prompt_dir.mkdir(parents=True, exist_ok=True)
            tmp = per_prompt_dir / f".tmp-step-{step:08d}.safetensors"
            save_file(per_prompt, str(tmp))
            os.replace(tmp, per_prompt_dir / f"step-{step:08d}.safetensors")
        if self.cfg.eval.reverse:
            ids, mask = self.eval_prompts
            refs = (("proxy", self.world.teacher), ("golden", self.world.oracle))
            for name, ref in refs:
                if ref is None:
                    continue
                est = sequence_rkl(student, ref, ids.to(student.device), mask.to(student.device),
                                   samples_per_prompt=self.cfg.eval.samples_per_prompt,
                                   max_new_tokens=self.cfg.world.response_length,
                                   generator=generator_for(self.cfg.seed, "eval-rkl", name, step), batch_size=bs)
                row[f"{name}_rkl"] = est.mean
                row[f"{name}_rkl_se"] = est.se
        return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in row.items()}
