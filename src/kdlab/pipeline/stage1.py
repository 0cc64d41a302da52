"""Stage 1: the teacher and the student init, each trained by SFT on oracle samples.

    oracle samples on the stage-1 pool -> teacher  = SFT(fresh model, samples; on the subset S the
                                                     samples of stage1.teacher_error)
                                       -> student init = SFT(fresh model, clean samples)

Each model gets a limited budget (`stage1.teacher` / `stage1.student`), so the teacher is imperfect
as a real one is. Under `accelerate launch` every rank takes part in the SFT (data parallel, each
rank on its slice of the global minibatch, loss = global token mean); the caller's rank 0 writes.
The world cache (kdlab.pipeline.world_cache) runs this once per world.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdlab.config import ArchConfig, RunConfig, SFTConfig
from kdlab.models import LM, bf16_autocast, check_vocab_compatible, set_dropout, tiny_llama_config
from kdlab.models.sampling import sample
from kdlab.pipeline.distributed import Distributed
from kdlab.seeding import generator_for

# The two models stage 1 trains: also their directory names in a world-cache entry and their keys in
# its world.json. (The names also seed their SFT minibatches, `sft-{role}`: renaming one changes worlds.)
TEACHER = "teacher"
STUDENT_INIT = "student_init"

def load_pretrained(spec: str, cfg: RunConfig, device) -> LM:
    """A pretrained 'hf:<name or path>' model in the configured dtype (models.dtype)."""
    dtype = None if cfg.models.dtype == "auto" else getattr(torch, cfg.models.dtype)
    return LM.load(spec[len("hf:"):], device=device, dtype=dtype)


def new_model(spec: ArchConfig | str, cfg: RunConfig, vocab_size: int, max_len: int, seed: int, device,
              tokenizer=None) -> LM:
    """A fresh model from an architecture (seeded init) or a pretrained one ('hf:<name or path>').
    A model built from an architecture gets the oracle's tokenizer (task worlds decode its outputs)."""
    if isinstance(spec, str):
        return load_pretrained(spec, cfg, device)
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_heads=spec.num_heads, intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=max(64, max_len),
        # a synthetic world's EOS goes into the models' configs too, so that a saved student ends where it learned to
        eos_token_id=cfg.world.synthetic.eos_token_id if cfg.world.oracle == "synthetic" else None,
    )
    torch.manual_seed(seed)
    return LM(LlamaForCausalLM(config).to(device), tokenizer)


SEED_OFFSET = {TEACHER: 1, STUDENT_INIT: 2}  # each model's init seed is world.seed + its offset


def base_model(who: str, cfg: RunConfig, vocab_size: int, device, tokenizer=None) -> LM:
    """The model stage 1 starts `who` from, before its SFT: the seeded init of its architecture, or its pretrained
    checkpoint. Stage 1 trains it; Delta-KD (loss.target: delta) rebuilds the teacher's in stage 2."""
    w = cfg.world
    arch = cfg.models.teacher if who == TEACHER else cfg.models.student
    return new_model(arch, cfg, vocab_size, w.max_prompt_tokens + w.max_response_tokens, w.seed + SEED_OFFSET[who],
                     device, tokenizer)


def train_models(cfg: RunConfig, oracle: LM, ids, mask, device, log, dist: Distributed,
                 out_dir: Path | None) -> dict:
    """Train the teacher and the student init on oracle samples for the stage-1 prompts `ids`/`mask`,
    save each under `out_dir` (rank 0; None on the other ranks) and return what world.json records of
    them (`teacher_error`, `teacher`, `student_init`)."""
    w = cfg.world
    info: dict = {}
    n = max(cfg.stage1.teacher.num_samples, cfg.stage1.student.num_samples)
    r_ids, r_mask = oracle_samples(oracle, ids[:n], mask[:n], w.max_response_tokens, w.seed,
                                   batch_size=cfg.generation_batch_size)
    for who, budget in ((TEACHER, cfg.stage1.teacher), (STUDENT_INIT, cfg.stage1.student)):
        lm = base_model(who, cfg, oracle.vocab_size, device, oracle.tokenizer)
        if cfg.models.dropout is not None:
            set_dropout(lm.hf, cfg.models.dropout)
        check_vocab_compatible(oracle, lm, ("oracle", who))
        k = budget.num_samples
        y_ids, y_mask = r_ids[:k], r_mask[:k]
        if who == TEACHER:
            y_ids, y_mask = _with_teacher_error(oracle, ids[:k], mask[:k], y_ids, y_mask, cfg)
            info["teacher_error"] = {**cfg.stage1.teacher_error.model_dump(),
                                     "subset_first_tokens": cfg.stage1.teacher_error.subset_size(oracle.vocab_size),
                                     "subset_share_of_sft": float(error_subset(ids[:k], oracle.vocab_size, cfg)
                                                                  .float().mean())}
        losses = sft(lm, ids[:k], mask[:k], y_ids, y_mask, budget, w.seed, who, dist,
                     bf16=cfg.precision == "bf16")
        gathered = dist.full_weights(lm.hf)  # FSDP: every rank takes part in the gather; else None
        if out_dir is not None:
            lm.save(out_dir / who) if gathered is None else lm.hf.save_pretrained(out_dir / who, state_dict=gathered)
        info[who] = {"sft_final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1) if losses else None,
                     "num_parameters": sum(p.numel() for p in lm.hf.parameters())}
        log(f"[stage 1] {who}: {budget.steps} SFT steps on {k} oracle samples, "
            f"final loss {info[who]['sft_final_loss'] or float('nan'):.3f} nats/token")
    return info


def oracle_samples(oracle: LM, ids, mask, max_new_tokens: int, seed: int, batch_size: int = 512):
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
