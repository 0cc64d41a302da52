"""The report's two CSV tables, for pandas, R or a spreadsheet (`write_report` writes them beside summary.json).

- `runs.csv` (`runs_table`): one row per run, the run's summary.json entry flattened (its `path` written as in
  evals.csv, so the two tables join on `path`): nested fields become
  dotted columns (`golden.rise`, `proxy_deviation.onset_step`, `alarms.length.detected`, `final.golden`), lists
  are JSON text, and the detectors' `config` blocks are left out (they are the report's thresholds, in
  summary.json once).
- `evals.csv` (`evals_table`): one row per evaluation of every run, the run's metrics log as read (every key of
  every row, nested values flattened the same way), after three columns naming the run: `run`, `path` (below the
  report's directory where it lies there) and `condition` (the report's label, as in summary.json). A key of the
  log that has one of those three names is kept as `log.<name>`.

Empty cells are missing values (JSON null or a key a row lacks). Floats are written with `repr`, so reading
them back gives the same numbers.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

__all__ = ["runs_table", "evals_table", "IDENTITY"]

IDENTITY = ("run", "path", "condition")  # the columns of evals.csv that say which run a row belongs to


def _flatten(obj: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, value in obj.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}.", skip))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv(rows: list[dict]) -> str:
    """CSV text of dict rows; the columns are every key, in the order they first appear."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(columns))
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def runs_table(run_summaries: list[dict], root: str | Path) -> str:
    """`runs.csv`: each run's summary (`RunAnalysis.summary()`) as one flat row; `path` as in evals.csv (the
    tables join on it)."""
    return _csv([_flatten({**s, "path": _relative(Path(s["path"]), Path(root))}, skip=("config",))
                 for s in run_summaries])


def _relative(path: Path, root: Path) -> str:
    """`path` below `root` ("." for root itself), else as given."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(path)


def evals_table(runs, root: str | Path) -> str:
    """`evals.csv`: every evaluation row of every analysed run (`kdlab.analysis.runs.RunAnalysis`)."""
    rows = []
    for r in runs:
        ident = {"run": r.name, "path": _relative(r.path, Path(root)), "condition": r.condition}
        for row in r.metrics.rows:
            flat = _flatten(row)
            rows.append({**ident, **{(f"log.{k}" if k in IDENTITY else k): v for k, v in flat.items()}})
    return _csv(rows)
