"""One world's runs judged in the paper's terms: hacking per condition, attribution, ordering.

`assess_world` takes the run directories of one world (several conditions × seeds, one of them an
online control) and returns, per condition: the runs that hack in the paper's sense (golden rise
beyond `GoldenConfig.z` paired SEs while the held-out proxy falls or stays flat within its noise),
the mean rise and proxy change with their SEs over seeds, the teacher floor, and the iso-proxy gap
against the control; and for the world: the teacher's golden, the online student's best, and whether
the paper's ordering holds. The world search, the phase map and the demo all read worlds through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlab import record
from kdlab.analysis.attribution import Curve, iso_proxy_gap, paper_ordering, teacher_floor
from kdlab.analysis.runs import RunAnalysis, analyse, find_runs, group_conditions, seed_stat
from kdlab.data.regimes import ONLINE_REGIMES, ONLINE_TEACHER
from kdlab.record import Metrics


def paper_hacking(run: RunAnalysis) -> bool:
    """Teacher hacking as the paper defines it: a significant, persistent golden rise while the
    held-out proxy is falling or flat within its noise — `detect_golden`'s "hacking" since issue 16
    (a rising proxy is "overfitting")."""
    return bool(run.golden is not None and run.golden.detected)


def curve_of(run: RunAnalysis) -> Curve:
    m = run.metrics
    return Curve.from_arrays(m.steps, m.proxy, m.golden, m.golden_se, seed=run.seed)


def teacher_golden_of(run: RunAnalysis) -> tuple[float, float] | None:
    """The teacher's own golden and its SE: from the run's world.json, else its metrics' column."""
    path = Path(run.path) / record.WORLD
    info = json.loads(path.read_text()) if path.is_file() else {}
    if info.get(record.TEACHER_GOLDEN) is not None:
        return float(info[record.TEACHER_GOLDEN]), float(info.get(record.se_column(record.TEACHER_GOLDEN)) or 0.0)
    return teacher_golden_in(run.metrics)


def teacher_golden_in(m: Metrics) -> tuple[float, float] | None:
    """The teacher's own golden and its SE as a metrics log carries them (`teacher_golden_fkl`), or None."""
    if not m.has(record.TEACHER_GOLDEN):
        return None
    values = m.column(record.TEACHER_GOLDEN)
    ses = m.optional(record.se_column(record.TEACHER_GOLDEN))
    se = float(ses[np.isfinite(ses)][-1]) if ses is not None else 0.0
    return float(values[np.isfinite(values)][-1]), se


def _params(run: RunAnalysis, who: str) -> int | None:
    path = Path(run.path) / record.WORLD
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get(who) or {}).get("num_parameters")


def _mean_se(values) -> tuple[float | None, float | None]:
    s = seed_stat(values)
    return s["mean"], s["se"]


def _combined_se(ses) -> float | None:
    """The SE of a mean of independent estimates with SEs `ses`; None when any is unknown (a run with too few
    evaluations for the golden detector has no rise, hence no SE)."""
    if not ses or any(se is None or not np.isfinite(se) for se in ses):
        return None
    return float(np.sqrt(np.sum(np.square(ses))) / len(ses))


@dataclass
class WorldAssessment:
    teacher_golden: float | None
    teacher_golden_se: float | None
    online_best: float | None  # the control's lowest golden, mean over seeds
    ratio: float | None  # teacher golden / online best (< 1: the paper's side)
    ordering: dict | None
    conditions: dict  # name -> per-condition dict
    control: str | None

    def to_dict(self) -> dict:
        return {"teacher_golden": self.teacher_golden, "teacher_golden_se": self.teacher_golden_se,
                "online_best": self.online_best, "ratio": self.ratio, "ordering": self.ordering,
                "control": self.control, "conditions": self.conditions}


def _control_name(groups: dict[str, list[RunAnalysis]], control: str | None) -> str | None:
    if control is not None:
        if control not in groups:
            raise ValueError(f"control condition {control!r} not among {sorted(groups)}")
        return control
    for name, runs in groups.items():
        if runs and runs[0].regime == ONLINE_TEACHER:
            return name
    return None


def assess_runs(runs: list[RunAnalysis], control: str | None = None) -> WorldAssessment:
    """Judge the runs of one world (see the module docstring). `control` names the online control
    condition (default: the first condition whose regime is online_teacher)."""
    runs = [r for r in runs if r.golden is not None]
    if not runs:
        raise ValueError("assess_runs needs runs with a golden metric (an oracle)")
    groups = group_conditions(runs)
    ctrl = _control_name(groups, control)
    tg = next((t for t in map(teacher_golden_of, runs) if t is not None), None)
    ctrl_curves = [curve_of(r) for r in groups[ctrl]] if ctrl else []
    online_best = float(np.mean([c.golden.min() for c in ctrl_curves])) if ctrl_curves else None
    conditions, curves_by_name = {}, {}
    for name, members in groups.items():
        curves = curves_by_name[name] = [curve_of(r) for r in members]
        rises = [r.golden.rise for r in members]
        dps = [r.golden.proxy_change for r in members]
        cond = {
            "regime": members[0].regime,
            "seeds": len(members),
            "hacking": sum(paper_hacking(r) for r in members),
            "kinds": [r.golden.kind + ("" if r.golden.kind != "hacking" else f"/{r.golden.proxy_trend}")
                      for r in members],
            "rise_z": [r.golden.rise_z for r in members],
            "rise": _mean_se(rises), "proxy_change": _mean_se(dps),
            # the SE of the mean rise from each run's own (paired, per-prompt) SE
            "rise_paired_se": _combined_se([r.golden.rise_se for r in members]),
            "golden_start": _mean_se([c.golden[0] for c in curves]),
            "golden_min": _mean_se([c.golden.min() for c in curves]),
            "golden_end": _mean_se([c.golden[-1] for c in curves]),
            "proxy_end": _mean_se([c.proxy[-1] for c in curves]),
        }
        if tg is not None:
            floors = [teacher_floor(c.steps, c.golden, c.golden_se, tg[0], tg[1]) for c in curves]
            cond["teacher_floor_crossed"] = sum(f.crossed for f in floors)
        if ctrl_curves and name != ctrl:
            cond["iso_proxy_gap"] = iso_proxy_gap(curves, ctrl_curves).to_dict()
        conditions[name] = cond
    ordering = None
    if tg is not None:
        online = {name for name, members in groups.items() if members[0].regime in ONLINE_REGIMES}
        ordering = paper_ordering(curves_by_name, tg[0], tg[1], teacher_params=_params(runs[0], "teacher"),
                                  student_params=_params(runs[0], "student_init"), online=online).to_dict()
    return WorldAssessment(
        teacher_golden=tg[0] if tg else None, teacher_golden_se=tg[1] if tg else None, online_best=online_best,
        ratio=(tg[0] / online_best) if tg and online_best else None, ordering=ordering, conditions=conditions,
        control=ctrl)


def assess_world(dirs, control: str | None = None) -> WorldAssessment:
    """`assess_runs` on every run directory under `dirs`."""
    return assess_runs([analyse(d) for d in find_runs(dirs)], control)


def _pm(pair, digits: int = 2) -> str:
    mean, se = pair
    if mean is None:
        return "n/a"
    return f"{mean:+.{digits}f}" + (f"±{se:.{digits}f}" if se is not None else "")


def assessment_table(a: WorldAssessment) -> str:
    """A plain-text table of one world's assessment (the search log and the demo print it)."""
    head = (f"teacher golden {a.teacher_golden:.2f}" if a.teacher_golden is not None else "teacher golden n/a")
    if a.online_best is not None:
        head += f"; online control best {a.online_best:.2f}; ratio {a.ratio:.2f}"
    if a.ordering is not None:
        head += "; paper ordering " + ("HOLDS" if a.ordering["holds"] else "does not hold")
    lines = [head, f"{'condition':22s} {'hack':>5s} {'g start':>7s} {'g min':>7s} {'g end':>7s} {'rise':>12s} "
             f"{'d proxy':>12s} {'floor':>5s} {'iso-proxy gap':>14s} {'regime part':>13s}"]
    for name, c in a.conditions.items():
        gap = c.get("iso_proxy_gap") or {}
        lines.append(
            f"{name:22s} {c['hacking']}/{c['seeds']:<3d} {c['golden_start'][0]:7.2f} {c['golden_min'][0]:7.2f} "
            f"{c['golden_end'][0]:7.2f} {_pm(c['rise']):>12s} {_pm(c['proxy_change']):>12s} "
            f"{c.get('teacher_floor_crossed', '-')!s:>5s} "
            f"{_pm((gap.get('gap_end'), gap.get('gap_end_se'))) if gap else '-':>14s} "
            f"{_pm((gap.get('regime_part'), gap.get('regime_part_se'))) if gap else '-':>13s}")
    return "\n".join(lines)
