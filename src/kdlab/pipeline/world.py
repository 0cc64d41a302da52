"""The world (oracle + disjoint prompt pools) and stage 1 (teacher SFT, student-init SFT).

Stage 1 is cached by a hash of everything it depends on (`RunConfig.stage1_key`): every stage-2 run
of a sweep loads the same oracle, teacher and student init instead of training them again. The cache
entry is built in a temporary directory and renamed into place, so a killed build leaves nothing that
looks finished. Under `accelerate launch` every rank takes part in the SFT (data parallel, each rank
on its slice of the global minibatch, loss = global token mean); rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdlab import record
from kdlab.config import ArchConfig, RunConfig, SFTConfig
from kdlab.models import LM, check_vocab_compatible, make_synthetic_oracle, set_dropout, tiny_llama_config
from kdlab.models.sampling import sample
from kdlab.pipeline.distributed import Distributed
from kdlab.seeding import generator_for

POOLS = ("stage1", "stage2", "eval")


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

    def load_student_init(self, device: str | torch.device = "cpu") -> LM:
        return LM.load(self.directory / "student_init", device=device)

    def eval_texts(self) -> list[dict]:
        """Task worlds: the eval pool's prompt texts and references, in pool order (`[]` when synthetic)."""
        path = self.directory / "eval_texts.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hf_path(spec: str) -> str:
    return spec[len("hf:"):]


def _load_hf(spec: str, cfg: RunConfig, device) -> LM:
    """A pretrained 'hf:' model in the configured dtype (models.dtype)."""
    dtype = None if cfg.models.dtype == "auto" else getattr(torch, cfg.models.dtype)
    return LM.load(_hf_path(spec), device=device, dtype=dtype)


def bf16_autocast(device, enabled: bool):
    """bfloat16 autocast for training and sampling forwards (`precision: bf16`), else a no-op."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def _new_model(spec: ArchConfig | str, cfg: RunConfig, vocab_size: int, max_len: int, seed: int, device,
               tokenizer=None) -> LM:
    """A fresh model from an architecture (seeded init) or a pretrained one ('hf:<name or path>').
    A model built from an architecture gets the oracle's tokenizer (task worlds decode its outputs)."""
    if isinstance(spec, str):
        return _load_hf(spec, cfg, device)
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_heads=spec.num_heads, intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=max(64, max_len),
    )
    torch.manual_seed(seed)
    return LM(LlamaForCausalLM(config).to(device), tokenizer)


def _pool_sizes(cfg: RunConfig) -> dict[str, int]:
    p = cfg.world.pools
    return {"stage1": p.stage1, "stage2": p.stage2, "eval": p.eval}


def _task_prompts(cfg: RunConfig, tokenizer, directory: Path | None, log) -> tuple[dict, dict]:
    """Disjoint pools from the task dataset (kdlab.data.tasks), tokenized with the models' tokenizer.

    Returns the pools and their truncation reports; writes the eval pool's texts (prompt, reference)
    to `eval_texts.jsonl` for the task metrics."""
    from kdlab.data.tasks import load_pools, tokenize_prompts

    task = cfg.world.task
    if tokenizer is None:
        raise ValueError(f"world.task={task.name!r} needs a tokenizer: the oracle (or, without one, the teacher) "
                         "must be an 'hf:' model directory or hub name that includes its tokenizer files")
    texts = load_pools(task, _pool_sizes(cfg), cfg.world.seed)
    pools, reports = {}, {}
    for name in POOLS:
        ids, mask, report = tokenize_prompts(texts[name], tokenizer, task.max_input_tokens,
                                             max_output_tokens=task.max_output_tokens, pool=name)
        pools[name] = (ids, mask)
        reports[name] = report.as_dict()
        log(f"[stage 1] {report.summary()}")
    if directory is not None:
        with open(directory / "eval_texts.jsonl", "w") as f:
            for ex in texts["eval"]:
                f.write(json.dumps({"prompt": ex.prompt, "reference": ex.reference}) + "\n")
    return pools, reports


def _make_prompts(cfg: RunConfig, oracle: LM, device, vocab_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint prompt pools drawn from the world's prompt distribution (duplicates removed across pools)."""
    w = cfg.world
    sizes = _pool_sizes(cfg)
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


def _oracle_samples(oracle: LM, ids, mask, max_new_tokens: int, seed: int, batch_size: int = 512):
    gen = generator_for(seed, "stage1-oracle-samples")
    out_ids, out_mask = [], []
    for i in tqdm(range(0, len(ids), batch_size), desc="stage 1: oracle samples", leave=False, disable=None):
        s = sample(oracle, ids[i:i + batch_size].to(oracle.device), mask[i:i + batch_size].to(oracle.device),
                   max_new_tokens=max_new_tokens, eos_token_id=oracle.eos_token_id, generator=gen)
        out_ids.append(s.response_ids_BxR.cpu())
        out_mask.append(s.response_mask_BxR.cpu())
    return torch.cat(out_ids), torch.cat(out_mask)


def error_subset(prompt_ids: torch.Tensor, vocab_size: int, cfg: RunConfig) -> torch.Tensor:
    """Rows of left-padded synthetic prompts in the teacher-error subset S (stage1.teacher_error):
    their first token is below fraction x vocab_size. All False when the lever is off."""
    k = cfg.stage1.teacher_error.subset_size(vocab_size)
    return prompt_ids[:, 0] < k


def _with_teacher_error(oracle: LM, ids, mask, r_ids, r_mask, cfg: RunConfig):
    """The teacher's SFT responses: the clean oracle samples, except on the subset S, where they are
    redrawn from the oracle at stage1.teacher_error.temperature (a systematic error of known place)."""
    err = cfg.stage1.teacher_error
    in_s = error_subset(ids, oracle.vocab_size, cfg)
    if err.fraction == 0 or err.temperature == 1 or not in_s.any():
        return r_ids, r_mask
    gen = generator_for(cfg.world.seed, "stage1-teacher-error")
    r_ids, r_mask = r_ids.clone(), r_mask.clone()
    rows = in_s.nonzero().squeeze(1)
    for i in range(0, len(rows), cfg.generation_batch_size):
        sel = rows[i:i + cfg.generation_batch_size]
        s = sample(oracle, ids[sel].to(oracle.device), mask[sel].to(oracle.device),
                   max_new_tokens=r_ids.shape[1], temperature=err.temperature,
                   eos_token_id=oracle.eos_token_id, generator=gen)
        r_ids[sel], r_mask[sel] = s.response_ids_BxR.cpu(), s.response_mask_BxR.cpu()
    return r_ids, r_mask


def sft(lm: LM, prompt_ids, prompt_mask, response_ids, response_mask, budget: SFTConfig, seed: int,
        desc: str, dist: Distributed | None = None, bf16: bool = False) -> list[float]:
    """Stage-1 SFT: cross-entropy on response tokens, Adam, minibatches drawn with a seeded generator.

    With `dist` (several ranks) each rank trains on its slice of the same global minibatch and the
    loss is the global token mean, as in stage 2 (kdlab.pipeline.distributed). `bf16`: the forward runs
    under bfloat16 autocast (log-probs come out float32, weights stay float32).
    Returns the per-step training losses (nats per token)."""
    dist = dist or Distributed(None)
    n = len(prompt_ids)
    batch = min(budget.batch_size, n)
    dist.check_batch_size(batch, f"stage1.{desc.replace('_init', '')}.batch_size")
    gen = generator_for(seed, f"sft-{desc}")
    params = [p for p in lm.hf.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=budget.lr)
    model, opt = dist.prepare(lm.hf, opt)
    trainee = dist.trainee(lm, model)
    losses = []
    model.train()
    for _ in tqdm(range(budget.steps), desc=f"stage 1: {desc}", leave=False, disable=None if dist.is_main else True):
        idx = dist.shard_indices(torch.randint(0, n, (batch,), generator=gen))  # this rank's rows
        dev = lm.device
        with bf16_autocast(dev, bf16):
            logp_BxR = trainee.response_logprobs(prompt_ids[idx].to(dev), prompt_mask[idx].to(dev),
                                                 response_ids[idx].to(dev), response_mask[idx].to(dev))
        count = dist.sum(response_mask[idx].sum().to(dev, torch.float64))  # tokens in the global minibatch
        loss_rank = -logp_BxR.sum()
        opt.zero_grad(set_to_none=True)
        # One process: the plain mean. Several: DDP averages, so W x this rank's share (see distributed.py).
        (loss_rank * dist.world_size / count.clamp_min(1)).backward()
        opt.step()
        losses.append((dist.sum(loss_rank.detach().double()) / count.clamp_min(1)).item())
    model.eval()
    return losses


def build_world(cfg: RunConfig, device="cpu", log=print, dist: Distributed | None = None) -> World:
    """Load stage 1 from the cache, or build it (oracle, pools, teacher SFT, student-init SFT) once.

    With `dist`, every rank must call this: all take part in building, rank 0 writes."""
    dist = dist or Distributed(None)
    root = cfg.resolved_cache_dir() / f"stage1-{cfg.stage1_key()}"
    if dist.main_says(not (root / "world.json").exists()):
        _build_stage1(cfg, root, device, log, dist)
    dist.barrier()  # rank 0 has renamed the finished cache entry into place
    info = json.loads((root / "world.json").read_text())
    pools_t = load_file(str(root / "prompts.safetensors"))
    prompts = {name: (pools_t[f"{name}.ids"], pools_t[f"{name}.mask"].bool()) for name in POOLS}
    if cfg.world.oracle == "none":
        oracle = None  # golden is skipped, not faked
    elif (root / "oracle").exists():
        oracle = LM.load(root / "oracle", device=device)
    else:
        oracle = _load_hf(cfg.world.oracle, cfg, device)
    teacher = LM.load(root / "teacher", device=device)
    if oracle is not None:
        check_vocab_compatible(oracle, teacher, ("oracle", "teacher"))
    eos = (oracle or teacher).eos_token_id
    return World(directory=root, oracle=oracle, teacher=teacher, prompts=prompts, info=info, eos_token_id=eos)


def _build_stage1(cfg: RunConfig, root: Path, device, log, dist: Distributed) -> None:
    t0 = time.time()
    w = cfg.world
    tmp = None
    if dist.is_main:  # the other ranks compute alongside rank 0 (same seeds) and write nothing
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.temp_dir(root.parent, ".tmp-stage1-")  # ordinary mode, not mkdtemp's 0700
    try:
        log(f"[stage 1] building the world ({root.name})")
        if w.oracle == "none":
            if tmp is not None:
                reports = _build_without_oracle(cfg, tmp, device, log)
                (tmp / "world.json").write_text(json.dumps({"stage1_key": cfg.stage1_key(), "oracle": None,
                                                            "prompt_reports": reports}))
                record.publish(tmp, root)
            return
        if w.oracle == "synthetic":
            s = w.synthetic
            oracle = make_synthetic_oracle(
                vocab_size=w.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
                num_heads=s.num_heads, intermediate_size=s.intermediate_size or 4 * s.hidden_size,
                seed=w.seed, logit_scale=s.logit_scale, init_std=s.init_std,
                max_position_embeddings=max(64, w.prompt_length + w.response_length),
            )
            oracle.hf.to(device)
            if tmp is not None:
                oracle.save(tmp / "oracle")
        else:
            oracle = _load_hf(w.oracle, cfg, device)
        info: dict = {"stage1_key": cfg.stage1_key()}
        if w.task is not None:
            prompts, info["prompt_reports"] = _task_prompts(cfg, oracle.tokenizer, tmp, log)
        else:
            prompts = _make_prompts(cfg, oracle, device, oracle.vocab_size)
        if tmp is not None:
            _save_prompts(prompts, tmp)
        ids, mask = prompts["stage1"]
        n = max(cfg.stage1.teacher.num_samples, cfg.stage1.student.num_samples)
        r_ids, r_mask = _oracle_samples(oracle, ids[:n], mask[:n], w.max_response_tokens, w.seed,
                                        batch_size=cfg.generation_batch_size)
        max_len = w.max_prompt_tokens + w.max_response_tokens
        for who, arch, budget, seed_offset in (
            ("teacher", cfg.models.teacher, cfg.stage1.teacher, 1),
            ("student_init", cfg.models.student, cfg.stage1.student, 2),
        ):
            lm = _new_model(arch, cfg, oracle.vocab_size, max_len, w.seed + seed_offset, device, oracle.tokenizer)
            if cfg.models.dropout is not None:
                set_dropout(lm.hf, cfg.models.dropout)
            check_vocab_compatible(oracle, lm, ("oracle", who))
            k = budget.num_samples
            y_ids, y_mask = r_ids[:k], r_mask[:k]
            if who == "teacher":
                y_ids, y_mask = _with_teacher_error(oracle, ids[:k], mask[:k], y_ids, y_mask, cfg)
                info["teacher_error"] = {**cfg.stage1.teacher_error.model_dump(),
                                         "subset_first_tokens": cfg.stage1.teacher_error.subset_size(oracle.vocab_size),
                                         "subset_share_of_sft": float(error_subset(ids[:k], oracle.vocab_size, cfg)
                                                                      .float().mean())}
            losses = sft(lm, ids[:k], mask[:k], y_ids, y_mask, budget, w.seed, who, dist,
                         bf16=cfg.precision == "bf16")
            gathered = dist.full_weights(lm.hf)  # FSDP: every rank takes part in the gather; else None
            if tmp is not None:
                lm.save(tmp / who) if gathered is None else lm.hf.save_pretrained(tmp / who, state_dict=gathered)
            info[who] = {"sft_final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1) if losses else None,
                         "num_parameters": sum(p.numel() for p in lm.hf.parameters())}
            log(f"[stage 1] {who}: {budget.steps} SFT steps on {k} oracle samples, "
                f"final loss {info[who]['sft_final_loss'] or float('nan'):.3f} nats/token")
        if tmp is None:
            return
        info["seconds"] = round(time.time() - t0, 1)
        info["processes"] = dist.world_size
        (tmp / "world.json").write_text(json.dumps(info, indent=2))
        if root.exists():  # a concurrent builder finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            record.publish(tmp, root)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_prompts(prompts, directory: Path) -> None:
    save_file({f"{k}.{part}": t.contiguous() if part == "ids" else t.to(torch.uint8).contiguous()
               for k, (ids, mask) in prompts.items() for part, t in (("ids", ids), ("mask", mask))},
              str(directory / "prompts.safetensors"))


def _build_without_oracle(cfg: RunConfig, tmp: Path, device, log) -> dict | None:
    """No ground truth: the teacher and the student init are the given pretrained models as they are
    (there are no oracle samples to fine-tune them on); prompts come from the configured distribution
    over the teacher's vocabulary."""
    teacher = _load_hf(cfg.models.teacher, cfg, device)
    student = _load_hf(cfg.models.student, cfg, device)
    check_vocab_compatible(teacher, student, ("teacher", "student"))
    if cfg.world.task is not None:
        prompts, reports = _task_prompts(cfg, teacher.tokenizer, tmp, log)
    elif cfg.world.prompt_source == "oracle":
        raise ValueError("world.prompt_source='oracle' needs an oracle; use 'uniform' with world.oracle='none'")
    else:
        prompts, reports = _make_prompts(cfg, teacher, device, teacher.vocab_size), None
    _save_prompts(prompts, tmp)
    teacher.save(tmp / "teacher")
    student.save(tmp / "student_init")
    log("[stage 1] no oracle: teacher and student taken as given; golden metrics are skipped")
    return reports
