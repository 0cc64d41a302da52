"""Evaluation during stage 2: proxy (vs teacher) and golden (vs oracle) sequence-level divergences.

The references never change during stage 2, so their samples on the held-out prompts and their
per-position log-probs are computed once (`ReferenceCache`) and shared by every run of a sweep (they
live in the stage-1 cache directory, keyed by the evaluation settings). An evaluation then costs one
student forward pass per reference. The divergence to the teacher on the run's own *training* prompts
is logged too (`train_proxy_fkl`): held-out proxy rising with it is over-fitting, golden rising while
held-out proxy falls is teacher hacking (WORLD-NOTES lesson 3).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from kdlab import record
from kdlab.config import RunConfig
from kdlab.metrics import ReferenceCache, sequence_fkl, sequence_rkl
from kdlab.metrics.drift import DriftPanel
from kdlab.metrics.probe import EvalProbe, Reference, log_spaced_steps
from kdlab.models import LM
from kdlab.pipeline.world import World
from kdlab.seeding import generator_for


eval_steps = log_spaced_steps  # the monitor's schedule too (kdlab.metrics.probe)


def _cache(path: Path, build) -> ReferenceCache:
    """Load the reference cache at `path`, or build and save it once: runs that share it (a sweep's, started
    at once) take its lock, so one builds and the others load."""
    with record.file_lock(path.with_name(f".{path.name}.lock")):
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
        build = dict(samples_per_prompt=e.samples_per_prompt, max_new_tokens=cfg.world.max_response_tokens,
                     eos_token_id=world.eos_token_id, batch_size=e.batch_size, storage=e.storage,
                     memory_budget_bytes=e.memory_mb * 2**20, topk=e.topk)
        dev = world.teacher.device
        self.proxy_cache = _cache(shared / "teacher", lambda: ReferenceCache.build(
            world.teacher, ids.to(dev), mask.to(dev), generator=generator_for(cfg.world.seed, "eval-teacher"), **build))
        self.golden_cache = None
        if world.oracle is not None:
            self.golden_cache = _cache(shared / "oracle", lambda: ReferenceCache.build(
                world.oracle, ids.to(dev), mask.to(dev), generator=generator_for(cfg.world.seed, "eval-oracle"), **build))
            info_path = shared / "teacher_golden.json"
            with record.file_lock(shared / ".teacher_golden.lock"):
                try:
                    self.teacher_golden = json.loads(info_path.read_text())
                except (OSError, json.JSONDecodeError):  # absent, or torn by an old non-atomic write: derived data
                    # the teacher's own distance to the truth: the floor it offers
                    est = sequence_fkl(world.teacher, self.golden_cache, batch_size=e.batch_size)
                    self.teacher_golden = {"teacher_golden_fkl": est.mean, "teacher_golden_fkl_se": est.se}
                    record.write_json(info_path, self.teacher_golden)
        else:
            self.teacher_golden = {}
        self.task = TaskScorer.create(cfg, world, shared)
        if self.task is not None:
            self.teacher_golden.update(self.task.reference_scores)
        self.train_cache = None
        if train_prompts is not None and e.train_prompts > 0:
            t_ids, t_mask = train_prompts
            t_ids, t_mask = t_ids[:e.train_prompts], t_mask[:e.train_prompts]
            self.train_cache = _cache(run_dir / record.EVAL_TRAIN_REFERENCE, lambda: ReferenceCache.build(
                world.teacher, t_ids.to(dev), t_mask.to(dev), generator=generator_for(cfg.seed, "eval-train"), **build))
        self.drift = None
        if e.drift:
            n = min(e.drift_prompts, len(ids))
            self.drift = DriftPanel(world.teacher, ids[:n], mask[:n], cfg.world.max_response_tokens,
                                    oracle=world.oracle, eos_token_id=world.eos_token_id, seed=cfg.world.seed,
                                    batch_size=e.batch_size)
        self.probe = EvalProbe([Reference("proxy", self.proxy_cache, world.teacher),
                                Reference("golden", self.golden_cache, world.oracle),
                                Reference("train_proxy", self.train_cache, world.teacher)], batch_size=e.batch_size)

    @property
    def world_info(self) -> dict:
        """What the run's world.json adds to the world's description: the teacher's own golden (and task
        scores), and how every metric's reference was held (exact, or a top-k lower bound)."""
        return {**self.teacher_golden, "metric_storage": self.probe.storage}

    @torch.no_grad()
    def __call__(self, student: LM, step: int, per_prompt_dir: Path | None = None) -> dict[str, float | str | None]:
        """One evaluation. With `per_prompt_dir`, the per-prompt KL sums are also written there
        (`step-N.safetensors`): the same prompts are evaluated at every step, so the change of a
        metric between two steps has a *paired* standard error (the SE of per-prompt differences),
        far smaller than combining the two per-step SEs as if they were independent."""
        bs = self.cfg.eval.batch_size
        row, per_prompt = self.probe(student)  # golden is skipped, not faked, when there is no oracle
        tg, tg_se = record.TEACHER_GOLDEN, record.se_column(record.TEACHER_GOLDEN)
        if row.get(record.GOLDEN) is not None and tg in self.teacher_golden:
            # The teacher's own golden beside the student's, so that a metrics file alone shows the
            # teacher floor (kdlab.analysis.attribution): the student's golden below it = case (i).
            row[tg], row[tg_se] = self.teacher_golden[tg], self.teacher_golden[tg_se]
        if per_prompt_dir is not None and per_prompt:
            from safetensors.torch import save_file

            per_prompt_dir.mkdir(parents=True, exist_ok=True)
            final = per_prompt_dir / record.per_prompt_file(step)
            tmp = per_prompt_dir / f".tmp-{final.name}"
            save_file(per_prompt, str(tmp))
            record.publish(tmp, final)
        if self.cfg.eval.reverse:
            ids, mask = self.eval_prompts
            refs = (("proxy", self.world.teacher), ("golden", self.world.oracle))
            for name, ref in refs:
                if ref is None:
                    continue
                est = sequence_rkl(student, ref, ids.to(student.device), mask.to(student.device),
                                   samples_per_prompt=self.cfg.eval.samples_per_prompt,
                                   max_new_tokens=self.cfg.world.max_response_tokens,
                                   eos_token_id=self.world.eos_token_id, generator=generator_for(self.cfg.seed, "eval-rkl", name, step), batch_size=bs)
                row[f"{name}_rkl"] = est.mean
                row[f"{name}_rkl_se"] = est.se
        if self.task is not None:
            row.update(self.task(student))
        if self.drift is not None:
            row.update(self.drift(student))
        return {k: v if isinstance(v, str) else (None if v is None or not math.isfinite(v) else float(v))
                for k, v in row.items()}


class TaskScorer:
    """Task metrics (ROUGE / BLEU, kdlab.metrics.task) of greedy decodes on held-out prompts.

    The oracle's and the teacher's greedy outputs never change during stage 2: they are decoded once
    and kept in the shared evaluation directory (`task-<metric>.json`), with the teacher's own scores
    (the level a perfect imitation of the teacher would reach)."""

    def __init__(self, metric: str, prompts, references: list[str | None], tokenizer, max_new_tokens: int,
                 eos_token_id: int | tuple[int, ...] | None, batch_size: int):
        self.metric, self.prompts, self.tokenizer, self.references = metric, prompts, tokenizer, references
        self.oracle_texts: list[str] | None = None  # the oracle's greedy outputs, decoded once (create)
        self.max_new_tokens, self.eos_token_id, self.batch_size = max_new_tokens, eos_token_id, batch_size
        self.reference_scores: dict[str, float] = {}

    @classmethod
    def create(cls, cfg: RunConfig, world: World, shared: Path) -> "TaskScorer | None":
        from kdlab.metrics.task import metric_for

        e = cfg.eval
        metric = metric_for(e.task_metrics, cfg.world.task.name if cfg.world.task else None)
        if metric is None:
            return None
        texts = world.eval_texts()[:e.task_metric_prompts]
        tokenizer = world.teacher.tokenizer
        if not texts or tokenizer is None:
            raise ValueError("eval.task_metrics needs a task world whose teacher has a tokenizer "
                             f"(eval texts found: {len(texts)}, tokenizer: {tokenizer is not None})")
        ids, mask = world.prompts["eval"]
        prompts = (ids[:len(texts)], mask[:len(texts)])
        refs = [t["reference"] for t in texts]
        scorer = cls(metric, prompts, refs, tokenizer, cfg.world.max_response_tokens, world.eos_token_id,
                     e.batch_size)
        path = shared / f"task-{metric}-{len(texts)}.json"
        if path.exists():
            saved = json.loads(path.read_text())
        else:
            saved = {"oracle_texts": scorer.decode(world.oracle) if world.oracle is not None else None,
                     "teacher_texts": scorer.decode(world.teacher)}
            scorer.oracle_texts = saved["oracle_texts"]  # the teacher is scored against them too
            saved["teacher_scores"] = scorer.scores(saved["teacher_texts"])
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, path)
        scorer.oracle_texts = saved["oracle_texts"]
        scorer.reference_scores = {f"teacher_{k}": v for k, v in saved["teacher_scores"].items()}
        return scorer

    @torch.no_grad()
    def decode(self, lm: LM) -> list[str]:
        """Greedy outputs on the prompts, as text (special tokens and padding dropped)."""
        from kdlab.models.sampling import sample

        ids, mask = self.prompts
        texts: list[str] = []
        for i in range(0, len(ids), self.batch_size):
            s = sample(lm, ids[i:i + self.batch_size].to(lm.device), mask[i:i + self.batch_size].to(lm.device),
                       max_new_tokens=self.max_new_tokens, temperature=0.0, eos_token_id=self.eos_token_id)
            for row, keep in zip(s.response_ids_BxR.cpu(), s.response_mask_BxR.cpu()):
                texts.append(self.tokenizer.decode(row[keep].tolist(), skip_special_tokens=True).strip())
        return texts

    def scores(self, texts: list[str]) -> dict[str, float]:
        """`task_<name>_ref` against the dataset references (where there are any), `task_<name>_oracle`
        against the oracle's outputs (where there is an oracle)."""
        from kdlab.metrics.task import score

        out: dict[str, float] = {}
        pairs = [(t, r) for t, r in zip(texts, self.references) if r]
        if pairs:
            out.update({f"task_{k}_ref": v for k, v in score(self.metric, *zip(*pairs)).items()})
        if self.oracle_texts is not None:
            out.update({f"task_{k}_oracle": v for k, v in score(self.metric, texts, self.oracle_texts).items()})
        return out

    def __call__(self, student: LM) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self.scores(self.decode(student))
        out["task_seconds"] = time.perf_counter() - t0
        return out
