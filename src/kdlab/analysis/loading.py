"""Reading metrics files: kdlab's `metrics.jsonl`, or any JSONL / CSV table with a `step` column.

The detectors only need a few numeric columns, but a metrics file is written by a training job that
may be killed at any moment, edited by hand, or produced by another tool. So every problem is
reported as a `MetricsError` naming the file and the line, instead of a NaN surfacing three
functions later.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class MetricsError(ValueError):
    """A metrics file that cannot be read; the message names the file and, when known, the line."""


def _where(path: Path, line: int | None) -> str:
    return f"{path}" if line is None else f"{path}, line {line}"


@dataclass
class Metrics:
    """One metrics table, sorted by step, one row per evaluation.

    `rows` keeps every value as read (strings such as `regime` included); `column(name)` gives a
    float array with NaN where a row lacks the value or holds null. `proxy_col` / `golden_col` name
    the columns the detectors use; their standard errors are `<col>_se` when present.
    """

    path: Path
    rows: list[dict]
    lines: list[int]  # source line of each row (1-based; the CSV header is line 1)
    proxy_col: str = "proxy_fkl"
    golden_col: str = "golden_fkl"
    duplicates_dropped: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def steps(self) -> np.ndarray:
        return np.array([int(r["step"]) for r in self.rows], dtype=np.int64)

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
                out[i] = _to_float(value, name, self.path, line)
            self._cache[name] = out
        return self._cache[name]

    def optional(self, name: str) -> np.ndarray | None:
        return self.column(name) if self.has(name) else None

    @property
    def proxy(self) -> np.ndarray:
        return self.column(self.proxy_col)

    @property
    def proxy_se(self) -> np.ndarray | None:
        return self.optional(self.proxy_col + "_se")

    @property
    def golden(self) -> np.ndarray | None:
        return self.optional(self.golden_col)

    @property
    def golden_se(self) -> np.ndarray | None:
        return self.optional(self.golden_col + "_se")

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


def _read_csv(path: Path, text: str) -> tuple[list[dict], list[int]]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise MetricsError(f"{path}: empty CSV file")
    header = [h.strip() for h in reader.fieldnames]
    if "step" not in header:
        raise MetricsError(f"{_where(path, 1)}: no 'step' column in the CSV header {header}")
    rows, lines = [], []
    for row in reader:
        number = reader.line_num
        if None in row:  # more cells than header names: a shifted or garbled row
            raise MetricsError(f"{_where(path, number)}: more values than header columns")
        cleaned = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if any(v is None for v in cleaned.values()):  # fewer cells: DictReader fills None
            raise MetricsError(f"{_where(path, number)}: fewer values than header columns (truncated line?)")
        cleaned = {k: (None if v == "" else v) for k, v in cleaned.items()}
        rows.append(cleaned)
        lines.append(number)
    return rows, lines


def load_metrics(path: str | Path, proxy_col: str = "proxy_fkl", golden_col: str = "golden_fkl") -> Metrics:
    """Read a metrics table (kdlab's `metrics.jsonl`, another JSONL file, or a CSV with a header).

    The format is chosen by the extension (`.jsonl` / `.json` / `.ndjson` → JSONL, `.csv` → CSV;
    otherwise JSONL when the first non-blank character is `{`, else CSV). Rows are sorted by step; when a step
    appears twice (a run resumed after writing an evaluation but before its checkpoint) the last
    row wins, since it is the one the resumed trajectory continued from.

    Raises `MetricsError` (a `ValueError`) naming the file and line for: an unreadable or empty
    file, a malformed or half-written JSON line, a row without `step`, a non-integer step, a
    non-numeric value in the proxy / golden columns or their `_se`, or a missing proxy column.
    An absent golden column is not an error (a run without an oracle).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MetricsError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a UTF-8 text file") from None
    if not text.strip():
        raise MetricsError(f"{path}: empty file, no evaluations")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        is_csv = False
    else:
        is_csv = suffix == ".csv" or not text.lstrip().startswith("{")
    rows, lines = (_read_csv if is_csv else _read_jsonl)(path, text)
    if not rows:
        raise MetricsError(f"{path}: no evaluation rows")

    by_step: dict[int, tuple[dict, int]] = {}
    for row, line in zip(rows, lines):
        if row.get("step") is None:
            raise MetricsError(f"{_where(path, line)}: row has no 'step' value")
        step = _to_float(row["step"], "step", path, line)
        if not math.isfinite(step) or step != int(step) or step < 0:
            raise MetricsError(f"{_where(path, line)}: step must be a non-negative integer, got {row['step']!r}")
        row["step"] = int(step)
        by_step[int(step)] = (row, line)
    ordered = [by_step[s] for s in sorted(by_step)]
    metrics = Metrics(
        path=path,
        rows=[r for r, _ in ordered],
        lines=[n for _, n in ordered],
        proxy_col=proxy_col,
        golden_col=golden_col,
        duplicates_dropped=len(rows) - len(ordered),
    )
    if not metrics._present(proxy_col):
        found = sorted({k for r in metrics.rows for k in r})
        raise MetricsError(f"{path}: no values in the proxy column '{proxy_col}' (columns: {', '.join(found)})")
    # Touch the detector columns now so a bad value fails here, with its line, not inside a fit.
    for name in (proxy_col, proxy_col + "_se", golden_col, golden_col + "_se"):
        metrics.column(name)
    return metrics


PER_PROMPT_DIR = "per_prompt"


def load_per_prompt(run_dir: str | Path, steps, column: str) -> np.ndarray | None:
    """The per-prompt values of `column` at each of `steps` (an n_evals × k array), from the
    `per_prompt/step-N.safetensors` files a kdlab run writes, or None when any step lacks them
    (older runs, other tools' logs): the detectors then fall back to the per-evaluation SEs."""
    directory = Path(run_dir) / PER_PROMPT_DIR
    if not directory.is_dir():
        return None
    from safetensors import safe_open

    rows = []
    for step in steps:
        f = directory / f"step-{int(step):08d}.safetensors"
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
