"""kdlab.metrics: sequence-level divergences with standard errors and the reference cache.

- :class:`DivergenceEstimate` (mean, se, per_token, per_token_se, n);
- :class:`ReferenceCache`: reference samples on eval prompts + per-position log-probs, built once;
- :func:`sequence_fkl` (on a cache), :func:`sequence_rkl` (fresh student samples);
- :func:`sequence_kl_sums`: per-sequence KL sums on any (prompt, response) pairs.
"""

from kdlab.metrics.cache import ReferenceCache, sequence_fkl, sequence_fkl_sums
from kdlab.metrics.divergence import DivergenceEstimate, sample_responses, sequence_kl_sums, sequence_rkl

__all__ = ["DivergenceEstimate", "ReferenceCache", "sample_responses", "sequence_fkl", "sequence_fkl_sums", "sequence_kl_sums", "sequence_rkl"]
