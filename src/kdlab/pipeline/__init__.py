"""kdlab.pipeline: the world, stage 1, stage 2, evaluation, run directories, studies."""

# kdlab draws its own progress (one bar per stage, or one per study); the per-file bars of
# transformers' weight loading and datasets' saving would bury it.
from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()

import datasets as _datasets  # noqa: E402

_datasets.disable_progress_bars()
