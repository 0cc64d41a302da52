"""Checks that run before any heavy work, so that a wrong path, device or output directory fails in about a
second with a message naming it, not after the stage-1 world is built (issue 19).

Each check raises `ConfigError` (which the verbs print as one line, exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from kdlab.config import ConfigError, RunConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """`path` can hold a run: not empty, not a file, and its first existing ancestor is a writable directory."""
    text = str(path)
    if not text.strip():
        raise ConfigError(f"{what} is empty (an unset shell variable?): name the directory the results go to")
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} = {text!r} is a file, not a directory: choose another path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what} = {text!r}: {probe} is a file, so no directory can be made under it; "
                          "choose another path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} = {text!r}: {probe} is not writable by this user; choose a directory you can write to")
    if probe.exists():  # permissions are not everything (a read-only or virtual file system; root passes access())
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            raise ConfigError(f"{what} = {text!r}: cannot write in {probe} ({err.strerror}); "
                              "choose a directory you can write to") from None
    return p


def model_path(spec: str, field: str) -> None:
    """An 'hf:' model that is a local directory must hold config.json and its weights."""
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        return
    name = spec[len("hf:"):]
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_local:
        return  # a hub name: checked when it is downloaded
    if not path.is_dir():
        raise ConfigError(f"{field} = {spec!r}: {path} is not a directory; give a save_pretrained directory or a hub name")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field} = {spec!r}: {path} has no config.json; is it a save_pretrained directory?")
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ConfigError(f"{field} = {spec!r}: {path} has config.json but no weights ({', '.join(WEIGHT_FILES[:3])}); "
                          "save the model with save_pretrained, or copy its weight files there")


def device(name: str) -> None:
    """A CUDA device only where torch sees one."""
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}, but torch sees no CUDA device on this machine "
                          f"(torch {torch.__version__}); set device: cpu (or auto)")
    index = name.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def run_config(cfg: RunConfig) -> None:
    """Everything a run needs that can be checked before it starts."""
    output_dir(cfg.output_dir)
    if cfg.cache_dir:
        output_dir(cfg.cache_dir, "cache_dir")
    model_path(cfg.world.oracle, "world.oracle")
    model_path(cfg.models.teacher, "models.teacher")
    model_path(cfg.models.student, "models.student")
    device(cfg.device)


def resume(cfg: RunConfig) -> None:
    """`--resume` continues a run: its directory must hold one (a typo must not start a fresh run)."""
    from kdlab import record

    run_dir = Path(cfg.output_dir)
    if not (run_dir / record.CONFIG).exists():
        raise ConfigError(f"--resume: {run_dir} holds no run (no {record.CONFIG}); check the path, or drop --resume "
                          "to start a new run there")
