"""The one evaluation probe: a metrics row from reference caches, shared by the pipeline and the monitor.

`kdlab.pipeline.evaluate.Evaluator` (kdlab's own runs) and `kdlab.integrations.TeacherHackingMonitor`
(any trainer) both measure, at the same log-spaced steps, for each reference A (the teacher for the
proxy, the oracle for the golden metric, the teacher on training prompts for the train proxy):

    <name>_fkl = E_x E_{y~A} Σ_t KL(A_t ‖ S_t)  with  _se, _per_token, _per_token_se  and  _storage

where ``_storage`` says how A's distributions were held (``ReferenceCache.label``: full, hidden, live, or
'top-K lower bound'), so that no number in the record is a silent approximation. The column names
are the record's (:mod:`kdlab.record`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdlab import record
from kdlab.metrics.cache import ReferenceCache, sequence_fkl_sums
from kdlab.metrics.divergence import DivergenceEstimate
from kdlab.models import LM

__all__ = ["EvalProbe", "Reference", "log_spaced_steps"]


def log_spaced_steps(total_steps: int, num_points: int) -> list[int]:
    """0, then ``num_points`` log-spaced steps in [1, total], always including the last step."""
    pts = np.unique(np.round(np.geomspace(1, max(total_steps, 1), num_points)).astype(int))
    return sorted({0, *pts.tolist(), total_steps})


@dataclass(frozen=True)
class Reference:
    """A reference to measure against: ``name`` prefixes its columns (``proxy`` -> ``proxy_fkl``, ...).

    ``lm`` runs live on the cached samples when the cache stores no distributions (storage 'none').
    """

    name: str
    cache: ReferenceCache
    lm: LM | None = None


class EvalProbe:
    """Measure a student against each reference; one row per call (see the module docstring)."""

    def __init__(self, references: list[Reference], *, batch_size: int = 64):
        self.references = [r for r in references if r.cache is not None]
        self.batch_size = batch_size

    @property
    def storage(self) -> dict[str, str]:
        """How each reference's distributions are held, by column: ``{"proxy_fkl": "hidden", ...}``."""
        return {f"{r.name}_fkl": r.cache.label for r in self.references}

    @torch.no_grad()
    def __call__(self, student: LM) -> tuple[dict, dict[str, Tensor]]:
        """``(row, per_prompt)``: the metric columns, and each metric's per-prompt mean of the per-sequence
        sums (the same prompts at every step, for paired differences between steps)."""
        row: dict = {}
        per_prompt: dict[str, Tensor] = {}
        for ref in self.references:
            cache, col = ref.cache, f"{ref.name}_fkl"
            sums, counts = sequence_fkl_sums(student, cache, reference_lm=ref.lm, batch_size=self.batch_size)
            est = DivergenceEstimate.from_sums(sums, counts, cache.samples_per_prompt)
            row.update(est.to_dict(col))
            row.pop(f"{col}_n")
            row[record.storage_column(col)] = cache.label
            per_prompt[col] = sums.double().view(-1, cache.samples_per_prompt).mean(1).contiguous()
        return row, per_prompt
