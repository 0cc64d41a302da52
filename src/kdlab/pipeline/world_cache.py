"""The stage-1 build cache: one directory per world, keyed by a hash of everything stage 1 depends on
(`RunConfig.stage1_key`), so every stage-2 run of a sweep loads the same oracle, teacher and student
init instead of training them again.

An entry is built in a temporary directory and renamed into place, so a killed build leaves nothing
that looks finished; its `world.json` is written last. Under `accelerate launch` every rank takes part
in building (the stage-1 SFT is data parallel); rank 0 alone writes.

Layout of an entry (this module owns the names; kdlab.pipeline.world reads them):
`world.json` (what was built, with the SFT losses), `prompts.safetensors` (the pools), `oracle/`
(synthetic oracles only; a hub oracle is loaded from its source), `teacher/`, `student_init/`, and
`eval_texts.jsonl` (task worlds: the eval pool's prompt texts and references).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdlab import record
from kdlab.config import RunConfig
from kdlab.data.prompts import POOLS, Pools, synthetic_pools, task_pools
from kdlab.models import check_vocab_compatible, make_synthetic_oracle
from kdlab.pipeline import stage1
from kdlab.pipeline.distributed import Distributed
from kdlab.pipeline.stage1 import STUDENT_INIT, TEACHER

INFO = "world.json"  # written last: the entry is complete
PROMPTS = "prompts.safetensors"
EVAL_TEXTS = "eval_texts.jsonl"
ORACLE = "oracle"
# teacher/ and student_init/ are named by stage 1's roles (kdlab.pipeline.stage1.TEACHER, STUDENT_INIT)


def entry_dir(cfg: RunConfig) -> Path:
    return cfg.resolved_cache_dir() / f"stage1-{cfg.stage1_key()}"


def build_lock(root: Path):
    """The lock of one cache entry (a file beside it), held while it is checked and built."""
    return record.file_lock(root.parent / f".{root.name}.lock")


def is_built(root: Path) -> bool:
    return (root / INFO).exists()


def load_prompts(root: Path) -> Pools:
    pools_t = load_file(str(root / PROMPTS))
    return {name: (pools_t[f"{name}.ids"], pools_t[f"{name}.mask"].bool()) for name in POOLS}


def build(cfg: RunConfig, root: Path, device, log, dist: Distributed) -> None:
    """Build the entry `root`: the oracle, the prompt pools, and stage 1 (kdlab.pipeline.stage1)."""
    t0 = time.time()
    w = cfg.world
    tmp = None
    if dist.is_main:  # the other ranks compute alongside rank 0 (same seeds) and write nothing
        root.parent.mkdir(parents=True, exist_ok=True)
        # Builds killed before their rename left temporary directories of this entry: under the entry's
        # lock (build_lock) no other process is building it, so they are stale.
        for stale in root.parent.glob(f".tmp-{root.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = record.temp_dir(root.parent, f".tmp-{root.name}-")  # ordinary mode, not mkdtemp's 0700
    try:
        log(f"[stage 1] building the world ({root.name})")
        if w.oracle == "none":
            if tmp is not None:
                reports = _build_without_oracle(cfg, tmp, device, log)
                (tmp / INFO).write_text(json.dumps({"stage1_key": cfg.stage1_key(), "oracle": None,
                                                    "prompt_reports": reports}))
                record.publish(tmp, root)
            return
        if w.oracle == "synthetic":
            s = w.synthetic
            oracle = make_synthetic_oracle(
                vocab_size=w.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
                num_heads=s.num_heads, intermediate_size=s.intermediate_size or 4 * s.hidden_size,
                seed=w.seed, logit_scale=s.logit_scale, init_std=s.init_std,
                max_position_embeddings=max(64, w.prompt_length + w.response_length), eos_token_id=s.eos_token_id,
            )
            oracle.hf.to(device)
            if tmp is not None:
                oracle.save(tmp / ORACLE)
        else:
            oracle = stage1.load_pretrained(w.oracle, cfg, device)
        info: dict = {"stage1_key": cfg.stage1_key()}
        if w.task is not None:
            prompts, info["prompt_reports"], eval_examples = task_pools(cfg, oracle.tokenizer, log)
            if tmp is not None:
                _write_eval_texts(eval_examples, tmp)
        else:
            prompts = synthetic_pools(cfg, oracle, device, oracle.vocab_size)
        if tmp is not None:
            _save_prompts(prompts, tmp)
        info.update(stage1.train_models(cfg, oracle, *prompts["stage1"], device, log, dist, tmp))
        if tmp is None:
            return
        info["seconds"] = round(time.time() - t0, 1)
        info["processes"] = dist.world_size
        (tmp / INFO).write_text(json.dumps(info, indent=2))
        if root.exists():  # a concurrent builder finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            record.publish(tmp, root)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_prompts(prompts: Pools, directory: Path) -> None:
    save_file({f"{k}.{part}": t.contiguous() if part == "ids" else t.to(torch.uint8).contiguous()
               for k, (ids, mask) in prompts.items() for part, t in (("ids", ids), ("mask", mask))},
              str(directory / PROMPTS))


def _write_eval_texts(examples, directory: Path) -> None:
    with open(directory / EVAL_TEXTS, "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "reference": ex.reference}) + "\n")


def _build_without_oracle(cfg: RunConfig, tmp: Path, device, log) -> dict | None:
    """No ground truth: the teacher and the student init are the given pretrained models as they are
    (there are no oracle samples to fine-tune them on); prompts come from the configured distribution
    over the teacher's vocabulary."""
    teacher = stage1.load_pretrained(cfg.models.teacher, cfg, device)
    student = stage1.load_pretrained(cfg.models.student, cfg, device)
    check_vocab_compatible(teacher, student, ("teacher", "student"))
    if cfg.world.task is not None:
        prompts, reports, eval_examples = task_pools(cfg, teacher.tokenizer, log)
        _write_eval_texts(eval_examples, tmp)
    elif cfg.world.prompt_source == "oracle":
        raise ValueError("world.prompt_source='oracle' needs an oracle; use 'uniform' with world.oracle='none'")
    else:
        prompts, reports = synthetic_pools(cfg, teacher, device, teacher.vocab_size), None
    _save_prompts(prompts, tmp)
    teacher.save(tmp / TEACHER)
    student.save(tmp / STUDENT_INIT)
    log("[stage 1] no oracle: teacher and student taken as given; golden metrics are skipped")
    return reports
