"""The drift panel (issue 21): what the failure modes of on-policy distillation look like without an oracle.

At each evaluation, on the held-out prompts, with SEs over prompts (one sequence per prompt and side):

    length_student / length_teacher        mean response length of student and teacher samples (tokens)
    no_eos_student / no_eos_teacher        fraction of samples that reach the length limit without EOS
                                           (None when the world has no EOS)
    eos_mass_student / eos_mass_teacher    mean P(EOS | prefix) over the teacher's sampled positions, and
    eos_mass_gap_max                       the largest |student − teacher| gap at any one position (averaged
                                           over prompts): a student whose EOS differs from the teacher's
                                           never puts mass there
    entropy_student / entropy_teacher /    mean per-token entropy (nats) along the teacher's samples
    entropy_oracle
    repetition_student / _teacher          fraction of repeated n-grams within a sample (n = `ngram`)
    topk_overlap                           |top-k(student) ∩ top-k(teacher)| / k along the teacher's samples
    exposure_gap                           per-token KL(S ‖ T) on the student's own samples minus per-token
                                           KL(T ‖ S) on the teacher's (reverse KL on student prefixes against
                                           forward KL on teacher prefixes): grows when the student drifts to
                                           prefixes the teacher never visits

The teacher's samples are drawn once (seeded); the student's are redrawn at each call with the same seed
(common random numbers between evaluations). Column names are the record's (kdlab.record.DRIFT_COLUMNS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdlab import record
from kdlab.models import LM
from kdlab.models.sampling import sample
from kdlab.seeding import generator_for


def _mean_se(x_N: Tensor) -> tuple[float, float]:
    x = x_N.double()
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    se = x.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return x.mean().item(), se


def _lengths(mask_BxR: Tensor) -> Tensor:
    return mask_BxR.sum(dim=1).double()


def _reached_limit_without_eos(ids_BxR: Tensor, mask_BxR: Tensor, eos: tuple[int, ...]) -> Tensor:
    """1 for a row whose last position is a real token that is not an EOS (it ran out of length)."""
    last = mask_BxR.shape[1] - 1
    ended_full = mask_BxR[:, last].bool()
    last_is_eos = torch.isin(ids_BxR[:, last], torch.tensor(eos, device=ids_BxR.device))
    return (ended_full & ~last_is_eos).double()


def repetition_rate(ids_BxR: Tensor, mask_BxR: Tensor, n: int = 2) -> Tensor:
    """Per row: 1 − distinct n-grams / n-grams among the row's real tokens (0 for rows shorter than n + 1)."""
    out = torch.zeros(ids_BxR.shape[0], dtype=torch.float64)
    for i, (ids, m) in enumerate(zip(ids_BxR.tolist(), mask_BxR.bool().tolist())):
        toks = [t for t, keep in zip(ids, m) if keep]
        grams = [tuple(toks[j:j + n]) for j in range(len(toks) - n + 1)]
        if len(grams) > 1:
            out[i] = 1.0 - len(set(grams)) / len(grams)
    return out


@dataclass
class DriftPanel:
    """The drift panel of a student against `teacher` (and `oracle`) on fixed prompts; call it with a student."""

    teacher: LM
    prompt_ids_NxP: Tensor
    prompt_mask_NxP: Tensor
    max_new_tokens: int
    oracle: LM | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    seed: int = 0
    batch_size: int = 64
    topk: int = 8
    ngram: int = 2
    memory_mb: int = 256  # the largest B×R×V float64 block of log-probs held at once (per model)
    _teacher_samples: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def eos(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else ((e,) if isinstance(e, int) else tuple(e))

    def _sample(self, lm: LM, stream: str) -> tuple[Tensor, Tensor]:
        ids, masks = [], []
        gen = generator_for(self.seed, "drift", stream)
        for i in range(0, len(self.prompt_ids_NxP), self.batch_size):
            # `self.eos or None`: an empty tuple means no EOS, but (0,) is EOS id 0 (not falsy as the int 0 would be)
            s = sample(lm, self.prompt_ids_NxP[i:i + self.batch_size], self.prompt_mask_NxP[i:i + self.batch_size],
                       max_new_tokens=self.max_new_tokens, eos_token_id=self.eos or None, generator=gen)
            ids.append(s.response_ids_BxR.cpu())
            masks.append(s.response_mask_BxR.cpu())
        return torch.cat(ids), torch.cat(masks)

    def _log_probs(self, lm: LM, ids_NxR: Tensor, mask_NxR: Tensor):
        """Batches of (rows, float64 log-probs B×R×V) of `lm` along the given responses; B is at most batch_size
        and small enough that one B×R×V float64 tensor stays within `memory_mb` (real vocabularies)."""
        per_row = ids_NxR.shape[1] * lm.vocab_size * 8
        rows = max(1, min(self.batch_size, (self.memory_mb << 20) // max(per_row, 1)))
        for i in range(0, len(ids_NxR), rows):
            sl = slice(i, i + rows)
            z = lm.response_logits(self.prompt_ids_NxP[sl].to(lm.device), self.prompt_mask_NxP[sl].to(lm.device),
                                   ids_NxR[sl].to(lm.device), mask_NxR[sl].to(lm.device))
            yield sl, torch.log_softmax(z.double().cpu(), dim=-1)

    @torch.no_grad()
    def __call__(self, student: LM) -> dict:
        if self._teacher_samples is None:
            self._teacher_samples = self._sample(self.teacher, "teacher")
        t_ids, t_mask = self._teacher_samples
        s_ids, s_mask = self._sample(student, "student")
        N = len(t_ids)
        per = {k: torch.zeros(N, dtype=torch.float64) for k in
               ("ent_s", "ent_t", "ent_o", "overlap", "eos_s", "eos_t", "fkl", "rkl")}
        eos_pos_s = torch.zeros(N, t_ids.shape[1], dtype=torch.float64)
        eos_pos_t = torch.zeros_like(eos_pos_s)
        k = None
        oracle_iter = self._log_probs(self.oracle, t_ids, t_mask) if self.oracle is not None else None
        for (sl, lt), (_, ls) in zip(self._log_probs(self.teacher, t_ids, t_mask),
                                     self._log_probs(student, t_ids, t_mask)):
            m = t_mask[sl].double()
            n_tok = m.sum(1).clamp_min(1)
            pt, ps = lt.exp(), ls.exp()
            per["ent_t"][sl] = (-(pt * lt.masked_fill(pt == 0, 0)).sum(-1) * m).sum(1) / n_tok
            per["ent_s"][sl] = (-(ps * ls.masked_fill(ps == 0, 0)).sum(-1) * m).sum(1) / n_tok
            kl_ts = (pt * (lt - ls).masked_fill(pt == 0, 0)).sum(-1)
            per["fkl"][sl] = (kl_ts * m).sum(1) / n_tok
            k = min(self.topk, lt.shape[-1])
            top_t, top_s = lt.topk(k, dim=-1).indices, ls.topk(k, dim=-1).indices
            inter = (top_t.unsqueeze(-1) == top_s.unsqueeze(-2)).any(-1).sum(-1).double() / k
            per["overlap"][sl] = (inter * m).sum(1) / n_tok
            if self.eos:
                e = list(self.eos)
                ms, mt = ps[..., e].sum(-1), pt[..., e].sum(-1)
                eos_pos_s[sl], eos_pos_t[sl] = ms * m, mt * m
                per["eos_s"][sl], per["eos_t"][sl] = (ms * m).sum(1) / n_tok, (mt * m).sum(1) / n_tok
            if oracle_iter is not None:
                _, lo = next(oracle_iter)
                po = lo.exp()
                per["ent_o"][sl] = (-(po * lo.masked_fill(po == 0, 0)).sum(-1) * m).sum(1) / n_tok
        for (sl, lt), (_, ls) in zip(self._log_probs(self.teacher, s_ids, s_mask),
                                     self._log_probs(student, s_ids, s_mask)):
            m = s_mask[sl].double()
            ps = ls.exp()
            kl_st = (ps * (ls - lt).masked_fill(ps == 0, 0)).sum(-1)
            per["rkl"][sl] = (kl_st * m).sum(1) / m.sum(1).clamp_min(1)
        row: dict = {}

        def put(name: str, values: Tensor) -> None:
            row[name], row[record.se_column(name)] = _mean_se(values)

        put(record.LENGTH_STUDENT, _lengths(s_mask))
        put(record.LENGTH_TEACHER, _lengths(t_mask))
        put(record.ENTROPY_STUDENT, per["ent_s"])
        put(record.ENTROPY_TEACHER, per["ent_t"])
        if self.oracle is not None:
            put(record.ENTROPY_ORACLE, per["ent_o"])
        put(record.REPETITION_STUDENT, repetition_rate(s_ids, s_mask, self.ngram))
        put(record.REPETITION_TEACHER, repetition_rate(t_ids, t_mask, self.ngram))
        put(record.TOPK_OVERLAP, per["overlap"])
        put(record.EXPOSURE_GAP, per["rkl"] - per["fkl"])  # paired by prompt
        if self.eos:
            put(record.NO_EOS_STUDENT, _reached_limit_without_eos(s_ids, s_mask, self.eos))
            put(record.NO_EOS_TEACHER, _reached_limit_without_eos(t_ids, t_mask, self.eos))
            put(record.EOS_MASS_STUDENT, per["eos_s"])
            put(record.EOS_MASS_TEACHER, per["eos_t"])
            counted = t_mask.double().sum(0).clamp_min(1)
            gap = (eos_pos_s.sum(0) - eos_pos_t.sum(0)).abs() / counted
            row[record.EOS_MASS_GAP_MAX] = gap.max().item()
        return row
