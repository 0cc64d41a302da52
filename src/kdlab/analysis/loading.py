"""Reading metrics logs: the names the analysis has always used, served by `kdlab.record`.

`kdlab.record` owns the run record (file names, columns, writer, reader); this module keeps the
analysis package's historical names (`load_metrics`, `load_per_prompt`) pointing at that one reader.
"""

from __future__ import annotations

from kdlab.record import PER_PROMPT as PER_PROMPT_DIR
from kdlab.record import Metrics, MetricsError
from kdlab.record import read_metrics as load_metrics
from kdlab.record import read_per_prompt as load_per_prompt

__all__ = ["PER_PROMPT_DIR", "Metrics", "MetricsError", "load_metrics", "load_per_prompt"]
