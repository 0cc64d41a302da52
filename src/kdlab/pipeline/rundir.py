"""Run directory: atomic writes, metrics log, checkpoints (safetensors) and resume.

Layout (DESIGN.md): config.yaml, metrics.jsonl, summary.json, checkpoints/, report.html, plots/.
Every file is written to a temporary name and renamed into place, so a run killed at any moment
(kill -9 during a checkpoint write included) leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdlab import record


# The one atomic writer is kdlab.record's (ordinary file modes under the umask); these names stay
# for the pipeline's callers.
atomic_write_text = record.write_text
atomic_write_json = record.write_json


class RunDirectoryInUse(RuntimeError):
    """output_dir already holds a run, and it was not asked to resume."""


LOCK = ".kdlab-run.lock"  # held by the process running in the directory (rank 0 under accelerate)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path):
    """Hold the run directory's lock for the `with` block; another process holding it is refused with a
    message (not waited for). Under `accelerate launch` rank 0 holds it for every rank."""
    from kdlab.pipeline.distributed import launched_rank

    if launched_rank() != 0:
        yield
        return
    created = not run_dir.exists()
    try:
        with record.file_lock(run_dir / LOCK, wait=False):
            try:
                yield
            finally:
                if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
                    # nothing was written (the run stopped before its first file): leave no trace
                    (run_dir / LOCK).unlink(missing_ok=True)
                    run_dir.rmdir()
    except record.LockHeld as err:
        raise RunDirectoryInUse(f"another kdlab process is running in {run_dir} ({err}); wait for it to finish, "
                                "or choose another output_dir") from None


def prepare_run_dir(run_dir: Path, config_text: str, resume: bool, dist) -> None:
    """Guard the run directory, then write config.yaml (rank 0 of `dist`, a `Distributed`).

    A directory that already holds a run (config.yaml with metrics or a summary) is refused unless
    resuming; a resumed run must have the same config, and the error names the fields that differ."""
    config_path = run_dir / record.CONFIG
    if run_dir.exists() and config_path.exists() and not resume:
        if (run_dir / record.SUMMARY).exists() or (run_dir / record.METRICS).exists():
            raise RunDirectoryInUse(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and config_path.exists():
        saved = config_path.read_text()
        if saved != config_text and with_current_defaults(saved) != config_text:
            differences = record.config_differences(saved, config_text)
            raise ValueError(f"{config_path} differs from the config given in "
                             f"{len(differences)} field(s) (saved -> given):\n  " + "\n  ".join(differences)
                             + "\nresume with the same config, or choose another output_dir")
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if dist.is_main:
        atomic_write_text(config_path, config_text)


def with_current_defaults(saved_text: str) -> str:
    """A saved config.yaml as this version of kdlab writes it: fields added since the run started take their
    defaults, which reproduce the old behaviour (a new feature is off by default), so such a run still resumes.
    A saved config this version cannot read is returned as it was (the caller then reports the differences)."""
    import yaml

    from kdlab.config import RunConfig, dump_config

    try:
        return dump_config(RunConfig.model_validate(yaml.safe_load(saved_text)))
    except Exception:  # a renamed or removed field: the textual comparison names it
        return saved_text


def write_end_record(run_dir: Path, world_info: dict, done: dict) -> None:
    """world.json (the world's description and the teacher's golden), then done.json, written last."""
    atomic_write_json(run_dir / record.WORLD, world_info)
    atomic_write_json(run_dir / record.DONE, done)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / record.DONE).exists()


# ----------------------------------------------------------------------------------------------
# Metrics logging behind a small interface (STYLE 8): JSONL in the run directory is the source of truth.


class MetricLogger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per evaluation to metrics.jsonl (the source of truth)."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, row: dict[str, Any]) -> None:
        record.append_row(self.path, row)

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete rows of metrics.jsonl; a half-written last line (a kill mid-append) is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final append: the evaluation is redone on resume
            raise ValueError(f"{path}:{i + 1}: not valid JSON; the metrics file is corrupt") from None
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows with step <= last_step (the evaluations a resumed run will not redo)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain JSON (the rest)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        plain_state[str(pid)] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state[str(pid)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain_state}


def _optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state_dict (torch's layout: parameters by index) that `_optimizer_to_tensors` split."""
    state: dict[int, dict] = {int(pid): dict(v) for pid, v in meta["plain_state"].items()}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2, hf_config=None, tokenizer=None) -> Path:
    """Write checkpoints/step-N atomically (temp dir + rename), then point `latest` at it.

    `model` is a module or its whole-model state_dict. With `hf_config` (the model's transformers
    config) the directory also holds config.json (and the tokenizer's files when given), so a
    checkpoint loads with ``AutoModelForCausalLM.from_pretrained(checkpoints/step-N)``: the weights
    file is already named and keyed as transformers expects (model.safetensors, state_dict names,
    tied weights stored once)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / record.checkpoint_dir(step)
    tmp = record.temp_dir(ckpt_root, ".tmp-")
    # Tied weights (T5's shared embedding = lm_head) are one tensor under several names; safetensors
    # stores each storage once, so the other names are recorded as aliases and restored on load.
    weights, tied, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.device, v.data_ptr(), v.shape, v.stride())
        if v.numel() and key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        weights[k] = v.detach().cpu().contiguous()
    # metadata format=pt: transformers' loader checks it before reading a safetensors checkpoint.
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hf_config is not None:
        hf_config.save_pretrained(tmp)  # config.json with model_type and architectures
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "tied_weights": tied, **state})
    if final.exists():
        shutil.rmtree(final)
    record.publish(tmp, final)  # safetensors writes 0600 files: ordinary modes before the rename
    atomic_write_text(ckpt_root / record.LATEST, final.name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step-*") if p != final)[:-max(keep - 1, 0) or None]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / record.LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoints_newest_first(ckpt_root: Path) -> list[Path]:
    """The checkpoint `latest` names, then every other step-N directory, newest first (resume tries them in
    this order until one reads)."""
    latest = latest_checkpoint(ckpt_root)
    others = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir() and p != latest), reverse=True)
    return ([latest] if latest is not None else []) + others


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; returns the JSON state (step, schedule, ...)."""
    weights, optimizer_state, state = read_checkpoint(path)
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    return state


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """A checkpoint's whole-model weights, optimizer state_dict (torch's layout) and JSON state; a clear
    error naming what to delete when any part is unreadable (truncated)."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise RuntimeError(
            f"checkpoint {path} is unreadable ({err}); it may be truncated (resume falls back to an older "
            f"step-* directory when one is intact; otherwise delete {path} and start again)"
        ) from None
    for alias, name in state.pop("tied_weights", {}).items():
        weights[alias] = weights[name]
    return weights, _optimizer_state_from_tensors(opt_tensors, state.pop("optimizer")), state
