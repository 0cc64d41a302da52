"""kdlab.models: the LM wrapper, tiny configs, the synthetic oracle, and sampling.

``kdlab.models.sampling.sample`` is also re-exported here as ``kdlab.models.sample``.
"""

from kdlab.models.lm import LM, CheckpointError, bf16_autocast, check_vocab_compatible, set_dropout
from kdlab.models.sampling import Samples, sample
from kdlab.models.synthetic import make_synthetic_oracle, mean_token_entropy, tiny_llama_config

__all__ = [
    "LM",
    "CheckpointError",
    "bf16_autocast",
    "check_vocab_compatible",
    "set_dropout",
    "tiny_llama_config",
    "make_synthetic_oracle",
    "mean_token_entropy",
    "Samples",
    "sample",
]
