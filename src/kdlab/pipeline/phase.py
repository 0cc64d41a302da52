"""A phase map of teacher hacking: `kdlab study configs/studies/phase.yaml`.

A phase study crosses three kinds of levers, each a named set of config overrides:

- `rows`    teacher quality (stage-1 teacher budget, injected teacher error, ...);
- `panels`  student capacity (models.student, ...);
- `columns` offline data (diversity at a fixed dataset size, ...).

Every (panel, row, world seed) is one world (its own stage 1). In it, every column is an offline
condition and one online control run (`control`, default online_teacher) gives the iso-proxy gap,
all with the same training seeds. Each cell (panel, row, column) is judged by
kdlab.analysis.worlds: the golden rise with its paired SE, the held-out proxy change, the teacher's
golden over the online student's best, the attribution (teacher floor, iso-proxy gap) and the
verdict. Results go to `<out>/phase.json`, `<out>/phase.csv` and the heat map `<out>/phase.{png,pdf}`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdlab.config import ConfigError, RunConfig, load_config
from kdlab.data.regimes import CONTROL_REGIMES, OFFLINE, ONLINE_TEACHER
from kdlab.pipeline.study import Condition

SPEC_KEYS = {"base", "out", "world_seeds", "seeds", "control", "rows", "panels", "columns", "jobs", "set"}
CONTROL_NAME = "control"


@dataclass
class PhaseSpec:
    path: Path
    base: Path
    out: Path
    rows: dict[str, dict]
    columns: dict[str, dict]
    panels: dict[str, dict] = field(default_factory=lambda: {"": {}})
    world_seeds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    control: str = ONLINE_TEACHER
    jobs: int = 2
    common: dict = field(default_factory=dict)


def _overrides(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in mapping.items()]


def _named_sets(data: dict, key: str, path: Path, required: bool = True) -> dict[str, dict]:
    value = data.get(key)
    if value is None and not required:
        return {"": {}}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{path}: '{key}' must map names to override mappings (a.b.c: value), got {value!r}")
    for name, overrides in value.items():
        if overrides is None:
            value[name] = {}
        elif not isinstance(overrides, dict):
            raise ConfigError(f"{path}: {key}.{name} must be a mapping of dotted config keys to values, "
                              f"got {overrides!r}")
    return {str(k): v for k, v in value.items()}


def _int_list(data: dict, key: str, default: list[int], path: Path) -> list[int]:
    value = data.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{path}: '{key}' must be a non-empty list of non-negative integers, got {value!r}")
    return value


def load_phase_spec(path: str | Path, out: Path | None = None) -> PhaseSpec:
    """Read and validate a phase-study YAML; every cell's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if "base" not in data:
        raise ConfigError(f"{path}: 'base' (the run config every cell starts from) is required")
    control = data.get("control", ONLINE_TEACHER)
    if control not in CONTROL_REGIMES:
        raise ConfigError(f"{path}: control = {control!r}: must be {' or '.join(CONTROL_REGIMES)}")
    spec = PhaseSpec(
        path=path, base=(path.parent / data["base"]).resolve(), out=Path(out or data.get("out", "runs/phase")),
        rows=_named_sets(data, "rows", path), columns=_named_sets(data, "columns", path),
        panels=_named_sets(data, "panels", path, required=False),
        world_seeds=_int_list(data, "world_seeds", [0], path), seeds=_int_list(data, "seeds", [0, 1], path),
        control=control, jobs=int(data.get("jobs", 2)), common=data.get("set") or {})
    world_configs(spec)  # validates every override before any run starts
    return spec


@dataclass
class PhaseWorld:
    panel: str
    row: str
    world_seed: int
    directory: Path
    config: RunConfig
    conditions: list[Condition]


def world_configs(spec: PhaseSpec) -> list[PhaseWorld]:
    worlds = []
    for panel, p_over in spec.panels.items():
        for row, r_over in spec.rows.items():
            for ws in spec.world_seeds:
                over = [*_overrides(spec.common), *_overrides(p_over), *_overrides(r_over), f"world.seed={ws}"]
                try:
                    cfg = load_config(spec.base, over)
                except ConfigError as err:
                    raise ConfigError(f"{spec.path}: cell panel={panel!r} row={row!r}: {err}") from None
                conds = []
                for col, c_over in spec.columns.items():
                    c = [f"stage2.regime={OFFLINE}", *_overrides(c_over)]
                    try:
                        load_config(spec.base, over + c)
                    except ConfigError as err:
                        raise ConfigError(f"{spec.path}: column {col!r}: {err}") from None
                    conds.append(Condition(col, OFFLINE, c))
                conds.append(Condition(CONTROL_NAME, "control", [f"stage2.regime={spec.control}"]))
                slug = "_".join(x for x in (_slug(panel), _slug(row), f"w{ws}") if x)
                worlds.append(PhaseWorld(panel, row, ws, spec.out / slug, cfg, conds))
    return worlds


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text).strip("-")


def study_cache(spec: PhaseSpec) -> Path:
    """Where the study's worlds are cached: the `set:` cache_dir when the file gives one (shared between
    studies of the same worlds), else `<out>/.kdlab-cache`."""
    given = spec.common.get("cache_dir")
    return Path(given) if given else spec.out / ".kdlab-cache"


def run_phase(spec: PhaseSpec, log=print) -> dict:
    """Run every world of the study (finished runs are skipped), then judge and draw it."""
    from kdlab.pipeline.study import run_study, study_configs

    t0 = time.time()
    worlds = world_configs(spec)
    cache = study_cache(spec)
    for i, w in enumerate(worlds, 1):
        log(f"[phase] world {i}/{len(worlds)}: {w.panel or '-'} / {w.row} / world seed {w.world_seed}")
        run_study(study_configs(w.config, w.conditions, spec.seeds, w.directory, cache_dir=cache),
                  jobs=spec.jobs, log=log)
    result = judge_phase(spec, worlds)
    result["seconds"] = round(time.time() - t0, 1)
    write_phase(spec, result)
    return result


def _cell_verdict(cond: dict) -> str:
    n = cond["seeds"]
    hack = cond["hacking"]
    over = sum(k == "overfitting" for k in cond["kinds"])
    if 3 * hack >= 2 * n:
        return "hacking"
    if 3 * over >= 2 * n:
        return "over-fitting"
    if hack or over:
        return "mixed"
    return "none"


def judge_phase(spec: PhaseSpec, worlds: list[PhaseWorld]) -> dict:
    from kdlab.analysis.worlds import assess_world

    from kdlab import record

    cells, rows = [], []
    for w in worlds:
        missing = [c.name for c in w.conditions
                   if not all((w.directory / c.name / f"seed-{s}" / record.DONE).is_file() for s in spec.seeds)]
        if missing:  # a world not (fully) run: said so, never judged on part of its conditions
            rows.append({"panel": w.panel, "row": w.row, "world_seed": w.world_seed, "teacher_golden": None,
                         "online_best": None, "ratio": None, "paper_ordering": None,
                         "ordering_reasons": [f"not run: {', '.join(missing)}"]})
            cells += [{"panel": w.panel, "row": w.row, "column": col, "world_seed": w.world_seed, "seeds": 0,
                       "verdict": "not run", "hacking_seeds": 0, "kinds": [], "golden_rise": None,
                       "golden_rise_se": None, "golden_rise_paired_se": None, "proxy_change": None,
                       "proxy_change_se": None, "teacher_golden": None, "online_best": None, "ratio": None,
                       "paper_ordering": None, "teacher_floor_crossed": None, "iso_proxy_gap": None,
                       "iso_proxy_gap_se": None, "regime_part": None, "control_part": None} for col in spec.columns]
            continue
        a = assess_world([w.directory], control=CONTROL_NAME)
        ordering = a.ordering or {}
        rows.append({"panel": w.panel, "row": w.row, "world_seed": w.world_seed, "teacher_golden": a.teacher_golden,
                     "online_best": a.online_best, "ratio": a.ratio, "paper_ordering": ordering.get("holds"),
                     "ordering_reasons": ordering.get("reasons")})
        for col in spec.columns:
            c = a.conditions[col]
            gap = c.get("iso_proxy_gap") or {}
            cells.append({
                "panel": w.panel, "row": w.row, "column": col, "world_seed": w.world_seed, "seeds": c["seeds"],
                "verdict": _cell_verdict(c), "hacking_seeds": c["hacking"], "kinds": c["kinds"],
                "golden_rise": c["rise"][0], "golden_rise_se": c["rise"][1],
                "golden_rise_paired_se": c["rise_paired_se"],
                "proxy_change": c["proxy_change"][0], "proxy_change_se": c["proxy_change"][1],
                "teacher_golden": a.teacher_golden, "online_best": a.online_best, "ratio": a.ratio,
                "paper_ordering": ordering.get("holds"), "teacher_floor_crossed": c.get("teacher_floor_crossed"),
                "iso_proxy_gap": gap.get("gap_end"), "iso_proxy_gap_se": gap.get("gap_end_se"),
                "regime_part": gap.get("regime_part"), "control_part": gap.get("control_part"),
            })
    return {"study": str(spec.path), "seeds": spec.seeds, "world_seeds": spec.world_seeds, "control": spec.control,
            "rows": list(spec.rows), "columns": list(spec.columns), "panels": list(spec.panels),
            "worlds": rows, "cells": cells}


def write_phase(spec: PhaseSpec, result: dict) -> None:
    from kdlab import record
    from kdlab.report.phase import plot_phase

    spec.out.mkdir(parents=True, exist_ok=True)
    record.write_json(spec.out / "phase.json", result)
    keys = [k for k in result["cells"][0] if k != "kinds"] if result["cells"] else []
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result["cells"])
    record.write_text(spec.out / "phase.csv", table.getvalue())
    plot_phase(result, spec.out / "phase")


def phase_table(result: dict) -> str:
    """The map as text: one line per cell."""
    def pm(v, se):
        return "n/a" if v is None else f"{v:+.2f}" + (f"±{se:.2f}" if se is not None else "")

    lines = [f"{'panel':12s} {'row':26s} {'ws':>3s} {'column':10s} {'verdict':12s} {'hack':>5s} {'rise (paired SE)':>17s} "
             f"{'d proxy':>12s} {'T/online':>8s} {'order':>5s} {'floor':>5s} {'iso-proxy gap':>14s}"]
    for c in result["cells"]:
        lines.append(
            f"{c['panel'][:12]:12s} {c['row'][:26]:26s} {c['world_seed']:>3d} {c['column'][:10]:10s} {c['verdict']:12s} "
            f"{c['hacking_seeds']}/{c['seeds']:<3d} {pm(c['golden_rise'], c['golden_rise_paired_se']):>17s} "
            f"{pm(c['proxy_change'], c['proxy_change_se']):>12s} "
            f"{(c['ratio'] or float('nan')):8.2f} {({True: 'yes', False: 'no'}.get(c['paper_ordering'], '-')):>5s} "
            f"{c['teacher_floor_crossed']!s:>5s} {pm(c['iso_proxy_gap'], c['iso_proxy_gap_se']):>14s}")
    return "\n".join(lines)
