"""The run record: what a run directory holds, how it is written, and how any metrics log is read.

This module is the one owner of the record (STYLE 13). It imports neither torch nor the pipeline, so
a report can be written wherever the record can be copied.

* **File names** of a run directory (`CONFIG`, `METRICS`, `SUMMARY`, ...) and of the logs other tools
  write (`MONITOR_METRICS`, `TRAINER_STATE`, TensorBoard event files).
* **Metric columns**, each declared once (`COLUMNS`): its name, the name of its standard-error column,
  its direction (lower or higher is better) and what it means.
* **One atomic writer** (`write_text`, `write_json`, `temp_dir`): a temporary file (or directory) in
  the destination's directory, renamed into place, so a reader never sees half a file. Files and
  directories get the modes an ordinary `open` / `mkdir` gives under the process's umask
  (`tempfile.mkstemp` / `mkdtemp` create 0600 / 0700, which locked colleagues out of reports).
* **One tolerant reader** (`read_metrics`): a kdlab run directory or its metrics.jsonl, a
  `TeacherHackingMonitor` output directory or its JSONL, a transformers `trainer_state.json`
  (`log_history`), TensorBoard event files, or a CSV/TSV table with a step column. Every problem is a
  `MetricsError` naming the file (and line), never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# File names of a run directory (DESIGN.md, "Run directory")

CONFIG = "config.yaml"  # the resolved config (kdlab.config.dump_config)
METRICS = "metrics.jsonl"  # one JSON object per evaluation: the source of truth
SUMMARY = "summary.json"  # the detectors' verdicts (kdlab report)
REPORT = "report.html"  # the self-contained report page
PLOTS = "plots"  # figures of the report
RUNS_CSV = "runs.csv"  # the report's verdicts, one flat row per run (kdlab.report.flat)
EVALS_CSV = "evals.csv"  # the report's evaluations, one row per evaluation of every run
WORLD = "world.json"  # the world's description and the teacher's golden divergence
DONE = "done.json"  # written last: the run finished
CHECKPOINTS = "checkpoints"  # step-N/ directories and the `latest` pointer
LATEST = "latest"
PER_PROMPT = "per_prompt"  # step-N.safetensors: per-prompt values of each evaluation (paired SEs)
OFFLINE_DATA = "offline_data"  # the offline regime's dataset of teacher samples
EVAL_TRAIN_REFERENCE = "eval_train_reference"  # reference samples on the run's training prompts
TENSORBOARD = "tensorboard"  # the TensorBoard mirror of metrics.jsonl
CACHE = ".kdlab-cache"  # stage-1 worlds and evaluation references, keyed by config hash
CONTROLLER_LOG = "controller.jsonl"  # one JSON object per action of the stage-2 controller (ACTION_FIELDS)
CONTROLLER_DIR = "controller"  # the controller's data: each action's new sequences, weight snapshots ('stop')

# Logs written by other tools that the reader understands.
MONITOR_METRICS = "teacher_hacking_monitor.jsonl"  # kdlab.integrations.monitor, in the trainer's output_dir
TRAINER_STATE = "trainer_state.json"  # transformers.Trainer: {"log_history": [...]}
TFEVENTS_GLOB = "events.out.tfevents.*"


def per_prompt_file(step: int) -> str:
    return f"step-{int(step):08d}.safetensors"


def checkpoint_dir(step: int) -> str:
    return f"step-{int(step):08d}"


def action_dir(index: int) -> str:
    """controller/action-N: the sequences the controller's N-th action (0-based) put into the offline dataset."""
    return f"action-{int(index):03d}"


def snapshot_file(step: int) -> str:
    """controller/snapshot-step-N.safetensors: the student's weights at the evaluation of step N ('stop')."""
    return f"snapshot-step-{int(step):08d}.safetensors"


SNAPSHOT_GLOB = "snapshot-step-*.safetensors"


# ---------------------------------------------------------------------------------------------
# Metric columns


@dataclass(frozen=True)
class Column:
    """One metric column of metrics.jsonl."""

    name: str
    meaning: str
    direction: str | None = None  # "lower" or "higher" is better; None for bookkeeping columns
    se: str | None = None  # the column holding its standard error, if any
    unit: str = ""


def _divergence(name: str, meaning: str, unit: str = "nats per response") -> Column:
    return Column(name, meaning, "lower", f"{name}_se", unit)


COLUMNS: tuple[Column, ...] = (
    Column("step", "optimizer steps taken when the evaluation ran"),
    Column("tokens", "response tokens trained on so far", unit="tokens"),
    Column("epochs", "passes over the offline dataset so far (offline regime only)"),
    Column("regime", "the data regime of stage 2"),
    Column("condition", "the run's condition name (config `name`)"),
    Column("seed", "the run's seed (config `seed`)"),
    Column("train_loss", "mean training loss since the previous evaluation", "lower", None, "nats per token"),
    _divergence("proxy_fkl", "sequence forward KL(teacher || student) on held-out prompts: the proxy"),
    _divergence("golden_fkl", "sequence forward KL(oracle || student) on held-out prompts: the golden metric"),
    _divergence("proxy_fkl_per_token", "proxy_fkl divided by the response tokens", "nats per token"),
    _divergence("golden_fkl_per_token", "golden_fkl divided by the response tokens", "nats per token"),
    _divergence("proxy_rkl", "sequence reverse KL(student || teacher) on held-out prompts"),
    _divergence("golden_rkl", "sequence reverse KL(student || oracle) on held-out prompts"),
    _divergence("train_proxy_fkl", "proxy_fkl on training prompts (a generalisation-gap check)"),
    _divergence("train_proxy_fkl_per_token", "train_proxy_fkl divided by the response tokens", "nats per token"),
    Column("proxy_fkl_storage", "how the teacher's distributions behind proxy_fkl were held: full, hidden "
           "(hidden states + head) or live (all exact), or 'top-K lower bound'"),
    Column("golden_fkl_storage", "the same for golden_fkl (the oracle's distributions)"),
    Column("train_proxy_fkl_storage", "the same for train_proxy_fkl"),
    Column("taid_t", "TAID's interpolation t at this step"),
    _divergence("teacher_golden_fkl", "sequence forward KL(oracle || teacher): the teacher's own golden, the "
                "floor a student converging to it reaches (kdlab.analysis.attribution)"),
    Column("lr", "learning rate of the last optimizer step"),
    Column("lr_sum", "cumulative learning rate over the steps so far (the sequential detector's time)"),
    Column("grad_cos_fresh", "cosine of the training-batch gradient with a gradient on fresh prompts and fresh "
           "teacher samples (eval.grad_alignment)", "higher"),
    Column("grad_cos_golden", "cosine of the training-batch gradient with a gradient on fresh oracle samples "
           "(eval.grad_alignment)", "higher"),
    # the drift panel (eval.drift; kdlab.metrics.drift): oracle-free signs of on-policy failure modes
    *(Column(name, meaning, None, f"{name}_se", unit) for name, meaning, unit in (
        ("length_student", "mean length of student samples on held-out prompts", "tokens"),
        ("length_teacher", "mean length of teacher samples on held-out prompts", "tokens"),
        ("no_eos_student", "fraction of student samples that reach the length limit without EOS", ""),
        ("no_eos_teacher", "fraction of teacher samples that reach the length limit without EOS", ""),
        ("eos_mass_student", "mean student probability of EOS along the teacher's samples", ""),
        ("eos_mass_teacher", "mean teacher probability of EOS along its own samples", ""),
        ("entropy_student", "mean per-token entropy of the student along the teacher's samples", "nats per token"),
        ("entropy_teacher", "mean per-token entropy of the teacher along its samples", "nats per token"),
        ("entropy_oracle", "mean per-token entropy of the oracle along the teacher's samples", "nats per token"),
        ("repetition_student", "fraction of repeated n-grams within a student sample", ""),
        ("repetition_teacher", "fraction of repeated n-grams within a teacher sample", ""),
        ("topk_overlap", "share of the teacher's top-k tokens among the student's top-k, along teacher samples", ""),
        ("exposure_gap", "per-token KL(student || teacher) on student samples minus per-token KL(teacher || "
         "student) on teacher samples", "nats per token"))),
    Column("eos_mass_gap_max", "largest gap between student and teacher EOS probability at one position"),
    Column("controller_actions", "actions the stage-2 controller took before this evaluation (stage2.controller)"),
    Column("controller_teacher_samples", "extra teacher samples (sequences) the controller drew before this "
           "evaluation", unit="sequences"),
)
COLUMN: dict[str, Column] = {c.name: c for c in COLUMNS}

STEP = COLUMN["step"].name
TOKENS = COLUMN["tokens"].name
EPOCHS = COLUMN["epochs"].name
REGIME = COLUMN["regime"].name
CONDITION = COLUMN["condition"].name
SEED = COLUMN["seed"].name
TAID_T = COLUMN["taid_t"].name
PROXY = COLUMN["proxy_fkl"].name
GOLDEN = COLUMN["golden_fkl"].name
TRAIN_LOSS = COLUMN["train_loss"].name
TEACHER_GOLDEN = COLUMN["teacher_golden_fkl"].name
LR = COLUMN["lr"].name
LR_SUM = COLUMN["lr_sum"].name
LENGTH_STUDENT, LENGTH_TEACHER = COLUMN["length_student"].name, COLUMN["length_teacher"].name
NO_EOS_STUDENT, NO_EOS_TEACHER = COLUMN["no_eos_student"].name, COLUMN["no_eos_teacher"].name
EOS_MASS_STUDENT, EOS_MASS_TEACHER = COLUMN["eos_mass_student"].name, COLUMN["eos_mass_teacher"].name
EOS_MASS_GAP_MAX = COLUMN["eos_mass_gap_max"].name
ENTROPY_STUDENT, ENTROPY_TEACHER = COLUMN["entropy_student"].name, COLUMN["entropy_teacher"].name
ENTROPY_ORACLE = COLUMN["entropy_oracle"].name
REPETITION_STUDENT, REPETITION_TEACHER = COLUMN["repetition_student"].name, COLUMN["repetition_teacher"].name
TOPK_OVERLAP = COLUMN["topk_overlap"].name
EXPOSURE_GAP = COLUMN["exposure_gap"].name
CONTROLLER_ACTIONS = COLUMN["controller_actions"].name
CONTROLLER_TEACHER_SAMPLES = COLUMN["controller_teacher_samples"].name
TRAIN_PREFIX = "train_"  # train_<col>: <col> measured on training prompts

# The fields of one action in controller.jsonl (kdlab.pipeline.controller writes them, the report reads them).
ACTION_FIELDS: tuple[Column, ...] = (
    Column("step", "the evaluation after which the action was taken (its effect starts at the next step)"),
    Column("policy", "what was done: refresh, diversify, mix or stop (kdlab.policies.POLICIES)"),
    Column("detector", "the detector that fired (kdlab.analysis.detectors.DETECTORS)"),
    Column("onset_step", "the onset the detector gave"),
    Column("reason", "the detector's reason"),
    Column("teacher_samples", "extra teacher samples (sequences) this action drew", unit="sequences"),
    Column("teacher_samples_total", "extra teacher samples drawn in the run so far, this action's included",
           unit="sequences"),
    Column("budget", "stage2.controller.extra_teacher_samples as resolved", unit="sequences"),
    Column("sampling_seconds", "seconds spent sampling the teacher (and its targets) for this action", unit="s"),
    Column("seconds", "seconds the whole action took (sampling, writing its data, restoring weights)", unit="s"),
    Column("replaced", "offline sequences replaced by this action", unit="sequences"),
    Column("new_prompts", "prompts of the stage-2 pool new to the dataset (diversify)"),
    Column("data", "the directory under controller/ holding the sequences this action wrote"),
    Column("lmbda", "the on-policy fraction from the next step on (mix)"),
    Column("restored_step", "the evaluation whose weights the run ends with (stop)"),
    Column("restored_proxy_fkl", "proxy_fkl measured at restored_step: the stopped run's final proxy (stop)"),
    Column("restored_golden_fkl", "golden_fkl measured at restored_step: the stopped run's final golden (stop)"),
)
ACTION: dict[str, Column] = {c.name: c for c in ACTION_FIELDS}


STORAGE_SUFFIX = "_storage"


def storage_column(name: str) -> str:
    """The column saying how the reference behind metric `name` was held (``proxy_fkl_storage``)."""
    return name + STORAGE_SUFFIX


def metric_storage(rows) -> dict[str, str]:
    """How each metric's reference was held, from its `<metric>_storage` column (the first row that says):
    ``{"proxy_fkl": "full", "golden_fkl": "top-256 lower bound"}``; empty for logs that do not say."""
    out: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith(STORAGE_SUFFIX) and isinstance(value, str):
                out.setdefault(key[: -len(STORAGE_SUFFIX)], value)
    return out


def lower_bounds(rows) -> dict[str, str]:
    """The metrics held as top-k (`metric_storage`): lower bounds of the full-vocabulary KL, which reports
    and `detect` say beside them."""
    return {col: label for col, label in metric_storage(rows).items() if label.startswith("top-")}


def se_column(name: str) -> str:
    """The standard-error column of `name`: the declared one, else `<name>_se` (other tools' logs)."""
    declared = COLUMN.get(name)
    return declared.se if declared is not None and declared.se else f"{name}_se"


# Names other tools give the step. The first one present is used, unless the caller names it.
STEP_ALIASES = ("step", "global_step", "_step", "trainer/global_step", "Step", "iteration", "iter")

# Prefixes other loggers put before kdlab's column names: the monitor logs through `trainer.log`
# as teacher_hacking/<col>, and TRL's trainers add train/ or eval/ in front of it.
_FOREIGN_PREFIX = re.compile(r"^(?:(?:train|eval)/)?teacher_hacking/")


# ---------------------------------------------------------------------------------------------
# The atomic writer


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no thread runs in between
    # that creates files in kdlab's use, and the value is the same afterwards).
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `mkdir` would give a new directory: 0777 minus the umask."""
    return 0o777 & ~_umask()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically: a temporary file beside it, fsync, rename. The file gets
    the ordinary mode for the umask. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class LockHeld(RuntimeError):
    """Another process holds the lock (`file_lock(..., wait=False)`)."""


@contextmanager
def file_lock(path: str | Path, *, wait: bool = True):
    """An exclusive lock on the file `path` for the `with` block (POSIX `flock`; the kernel releases it when
    the process dies, so a killed run never leaves it stuck). With `wait=False` raises `LockHeld` naming the
    holder's pid instead of waiting. A no-op where `fcntl` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockHeld(f"{path} is held by another process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new temporary directory in `parent` with the ordinary mode for the umask (not mkdtemp's
    0700), to be filled and then renamed into place with `os.replace`."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, dir_mode())
    return path


def normalise_modes(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything below it) the ordinary modes for the umask.
    Writers that create private files (safetensors' `save_file`: 0600; `mkdtemp`: 0700) are followed
    by this before their output is renamed into place."""
    path = Path(path)
    if path.is_dir():
        os.chmod(path, dir_mode())
        for below in path.rglob("*"):
            if not below.is_symlink():
                os.chmod(below, dir_mode() if below.is_dir() else file_mode())
    elif path.exists():
        os.chmod(path, file_mode())


def publish(tmp: str | Path, final: str | Path) -> Path:
    """Rename a finished temporary file or directory into place, with ordinary modes
    (`normalise_modes`). The rename is atomic: a reader sees the old or the new, never half."""
    normalise_modes(tmp)
    os.replace(tmp, final)
    return Path(final)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one evaluation to a JSONL metrics file (non-finite floats as null), durably."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(clean) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(saved_yaml: str, given_yaml: str, limit: int = 12) -> list[str]:
    """The fields in which two config.yaml texts differ, one "field: saved -> given" each (a field
    present in one only shows "(absent)"), at most `limit` and then a count of the rest."""
    import yaml

    saved = _flatten(yaml.safe_load(saved_yaml) or {})
    given = _flatten(yaml.safe_load(given_yaml) or {})
    lines = []
    for key in sorted(set(saved) | set(given)):
        a, b = saved.get(key, "(absent)"), given.get(key, "(absent)")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


# ---------------------------------------------------------------------------------------------
# The reader


class MetricsError(ValueError):
    """A metrics log that cannot be read; the message names the file and, when known, the line."""


def _where(path: Path, line: int | None) -> str:
    return f"{path}" if line is None else f"{path}, line {line}"


@dataclass
class Metrics:
    """One metrics table, sorted by step, one row per evaluation.

    `rows` keeps every value as read (strings such as `regime` included); `column(name)` gives a
    float array with NaN where a row lacks the value or holds null. `proxy_col` / `golden_col` name
    the columns the detectors use; their standard errors are `se_column(col)` when present.
    `source` says what kind of log it came from ("kdlab", "monitor", "trainer_state",
    "tensorboard", "csv", "tsv", "jsonl"); `run_dir` is the kdlab run directory it belongs to, if any.
    """

    path: Path
    rows: list[dict]
    lines: list[int]  # source line of each row (1-based; the CSV header is line 1; 0 when not line-based)
    proxy_col: str = PROXY
    golden_col: str = GOLDEN
    duplicates_dropped: int = 0
    source: str = "jsonl"
    step_col: str = STEP
    run_dir: Path | None = None
    nonfinite: dict = field(default_factory=dict)  # column -> steps whose value is NaN or ±Infinity (left out)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def steps(self) -> np.ndarray:
        return np.array([int(r[STEP]) for r in self.rows], dtype=np.int64)

    def has(self, name: str) -> bool:
        """True when at least one row holds a non-null value for `name`."""
        return bool(np.isfinite(self.column(name)).any()) if self._present(name) else False

    def _present(self, name: str) -> bool:
        return any(r.get(name) is not None for r in self.rows)

    def column(self, name: str) -> np.ndarray:
        """Float values of `name` (NaN where missing); a non-numeric value raises `MetricsError`."""
        if name not in self._cache:
            out = np.full(len(self.rows), np.nan)
            for i, (row, line) in enumerate(zip(self.rows, self.lines)):
                value = row.get(name)
                if value is None:
                    continue
                out[i] = _to_float(value, name, self.path, line or None)
            self._cache[name] = out
        return self._cache[name]

    def optional(self, name: str) -> np.ndarray | None:
        return self.column(name) if self.has(name) else None

    @property
    def proxy(self) -> np.ndarray:
        return self.column(self.proxy_col)

    @property
    def proxy_se(self) -> np.ndarray | None:
        return self.optional(se_column(self.proxy_col))

    @property
    def golden(self) -> np.ndarray | None:
        return self.optional(self.golden_col)

    @property
    def golden_se(self) -> np.ndarray | None:
        return self.optional(se_column(self.golden_col))

    def first(self, name: str):
        """The first non-null value of `name` (e.g. `regime`, `condition`), or None."""
        return next((r[name] for r in self.rows if r.get(name) is not None), None)


def _to_float(value, name: str, path: Path, line: int | None) -> float:
    # bool is an int subclass in Python; a boolean in a metric column is a bug upstream, not 0/1.
    if isinstance(value, bool):
        raise MetricsError(f"{_where(path, line)}: column '{name}' holds a boolean ({value!r}), expected a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in {"nan", "null", "none"}:
            return math.nan
        try:
            return float(text)
        except ValueError:
            pass
    raise MetricsError(f"{_where(path, line)}: column '{name}' holds {value!r}, expected a number")


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    all_lines = text.splitlines()
    for number, raw in enumerate(all_lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            last = number == len(all_lines)
            hint = " (truncated: the writer may have been killed mid-line)" if last else ""
            raise MetricsError(f"{_where(path, number)}: not valid JSON{hint}: {err.msg}") from None
        if not isinstance(row, dict):
            raise MetricsError(f"{_where(path, number)}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    return rows, lines


def _read_delimited(path: Path, text: str, delimiter: str) -> tuple[list[dict], list[int]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    if reader.fieldnames is None:
        raise MetricsError(f"{path}: empty {kind} file")
    rows, lines = [], []
    for row in reader:
        number = reader.line_num
        if None in row:  # more cells than header names: a shifted or garbled row
            raise MetricsError(f"{_where(path, number)}: more values than header columns")
        cleaned = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if any(v is None for v in cleaned.values()):  # fewer cells: DictReader fills None
            raise MetricsError(f"{_where(path, number)}: fewer values than header columns (truncated line?)")
        rows.append({k: (None if v == "" else v) for k, v in cleaned.items()})
        lines.append(number)
    return rows, lines


def _read_trainer_state(path: Path, text: str) -> tuple[list[dict], list[int]]:
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise MetricsError(f"{path}: no 'log_history' list (not a transformers trainer_state.json)")
    rows = [r for r in history if isinstance(r, dict)]
    return rows, [0] * len(rows)


def _read_tensorboard(path: Path) -> tuple[list[dict], list[int]]:
    """Scalars of the event files at `path` (a file or a directory of them), one row per step."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise MetricsError(f"{path}: reading TensorBoard event files needs the tensorboard package "
                           "(pip install 'kdlab[tensorboard]')") from None
    files = [path] if path.is_file() else sorted(path.glob(TFEVENTS_GLOB))
    by_step: dict[int, dict] = {}
    for f in files:
        acc = event_accumulator.EventAccumulator(str(f), size_guidance={event_accumulator.SCALARS: 0})
        try:
            acc.Reload()
        except Exception as err:  # a damaged event file: name it
            raise MetricsError(f"{f}: unreadable TensorBoard event file ({err})") from None
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                by_step.setdefault(int(event.step), {STEP: int(event.step)})[tag] = float(event.value)
    rows = [by_step[s] for s in sorted(by_step)]
    return rows, [0] * len(rows)


def _normalise_names(rows: list[dict]) -> list[dict]:
    """teacher_hacking/proxy_fkl (and train/… , eval/…) -> proxy_fkl, unless the row has that name."""
    out = []
    for row in rows:
        new = dict(row)
        for key in row:
            short = _FOREIGN_PREFIX.sub("", key) if isinstance(key, str) else key
            if short != key and short not in row:
                new[short] = new.pop(key)
        out.append(new)
    return out


def find_log(directory: str | Path) -> tuple[Path, str] | None:
    """The metrics log a directory holds, and its kind, or None. In order: kdlab's metrics.jsonl, the
    monitor's JSONL, trainer_state.json (in the directory, else in its latest checkpoint-N/),
    TensorBoard event files (in the directory, `tensorboard/`, or `runs/<name>/`)."""
    d = Path(directory)
    for name, kind in ((METRICS, "kdlab"), (MONITOR_METRICS, "monitor"), (TRAINER_STATE, "trainer_state")):
        if (d / name).is_file():
            return d / name, kind
    checkpoints = sorted(d.glob("checkpoint-*/" + TRAINER_STATE),
                         key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1)
    if checkpoints:
        return checkpoints[-1], "trainer_state"
    for candidate in (d, d / TENSORBOARD, *sorted((d / "runs").glob("*"))):
        if candidate.is_dir() and any(candidate.glob(TFEVENTS_GLOB)):
            return candidate, "tensorboard"
    return None


def _kind_of_file(path: Path, text: str | None) -> str:
    name, suffix = path.name, path.suffix.lower()
    if name.startswith("events.out.tfevents"):
        return "tensorboard"
    if name == TRAINER_STATE:
        return "trainer_state"
    if name == METRICS:
        return "kdlab"
    if name == MONITOR_METRICS:
        return "monitor"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        stripped = (text or "").lstrip()
        return "trainer_state" if stripped.startswith("{") and '"log_history"' in (text or "") else "jsonl"
    if suffix == ".tsv" or suffix == ".tab":
        return "tsv"
    if suffix == ".csv":
        return "csv"
    stripped = (text or "").lstrip()
    if stripped.startswith("{"):
        return "jsonl"
    first = stripped.splitlines()[0] if stripped else ""
    return "tsv" if "\t" in first and "," not in first else "csv"


def read_metrics(path: str | Path, proxy_col: str = PROXY, golden_col: str = GOLDEN,
                 step_col: str | None = None) -> Metrics:
    """Read a metrics log, whatever wrote it.

    `path` is a file (kdlab's metrics.jsonl, the monitor's JSONL, any JSONL, `trainer_state.json`,
    a TensorBoard event file, a CSV or TSV table) or a directory holding one (`find_log`).
    `step_col` names the step column; by default the first of `STEP_ALIASES` present.
    Names that the monitor's logging prefixes (`teacher_hacking/proxy_fkl`, `train/teacher_hacking/…`)
    are read as kdlab's own. Rows are sorted by step; in a JSONL log or a table, a step that appears
    twice keeps its last row (a run resumed after writing an evaluation but before its checkpoint);
    in trainer_state.json and TensorBoard logs the entries of one step are merged (the trainer logs
    its loss and the monitor its metrics at the same step as separate entries).

    Raises `MetricsError` (a `ValueError`) naming the file and line for: an unreadable or empty
    file, a malformed or half-written JSON line, a row without a step, a non-integer step, a
    non-numeric value in the proxy / golden columns or their SEs, or a missing proxy column.
    An absent golden column is not an error (a run without an oracle).
    """
    path = Path(path)
    run_dir = None
    if path.is_dir():
        found = find_log(path)
        if found is None:
            raise MetricsError(f"{path}: no metrics log in this directory (looked for {METRICS}, {MONITOR_METRICS}, "
                               f"{TRAINER_STATE}, checkpoint-*/{TRAINER_STATE} and TensorBoard event files)")
        path, kind = found
    elif not path.exists():
        raise MetricsError(f"{path}: cannot read (no such file or directory)")
    else:
        kind = None
    text = None
    if kind != "tensorboard" and not path.name.startswith("events.out.tfevents"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise MetricsError(f"{path}: cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise MetricsError(f"{path}: not a UTF-8 text file") from None
        if not text.strip():
            raise MetricsError(f"{path}: empty file, no evaluations")
    kind = kind or _kind_of_file(path, text)
    if kind in ("kdlab", "monitor", "jsonl"):
        rows, lines = _read_jsonl(path, text)
    elif kind in ("csv", "tsv"):
        rows, lines = _read_delimited(path, text, "\t" if kind == "tsv" else ",")
    elif kind == "trainer_state":
        rows, lines = _read_trainer_state(path, text)
    else:
        rows, lines = _read_tensorboard(path)
    if kind == "kdlab" and path.name == METRICS:
        run_dir = path.parent
    rows = _normalise_names(rows)
    if not rows:
        raise MetricsError(f"{path}: no evaluation rows")

    columns = list(dict.fromkeys(k for r in rows for k in r))
    if step_col is None:
        step_col = next((a for a in STEP_ALIASES if a in columns), None)
        if step_col is None:
            raise MetricsError(f"{_where(path, 1 if kind in ('csv', 'tsv') else None)}: no step column "
                               f"(looked for {', '.join(STEP_ALIASES)}; columns: {', '.join(map(str, columns[:20]))}); "
                               "name it with --step COL")
    elif step_col not in columns:
        raise MetricsError(f"{path}: no step column '{step_col}' (columns: {', '.join(map(str, columns[:20]))})")

    merge = kind in ("trainer_state", "tensorboard")
    by_step: dict[int, tuple[dict, int]] = {}
    for row, line in zip(rows, lines):
        where = line or None
        if row.get(step_col) is None:
            if merge:
                continue  # e.g. the trainer's end-of-training summary
            raise MetricsError(f"{_where(path, where)}: row has no '{step_col}' value")
        step = _to_float(row[step_col], step_col, path, where)
        if not math.isfinite(step) or step != int(step) or step < 0:
            raise MetricsError(f"{_where(path, where)}: step must be a non-negative integer, got {row[step_col]!r}")
        row = dict(row)
        row[STEP] = int(step)
        if merge and int(step) in by_step:
            previous, first_line = by_step[int(step)]
            row = {**previous, **row}
            line = first_line
        by_step[int(step)] = (row, line)
    if not by_step:
        raise MetricsError(f"{path}: no rows with a '{step_col}' value")
    ordered = [by_step[s] for s in sorted(by_step)]
    n_rows = sum(1 for r in rows if r.get(step_col) is not None)
    metrics = Metrics(
        path=path,
        rows=[r for r, _ in ordered],
        lines=[n for _, n in ordered],
        proxy_col=proxy_col,
        golden_col=golden_col,
        duplicates_dropped=0 if merge else n_rows - len(ordered),
        source=kind,
        step_col=step_col,
        run_dir=run_dir,
    )
    if not metrics._present(proxy_col):
        found_cols = sorted({str(k) for r in metrics.rows for k in r})
        raise MetricsError(f"{path}: no values in the proxy column '{proxy_col}' (columns: {', '.join(found_cols)})")
    # Touch the detector columns now so a bad value fails here, with its line, not inside a fit.
    for name in (proxy_col, se_column(proxy_col), golden_col, se_column(golden_col)):
        metrics.column(name)
    # NaN or Infinity where a value was given: counted and reported by the detectors' callers, never dropped
    # silently; a column with no finite value at all gives nothing to detect on.
    for name in (proxy_col, golden_col):
        given = np.array([r.get(name) is not None for r in metrics.rows])
        if not given.any():
            continue
        bad = given & ~np.isfinite(metrics.column(name))
        if bad[given].all():
            raise MetricsError(f"{path}: column '{name}' has no finite values ({int(bad.sum())} NaN or Infinity); "
                               "nothing to detect on (did the run diverge?)")
        if bad.any():
            metrics.nonfinite[name] = [int(s) for s in metrics.steps[bad]]
    return metrics


def read_per_prompt(run_dir: str | Path, steps, column: str) -> np.ndarray | None:
    """The per-prompt values of `column` at each of `steps` (an n_evals × k array), from the
    `per_prompt/step-N.safetensors` files a kdlab run writes, or None when any step lacks them
    (older runs, other tools' logs): the detectors then fall back to the per-evaluation SEs."""
    directory = Path(run_dir) / PER_PROMPT
    if not directory.is_dir():
        return None
    from safetensors import safe_open

    rows = []
    for step in steps:
        f = directory / per_prompt_file(step)
        if not f.exists():
            return None
        try:
            with safe_open(str(f), framework="numpy") as st:
                if column not in st.keys():
                    return None
                rows.append(st.get_tensor(column))
        except Exception as err:  # a damaged file: say which, then do without the pairing
            raise MetricsError(f"{f}: unreadable per-prompt values ({err}); delete {directory} to ignore them") from None
    if len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows).astype(float)


def read_actions(run_dir: str | Path) -> list[dict] | None:
    """The controller's actions of a run (controller.jsonl), in order; None when the run has no controller log.
    A half-written last line (a kill mid-append; the resumed run redoes that action) is dropped."""
    path = Path(run_dir) / CONTROLLER_LOG
    if not path.is_file():
        return None
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise MetricsError(f"{_where(path, number)}: not valid JSON") from None
    return rows


def is_run_dir(path: str | Path) -> bool:
    """A directory with a metrics log of its own (kdlab's or the monitor's)."""
    p = Path(path)
    return (p / METRICS).is_file() or (p / MONITOR_METRICS).is_file()


def find_runs(dirs) -> list[Path]:
    """Run directories among `dirs`: each is a run directory itself (kdlab's, a monitor output
    directory, or any directory with a log `find_log` knows), or a sweep directory whose run
    directories are found below it (any depth), sorted by path. Raises FileNotFoundError."""
    found: list[Path] = []
    for d in [Path(x) for x in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a directory")
        if is_run_dir(d):
            found.append(d)
            continue
        below = sorted({p.parent for name in (METRICS, MONITOR_METRICS) for p in d.rglob(name)})
        if not below:
            if find_log(d) is not None:
                found.append(d)
                continue
            raise FileNotFoundError(f"{d}: no {METRICS} (or {MONITOR_METRICS}, {TRAINER_STATE}, TensorBoard events) "
                                    "in it or below it (not a run or sweep directory)")
        found.extend(below)
    return list(dict.fromkeys(p.resolve() for p in found))


__all__ = [
    "ACTION", "ACTION_FIELDS", "CACHE", "CHECKPOINTS", "CONTROLLER_ACTIONS", "CONTROLLER_DIR", "CONTROLLER_LOG",
    "CONTROLLER_TEACHER_SAMPLES", "SNAPSHOT_GLOB", "action_dir", "read_actions", "snapshot_file", "COLUMN", "COLUMNS", "CONDITION", "CONFIG", "Column", "DONE", "EPOCHS", "EVAL_TRAIN_REFERENCE", "GOLDEN", "LATEST", "METRICS",
    "MONITOR_METRICS", "Metrics", "MetricsError", "OFFLINE_DATA", "PER_PROMPT", "PLOTS", "PROXY", "REGIME", "REPORT", "SEED", "TAID_T", "TOKENS",
    "STEP", "STEP_ALIASES", "SUMMARY", "TENSORBOARD", "TRAINER_STATE", "TRAIN_LOSS", "WORLD", "append_row",
    "checkpoint_dir", "config_differences", "dir_mode", "file_mode", "find_log", "find_runs", "is_run_dir", "normalise_modes", "per_prompt_file", "publish",
    "LockHeld", "file_lock", "lower_bounds", "metric_storage", "read_metrics", "read_per_prompt", "se_column", "storage_column", "temp_dir", "write_bytes", "write_json", "write_text",
]
