"""Metric trackers behind one small interface (STYLE 8): `start(step)`, `log(row)`, `close()`.

`metrics.jsonl` in the run directory is always written and is the source of truth (the report and the
detectors read it). TensorBoard and Weights & Biases are optional mirrors, switched on in the config:

    trackers: {tensorboard: true, wandb: true, wandb_mode: offline}

TensorBoard writes event files under ``<run>/tensorboard``; W&B writes under ``<run>/wandb`` and, in
``offline`` mode (the default), needs no network or account (``wandb sync <run>/wandb/offline-run-*``
uploads later). Each numeric field of a row becomes a scalar at the row's ``step``; the rest (regime,
condition) goes to W&B's run config. A resumed run rewinds the mirrors to its checkpoint step, as
it truncates metrics.jsonl: TensorBoard through ``purge_step``, W&B by resuming the same run id.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from kdlab import record
from kdlab.config import RunConfig, dump_config
from kdlab.pipeline.rundir import JsonlLogger


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a row, except the step itself."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLogger:
    """Scalars to TensorBoard event files (``torch.utils.tensorboard``, needs the `tensorboard` package)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer = None

    def start(self, step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's module imports the tensorboard package
            raise ImportError("trackers.tensorboard=true needs the tensorboard package: "
                              "pip install 'kdlab[tensorboard]'") from err
        # purge_step: events at steps >= `step` left by a killed session are hidden, as metrics.jsonl
        # is truncated to the checkpoint on resume.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step if step > 0 else None)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """Rows to a Weights & Biases run; ``mode='offline'`` works without a network."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.run_dir, self.cfg = run_dir, cfg
        self.run = None

    def start(self, step: int) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError("trackers.wandb=true needs the wandb package: pip install 'kdlab[wandb]'") from err
        import yaml

        t = self.cfg.trackers
        # One W&B run per run directory, resumed with it: the id is a hash of the directory's path.
        run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=t.wandb_project, name=f"{self.cfg.name}-seed{self.cfg.seed}", id=run_id,
                              dir=str(self.run_dir), mode=t.wandb_mode, resume="allow",
                              config=yaml.safe_load(dump_config(self.cfg)))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MultiLogger:
    """metrics.jsonl first (the source of truth), then every configured mirror."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def start(self, step: int) -> None:
        for logger in self.loggers:
            if hasattr(logger, "start"):
                logger.start(step)

    def log(self, row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def make_logger(cfg: RunConfig, run_dir: Path) -> MultiLogger:
    loggers: list = [JsonlLogger(run_dir / record.METRICS)]
    if cfg.trackers.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / record.TENSORBOARD))
    if cfg.trackers.wandb:
        loggers.append(WandbLogger(run_dir, cfg))
    return MultiLogger(loggers)
