"""Golden-rise attribution: the paper's ordering, the teacher floor, and the iso-proxy gap.

A golden rise has two causes that one verdict would mix up:

(i)  *teacher floor*: the student converges towards a teacher that is worse (against the oracle)
     than the student could be. Any regime that brings the student closer to such a teacher raises
     its golden, online data included. The flag: the student's golden went below the teacher's own
     golden at some evaluation (beyond both SEs).
(ii) *data regime*: at the same closeness to the teacher, the regime leaves the student further
     from the truth. The *iso-proxy gap* measures it against an online control run of the same
     world: at the run's proxy value p, its golden minus the golden the control had when its proxy
     was p (a local linear fit of golden on proxy along the control's descent, `golden_at_proxy`):

         gap(p) = g_run(p) − g_control(p).

     The change of the gap between the run's golden minimum and its end is the part of the rise
     the regime adds; the rest, g_control(p_end) − g_control(p_min), is what moving along the
     online path to the same proxy would have done to the golden anyway.

Only (ii) is what Tiapkin et al. (2025) call the cost of offline data; the paper's setting is the
*paper ordering*: a larger teacher whose golden the student approaches from above in every regime.
The functions here work on plain arrays (steps, proxy, golden and their SEs) so that they serve
kdlab runs, monitor logs and synthetic curves alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from kdlab.analysis.detectors import lowest_window
from kdlab.data.regimes import ONLINE_REGIMES

__all__ = ["Curve", "TeacherFloor", "teacher_floor", "golden_at_proxy", "IsoProxyGap", "iso_proxy_gap",
           "PaperOrdering", "paper_ordering"]


@dataclass(frozen=True)
class Curve:
    """One run's evaluations: steps, proxy and golden (SEs optional), finite points only."""

    steps: np.ndarray
    proxy: np.ndarray
    golden: np.ndarray
    golden_se: np.ndarray | None = None
    seed: str | None = None

    @classmethod
    def from_arrays(cls, steps, proxy, golden, golden_se=None, seed=None) -> "Curve":
        s, p, g = (np.asarray(a, dtype=float) for a in (steps, proxy, golden))
        if not (s.shape == p.shape == g.shape) or s.ndim != 1:
            raise ValueError(f"steps, proxy and golden must be 1-D of one length, got {s.shape}, {p.shape}, {g.shape}")
        se = None if golden_se is None else np.asarray(golden_se, dtype=float)
        keep = np.isfinite(s) & np.isfinite(p) & np.isfinite(g)
        if se is not None:
            se = np.where(np.isfinite(se), se, np.nan)[keep]
        order = np.argsort(s[keep], kind="stable")
        return cls(s[keep][order], p[keep][order], g[keep][order], None if se is None else se[order],
                   None if seed is None else str(seed))

    def tail_mean(self, values: np.ndarray, tail: int) -> float:
        return float(values[-tail:].mean())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# (i) the teacher floor


@dataclass(frozen=True)
class TeacherFloor:
    """Did the student's golden go below its teacher's own golden?"""

    crossed: bool
    first_step: int | None  # first evaluation below the floor (beyond z SEs)
    best_golden: float  # the student's lowest golden
    best_step: int
    teacher_golden: float
    teacher_golden_se: float
    ratio: float  # teacher golden / student's best golden (> 1: the student got closer to the truth)
    z: float

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def text(self) -> str:
        if self.crossed:
            return (f"teacher floor crossed: the student's golden {self.best_golden:.3g} (step {self.best_step}) went "
                    f"below its teacher's {self.teacher_golden:.3g} from step {self.first_step}; a later rise may be "
                    "the student converging to a worse teacher (case i)")
        return (f"teacher floor held: the student's best golden {self.best_golden:.3g} stays above its teacher's "
                f"{self.teacher_golden:.3g} (within {self.z:g} SE)")


def teacher_floor(steps, golden, golden_se, teacher_golden: float, teacher_golden_se: float = 0.0,
                  *, z: float = 2.0) -> TeacherFloor:
    """Flag evaluations where golden + z·√(se² + se_T²) < the teacher's golden (SE None/NaN = 0)."""
    s = np.asarray(steps, dtype=float)
    g = np.asarray(golden, dtype=float)
    se = np.zeros_like(g) if golden_se is None else np.nan_to_num(np.asarray(golden_se, dtype=float), nan=0.0)
    ok = np.isfinite(g)
    if not ok.any():
        raise ValueError("teacher_floor: the golden curve has no finite value")
    if not np.isfinite(teacher_golden):
        raise ValueError(f"teacher_floor: teacher_golden must be finite, got {teacher_golden}")
    s, g, se = s[ok], g[ok], se[ok]
    t_se = float(teacher_golden_se or 0.0)
    below = g + z * np.sqrt(se ** 2 + t_se ** 2) < teacher_golden
    i_best = int(np.argmin(g))
    first = int(s[np.argmax(below)]) if below.any() else None
    best = float(g[i_best])
    return TeacherFloor(crossed=bool(below.any()), first_step=first, best_golden=best, best_step=int(s[i_best]),
                        teacher_golden=float(teacher_golden), teacher_golden_se=t_se,
                        ratio=float(teacher_golden / best) if best > 0 else float("inf"), z=z)


# --------------------------------------------------------------------------------------------
# (ii) the iso-proxy gap


def golden_at_proxy(control: Curve, proxy_value: float, k: int = 5) -> float | None:
    """The control's golden at the moment its proxy came down to `proxy_value`.

    A local linear fit of golden on proxy over the `k` evaluations nearest to `proxy_value` in proxy,
    among those up to the control's proxy minimum (its descent towards the teacher). A fit instead of
    interpolating between the two points around the first crossing: with noisy evaluations the first
    point below the value tends to be one whose noise pushed it down, which biases the golden read
    there by about the noise times the slope. None when `proxy_value` lies outside the control's
    descent (no extrapolation)."""
    p, g = control.proxy, control.golden
    if len(p) == 0 or not np.isfinite(proxy_value):
        return None
    descent = slice(0, int(np.argmin(p)) + 1)
    p, g = p[descent], g[descent]
    if not (p.min() <= proxy_value <= p.max()):
        return None
    if len(p) == 1:
        return float(g[0])
    near = np.argsort(np.abs(p - proxy_value), kind="stable")[:max(2, min(k, len(p)))]
    x, y = p[near], g[near]
    if x.max() == x.min():
        return float(y.mean())
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * proxy_value)


def _point(curve: Curve, where: str, tail: int, smooth: int) -> tuple[float, float]:
    """(proxy, golden) at the run's end (mean of the last `tail` evaluations) or at its golden
    minimum (the lowest mean of `smooth` consecutive evaluations before the tail, as detect_golden)."""
    if where == "end":
        return curve.tail_mean(curve.proxy, tail), curve.tail_mean(curve.golden, tail)
    j = lowest_window(curve.golden, smooth, tail)
    return float(curve.proxy[j:j + smooth].mean()), float(curve.golden[j:j + smooth].mean())


def _crossed_se(d: np.ndarray) -> float:
    """SE of the mean of d[i, c] (runs i × controls c, independent seeds): √(Var_i/n + Var_c/m) of the
    row and column means; a factor with one level contributes nothing (see IsoProxyGap.se_source)."""
    n, m = d.shape
    var = 0.0
    if n > 1:
        var += d.mean(1).var(ddof=1) / n
    if m > 1:
        var += d.mean(0).var(ddof=1) / m
    return float(np.sqrt(var))


@dataclass(frozen=True)
class IsoProxyGap:
    """The iso-proxy gap of a condition's runs against an online control's runs."""

    gap_end: float | None  # golden above the control's at the run's final proxy
    gap_end_se: float | None
    gap_min: float | None  # the same at the run's golden minimum
    regime_part: float | None  # gap_end − gap_min: the part of the golden rise the regime adds
    regime_part_se: float | None
    control_part: float | None  # g_control(p_end) − g_control(p_min): what the online path does
    rise: float | None  # mean golden end − golden minimum of the runs
    n_runs: int
    n_controls: int
    se_source: str  # "seeds" (spread over run and control seeds) or "none" (one seed each)
    reason: str
    per_run: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def significant(self, z: float = 2.0) -> bool | None:
        if self.gap_end is None or not self.gap_end_se:
            return None
        return self.gap_end > z * self.gap_end_se

    def text(self) -> str:
        if self.gap_end is None:
            return f"iso-proxy gap: {self.reason}"
        se = f" ± {self.gap_end_se:.2g}" if self.gap_end_se else " (one seed each: no SE)"
        if self.gap_end_se and (self.n_runs == 1 or self.n_controls == 1):
            se += f" (SE from the {'control' if self.n_runs == 1 else 'run'} seeds only)"
        part = ""
        if self.regime_part is not None and self.rise is not None:
            part = (f"; of the golden change from its minimum to the end {self.rise:+.3g}, the regime adds {self.regime_part:+.3g}"
                    + (f" ± {self.regime_part_se:.2g}" if self.regime_part_se else "")
                    + f" and the online path to the same proxy {self.control_part:+.3g}")
        return f"iso-proxy gap {self.gap_end:+.3g}{se} nats at the final proxy (vs the online control){part}"


def iso_proxy_gap(runs: list[Curve], controls: list[Curve], *, tail: int = 3, smooth: int = 3) -> IsoProxyGap:
    """The iso-proxy gap of `runs` (one condition, several seeds) against `controls` (the online
    control's seeds of the same world). Every run is compared with every control at the run's own
    final proxy; the SE comes from the spread over seeds of both (crossed design). Runs whose
    final proxy the control never reaches are left out and counted in `reason`."""
    if not runs or not controls:
        raise ValueError("iso_proxy_gap needs at least one run and one control curve")
    need = tail + smooth
    short = [c for c in (*runs, *controls) if len(c.golden) < need]
    if short:
        raise ValueError(f"iso_proxy_gap needs >= {need} evaluations per curve (tail {tail} + smooth {smooth})")
    rows_end, rows_min, rows_ctrl, rises, per_run, skipped = [], [], [], [], [], 0
    for r in runs:
        p_end, g_end = _point(r, "end", tail, smooth)
        p_min, g_min = _point(r, "min", tail, smooth)
        c_end = [golden_at_proxy(c, p_end) for c in controls]
        c_min = [golden_at_proxy(c, p_min) for c in controls]
        if any(v is None for v in (*c_end, *c_min)):
            skipped += 1
            per_run.append({"seed": r.seed, "proxy_end": p_end, "golden_end": g_end, "reached": False})
            continue
        rows_end.append([g_end - v for v in c_end])
        rows_min.append([g_min - v for v in c_min])
        rows_ctrl.append([a - b for a, b in zip(c_end, c_min)])
        rises.append(g_end - g_min)
        per_run.append({"seed": r.seed, "proxy_end": p_end, "golden_end": g_end, "proxy_min": p_min,
                        "golden_min": g_min, "gap_end": float(np.mean(rows_end[-1])), "reached": True})
    n_ok = len(rows_end)
    if n_ok == 0:
        return IsoProxyGap(None, None, None, None, None, None, None, len(runs), len(controls), "none",
                           f"the online control never reaches the runs' proxy values ({skipped} run(s))", per_run)
    d_end, d_min, d_ctrl = (np.array(x) for x in (rows_end, rows_min, rows_ctrl))
    seeds = n_ok > 1 or len(controls) > 1
    reason = "" if not skipped else f"{skipped} run(s) left out: the control never reaches their proxy"
    return IsoProxyGap(
        gap_end=float(d_end.mean()), gap_end_se=_crossed_se(d_end) if seeds else None,
        gap_min=float(d_min.mean()), regime_part=float((d_end - d_min).mean()),
        regime_part_se=_crossed_se(d_end - d_min) if seeds else None,
        control_part=float(d_ctrl.mean()), rise=float(np.mean(rises)), n_runs=n_ok, n_controls=len(controls),
        se_source="seeds" if seeds else "none", reason=reason, per_run=per_run)


# --------------------------------------------------------------------------------------------
# The paper's ordering


@dataclass(frozen=True)
class PaperOrdering:
    """Does a world sit in the paper's ordering?

    holds ⇔ the teacher has more parameters than the student, *and* in every regime given the
    student's golden stays above the teacher's own golden (within z SE) at every evaluation, *and*
    every online condition approaches the teacher (its golden falls from start to end beyond z SE)."""

    holds: bool
    teacher_larger: bool | None
    floor_held: dict  # regime -> every run of it stayed above the teacher's golden
    online_approach: dict  # online regime -> its golden fell significantly
    teacher_golden: float
    reasons: list

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def text(self) -> str:
        if self.holds:
            return ("paper ordering: holds (a larger teacher; every regime's student stays above the teacher's golden, "
                    "the online ones approach it)")
        return "paper ordering: does not hold (" + "; ".join(self.reasons) + ")"


def paper_ordering(curves_by_regime: dict[str, list[Curve]], teacher_golden: float, teacher_golden_se: float = 0.0,
                   *, teacher_params: int | None = None, student_params: int | None = None,
                   z: float = 2.0, online=None) -> PaperOrdering:
    """Check the paper's ordering on a world's runs, grouped by condition. `online` names the online
    conditions (default: the names that start with an online regime's name, e.g. "online_teacher")."""
    reasons = []
    larger = None if teacher_params is None or student_params is None else teacher_params > student_params
    if larger is False:
        reasons.append(f"the teacher ({teacher_params:,} parameters) is not larger than the student ({student_params:,})")
    floor_held, approach = {}, {}
    for regime, curves in curves_by_regime.items():
        floors = [teacher_floor(c.steps, c.golden, c.golden_se, teacher_golden, teacher_golden_se, z=z)
                  for c in curves]
        floor_held[regime] = not any(f.crossed for f in floors)
        if not floor_held[regime]:
            worst = min(floors, key=lambda f: f.best_golden)
            reasons.append(f"{regime}: the student's golden {worst.best_golden:.3g} went below the teacher's "
                           f"{teacher_golden:.3g}")
        if (regime in online) if online is not None else regime.startswith(ONLINE_REGIMES):
            falls = []
            for c in curves:
                se0 = 0.0 if c.golden_se is None else float(np.nan_to_num(c.golden_se[0]))
                se1 = 0.0 if c.golden_se is None else float(np.nan_to_num(c.golden_se[-1]))
                falls.append(c.golden[-1] < c.golden[0] - z * np.hypot(se0, se1))
            approach[regime] = all(falls)
            if not approach[regime]:
                reasons.append(f"{regime}: the golden does not fall from start to end")
    holds = larger is not False and all(floor_held.values()) and all(approach.values())
    return PaperOrdering(holds=holds, teacher_larger=larger, floor_held=floor_held, online_approach=approach,
                         teacher_golden=float(teacher_golden), reasons=reasons)
