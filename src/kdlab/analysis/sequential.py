"""Sequential proxy-only detector: a broken power law with a penalised break, tested at every evaluation.

The first proxy-only detector (`detect_proxy_deviation`) fits the convergence law on a fixed window
(15–65 % of the log-step range) and tests only the points after it, so a departure that starts inside
the window is absorbed by the fit (issue 16 measured 0 % detection at onsets of 30 % of the range).
This one tests, at every evaluation as it arrives, whether the curve so far has left a smooth law:

1. **Time.** Healthy runs follow log y = a − α log τ (Tiapkin et al. 2025, §5) where τ is the
   optimisation time. With a constant learning rate τ is the step; with a schedule it is the
   cumulative learning rate Σ_{t<s} η_t, so that warm-up, cosine or step decay and restarts (which
   slow or speed up convergence per *step*) are not read as a departure. The scale of τ does not
   matter: a power law in τ/c is one in τ with another intercept.
2. **Warm-up.** Nothing is tested before `warmup_points` evaluations with τ > 0 (plus two after
   them); a break is only looked for after the warm-up points, which give the law.
3. **The test at evaluation i**, on the points so far (those in the first `skip_frac` of the log-time
   range seen are left out: the student's first moves). Broken power law (hinge), the break x_b at an
   evaluation, the slope flattening after it (δ > 0; a speed-up is healthy):

       log y = a − α x + δ (x − x_b)₊,   x = log τ,  weighted by σ_j = se_j / y_j

   against the best smooth law refitted on the same points: the line, the floor law c + A τ^(−α)
   (a plateau), and, with `transient_null`, an early transient A τ^(−α) (1 + b e^(−τ/T)) with T in the
   first quarter of the log-time range (the student's first large moves dying out). The statistic is
   Λ_i = (χ²_smooth − χ²_hinge) / max(1, χ²_hinge / dof) (Birge-scaled when the points scatter more
   than their SEs). Point i *flags* when Λ_i > `break_chi2` (the penalty for the break's position and
   slope) and the hinge puts point i at least `min_log_departure` above the pre-break law.
4. **Alarm** when `persist` consecutive evaluations flag. The alarm stays raised.
5. **Onset with an interval**: the best break at the alarm, and the breaks whose χ² is within the
   χ²₁ quantile of `onset_ci` of the best (profile likelihood, Birge-scaled).

The verdict is a function of the evaluations in order: `detect_proxy_sequential` on a finished curve
replays `SequentialProxyDetector.update` one evaluation at a time, which is exactly what
`TeacherHackingMonitor` calls during training, so online and offline verdicts are the same.
An approach tried first and dropped (docs/LOG.md): a CUSUM of one-step-ahead residuals from a frozen
early fit. Its residuals share the fit's error, so on clean curves they sit at a common offset of
1–2 SE and the CUSUM accumulates it (60–70 % false alarms on kdlab's transient and floor families).
The thresholds were chosen on a calibration set and evaluated on held-out curve families; which set
chose which number is in docs/LOG.md (issue 16) and bench/detection/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import special

from kdlab.analysis.detectors import _as_array, _jsonable, scatter_log_sigma

LR_COLUMNS = ("lr_sum", "lr", "learning_rate")
"""Learning-rate columns the time axis is read from, in order of preference: `lr_sum` (kdlab's
metrics.jsonl and the monitor: Σ of the learning rate over the optimizer steps taken, exact), then the
learning rate at each evaluation, `lr` (kdlab) or `learning_rate` (Hugging Face trainers), integrated
by the trapezoid rule between evaluations (an approximation: a step decay between two evaluations is
smeared over the interval, a restart between them is missed)."""


def lr_time(steps, *, lr_sum=None, lr=None) -> tuple[np.ndarray, str]:
    """Optimisation time τ at each evaluation and how it was obtained.

    `lr_sum` (cumulative learning rate, any scale) is used as it is: "lr_sum". Otherwise `lr`
    (the learning rate at each evaluation) is integrated over steps by the trapezoid rule, with the
    rate before the first logged evaluation taken as constant: "lr_trapezoid". With neither, τ is the
    step: "step". Rows where the column is missing (NaN) are filled by linear interpolation in step
    from their neighbours; a negative value raises ValueError naming the column.
    """
    s = _as_array(steps, "steps")
    for name, col in (("lr_sum", lr_sum), ("lr", lr)):
        if col is None:
            continue
        v = _as_array(col, name, len(s))
        ok = np.isfinite(v)
        if not ok.any():
            continue
        if (v[ok] < 0).any():
            raise ValueError(f"{name} holds a negative learning rate ({float(v[ok].min()):g}); expected ≥ 0")
        v = np.interp(s, s[ok], v[ok]) if not ok.all() else v
        if name == "lr_sum":
            return v.astype(float), "lr_sum"
        first = int(np.flatnonzero(ok)[0])
        tau = np.empty(len(s))
        tau[0] = s[0] * v[0] if first == 0 else s[0] * v[first]
        tau[1:] = tau[0] + np.cumsum(np.diff(s) * (v[1:] + v[:-1]) / 2)
        return tau, "lr_trapezoid"
    return s.astype(float), "step"


@dataclass(frozen=True)
class SequentialConfig:
    """Thresholds of the sequential proxy-only detector. `break_chi2`, `persist` and `transient_null`
    were chosen on the calibration set of issue 16 (kdlab.analysis.synthetic, seeds 0–9,999,
    bench/detection/calibrate.py); docs/LOG.md gives the grid and the rates each value gave. The
    others were fixed beforehand, as their comments say."""

    warmup_points: int = 6
    """Evaluations with τ > 0 that give the law before a break is looked for: the "short early window"
    of issue 16 (6 of 26 log-spaced evaluations over three decades is the first 23 % of the range)."""
    break_chi2: float = 6.0
    """Penalised Δχ² a broken power law must gain over the best smooth law. Chosen on the calibration
    set: the highest detection whose false alarms stay ≤ 3 % on its power, early-plateau and
    early-transient curves (2 → 31 % and 4 → 12 % false alarms on early plateaus; docs/LOG.md)."""
    persist: int = 1
    """Consecutive flagged evaluations needed for an alarm (chosen on the calibration set among 1–3)."""
    transient_null: bool = True
    """Include an early transient among the smooth laws (chosen on the calibration set: without it
    39–59 % false alarms on early-transient curves at the thresholds that detect most)."""
    min_log_departure: float = 0.05
    """The flagged point lies at least this far above the pre-break law in log units, so that tiny
    curvature on a very precisely measured healthy curve is not called a departure (the old
    detector's value, chosen on the demo's runs; not searched here)."""
    law: str = "auto"
    """"power": the line is the only smooth law besides the transient; "auto": the floor law too."""
    skip_frac: float = 0.15
    """Points in the first `skip_frac` of the log-time range seen so far are left out of the test
    (the old detector's `fit_start_frac`; not searched here)."""
    onset_ci: float = 0.95
    """Level of the onset interval (profile likelihood of the break)."""

    def __post_init__(self):
        if self.warmup_points < 4:
            raise ValueError(f"SequentialConfig.warmup_points must be ≥ 4 (a fit with uncertainty), got {self.warmup_points}")
        if self.break_chi2 < 0 or self.persist < 1:
            raise ValueError(f"SequentialConfig needs break_chi2 ≥ 0 and persist ≥ 1, got {self.break_chi2}, {self.persist}")
        if self.law not in ("auto", "power"):
            raise ValueError(f"SequentialConfig.law must be 'auto' or 'power', got {self.law!r}")
        if not 0 < self.onset_ci < 1:
            raise ValueError(f"SequentialConfig.onset_ci must be in (0, 1), got {self.onset_ci}")
        if not 0 <= self.skip_frac < 1:
            raise ValueError(f"SequentialConfig.skip_frac must be in [0, 1), got {self.skip_frac}")


@dataclass
class SequentialVerdict:
    """State of the sequential detector after the evaluations it has seen."""

    detected: bool
    onset_step: int | None  # the break at the alarm (the last evaluation on the law)
    onset_interval: tuple[int, int] | None  # steps of the breaks within the profile-likelihood interval
    alarm_step: int | None  # the evaluation at which the alarm was raised
    statistic: float | None  # Λ at the last tested evaluation
    departure_at_alarm: float | None  # log(y / pre-break law) at the alarm
    departure_at_end: float | None  # the same at the last tested evaluation
    alpha: float | None  # the pre-break law's exponent at the last test (in τ)
    null_law: str | None  # the smooth law that fitted best at the last test: "power", "floor", "transient"
    time_axis: str  # "step", "lr_sum" or "lr_trapezoid" (see `lr_time`)
    n_points: int  # evaluations with τ > 0 seen
    se_source: str  # "given" or "scatter"
    reason: str
    test_steps: np.ndarray = field(repr=False)
    statistics: np.ndarray = field(repr=False)  # Λ at each tested evaluation
    departures: np.ndarray = field(repr=False)  # log(y / pre-break law) at each tested evaluation
    config: SequentialConfig = field(default_factory=SequentialConfig)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in {"test_steps", "statistics", "departures"}}
        return _jsonable(out)


_ALPHAS = np.geomspace(0.02, 4.0, 80)


def _floor_fit(x: np.ndarray, z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Floor law y = c + A τ^(−α), c > 0, by profiling α over a grid: for each α, (c, A) is a
    weighted linear fit in y with weights w / ŷ²… ≈ 1/se² (the log-space weights of `fit_power_law`,
    to first order), then χ² is taken in log space. Returns (θ = (a, α, c), χ²), or (None, inf)
    when no α gives c > 0 and A > 0. Written by hand instead of calling `fit_power_law(floor=True)`
    because the detector fits it at every evaluation of every calibration curve (a grid of 80 α is
    ~30× faster than Levenberg–Marquardt from three starts, and cannot fail to converge)."""
    y = np.exp(z)
    wy = w / y**2  # linear-space weights: σ_lin = y σ_log
    p = np.exp(-np.outer(_ALPHAS, x))  # G × n: τ^(−α)
    s1, sp, spp = wy.sum(), p @ wy, (p * p) @ wy
    sy, spy = (wy * y).sum(), p @ (wy * y)
    det = s1 * spp - sp**2
    c = (spp * sy - sp * spy) / det
    amp = (s1 * spy - sp * sy) / det
    ok = (c > 0) & (amp > 0)
    if not ok.any():
        return None, np.inf
    fitted = np.log(np.clip(c[:, None] + amp[:, None] * p, 1e-300, None))
    chi2 = np.where(ok, ((z[None, :] - fitted) ** 2 * w[None, :]).sum(1), np.inf)
    g = int(np.argmin(chi2))
    return np.array([np.log(amp[g]), _ALPHAS[g], c[g]]), float(chi2[g])


def _line_chi2(x: np.ndarray, z: np.ndarray, w: np.ndarray) -> float:
    design = np.stack([np.ones_like(x), -x], axis=1)
    theta = np.linalg.solve(design.T @ (design * w[:, None]), design.T @ (w * z))
    return float(np.sum(w * (z - design @ theta) ** 2))


def _transient_chi2(x: np.ndarray, z: np.ndarray, w: np.ndarray, t_max: float) -> float:
    """Least χ² of log y = a − α x + log(1 + b e^(−τ/T)) over a grid of b ∈ [−0.6, 2] and
    T ≤ t_max (an early transient); (a, α) in closed form for each (b, T)."""
    tau = np.exp(x)
    T = np.geomspace(tau[0] / 2, max(t_max, tau[0]), 8)
    b = np.linspace(-0.6, 2.0, 14)
    shift = np.log1p(b[:, None, None] * np.exp(-tau[None, None, :] / T[None, :, None]))  # B × T × n
    zz = z - shift
    s1, sx, sxx = w.sum(), (w * x).sum(), (w * x * x).sum()
    sz, sxz = (zz * w).sum(-1), (zz * w * x).sum(-1)
    det = s1 * sxx - sx**2
    a = (sxx * sz - sx * sxz) / det
    slope = (s1 * sxz - sx * sz) / det
    resid = zz - a[..., None] - slope[..., None] * x
    return float((resid**2 * w).sum(-1).min())


def _hinge_profile(x: np.ndarray, z: np.ndarray, w: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """χ² and slope change δ of the weighted fit z = a − α x + δ (x − x_b)₊ for each break x_b in
    `candidates` (all candidates at once: one 3 × 3 normal-equation solve each)."""
    hinge = np.maximum(x[None, :] - candidates[:, None], 0.0)  # C × n
    design = np.stack([np.broadcast_to(np.ones_like(x), hinge.shape), np.broadcast_to(-x, hinge.shape), hinge], axis=2)
    info = np.einsum("cni,cnj,n->cij", design, design, w)
    rhs = np.einsum("cni,n->ci", design, w * z)
    theta = np.linalg.solve(info, rhs[..., None])[..., 0]
    resid = z[None, :] - np.einsum("cni,ci->cn", design, theta)
    return np.sum(w * resid**2, axis=1), theta[:, 2]


class SequentialProxyDetector:
    """The online form: call `update` once per evaluation, in step order; `verdict()` at any time.

    `time` is the optimisation time of the evaluation (cumulative learning rate; see `lr_time`);
    None means the step. `se` None (or NaN) means no standard error: the point noise is then
    estimated from the scatter of the points seen so far (`scatter_log_sigma`).
    """

    def __init__(self, config: SequentialConfig | None = None, *, time_axis: str = "step"):
        self.config = config or SequentialConfig()
        self.time_axis = time_axis
        self.steps: list[int] = []
        self.tau: list[float] = []
        self.values: list[float] = []
        self.se: list[float] = []
        self.tested: list[tuple[int, float, float]] = []  # (step, Λ, departure)
        self.run = 0  # consecutive flagged evaluations
        self.alarm: dict | None = None
        self.last: dict | None = None  # the last test's details

    def _sigmas(self) -> tuple[np.ndarray, bool]:
        """σ_j = se_j / y_j in log units; the scatter estimate where no SE was given."""
        y = np.array(self.values)
        se = np.array(self.se)
        given = np.isfinite(se) & (se > 0)
        if given.all():
            return se / y, True
        sigma = scatter_log_sigma(self.tau, self.values)
        fallback = sigma if np.isfinite(sigma) and sigma > 0 else 0.02  # two points: a typical 2 %
        return np.where(given, se / y, fallback), False

    def _test(self) -> dict:
        """The broken power law against the smooth laws on the points so far (see the module doc)."""
        cfg = self.config
        x_all = np.log(np.array(self.tau))
        x0, x1 = x_all[0], x_all[-1]
        keep = x_all >= x0 + cfg.skip_frac * (x1 - x0)
        n_skipped = int((~keep).sum())
        sig, _ = self._sigmas()
        x, z, w = x_all[keep], np.log(np.array(self.values))[keep], 1 / sig[keep] ** 2
        steps = np.array(self.steps)[keep]
        first = max(cfg.warmup_points - 1 - n_skipped, 2)  # ≥ 3 points and the warm-up before a break
        cand = np.arange(first, len(x) - 2)  # ≥ 2 points after it
        if len(cand) == 0:
            return {}
        chi2, delta = _hinge_profile(x, z, w, x[cand])
        chi2 = np.where(delta > 0, chi2, np.inf)
        best = int(np.argmin(chi2))
        if not np.isfinite(chi2[best]):
            return dict(statistic=0.0, departure=0.0, null="power", onset=None, interval=None, alpha=None)
        nulls = {"power": _line_chi2(x, z, w)}
        if cfg.law == "auto":
            nulls["floor"] = _floor_fit(x, z, w)[1]
        if cfg.transient_null and len(x) >= 6:
            nulls["transient"] = _transient_chi2(x, z, w, float(np.exp(x0 + 0.25 * (x1 - x0))))
        null = min(nulls, key=nulls.get)
        birge = max(1.0, chi2[best] / max(len(x) - 4, 1))
        statistic = (nulls[null] - chi2[best]) / birge
        # Pre-break law of the best hinge, and the last point's height above it.
        xb = x[cand[best]]
        design = np.stack([np.ones_like(x), -x, np.maximum(x - xb, 0.0)], axis=1)
        theta = np.linalg.solve(design.T @ (design * w[:, None]), design.T @ (w * z))
        departure = float(z[-1] - (theta[0] - theta[1] * x[-1]))
        inside = cand[chi2 - chi2[best] <= special.chdtri(1, 1 - cfg.onset_ci) * birge]
        return dict(statistic=float(statistic), departure=departure, null=null, onset=int(steps[cand[best]]),
                    interval=(int(steps[inside].min()), int(steps[inside].max())), alpha=float(theta[1]))

    def update(self, step: int, value: float, se: float | None = None, time: float | None = None) -> bool:
        """Add one evaluation (steps must increase); True once a departure has been detected."""
        step = int(step)
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"evaluations must arrive in increasing step order: {step} after {self.steps[-1]}")
        tau = float(step if time is None else time)
        value = float(value)
        if not np.isfinite(value) or value <= 0 or not np.isfinite(tau) or tau <= 0:
            return self.alarm is not None  # step 0, or a missing / non-positive value: not on a log axis
        if self.tau and tau <= self.tau[-1]:
            # A zero learning rate between evaluations: no optimisation time passed, nothing to test.
            return self.alarm is not None
        self.steps.append(step)
        self.tau.append(tau)
        self.values.append(value)
        self.se.append(float("nan") if se is None else float(se))
        cfg = self.config
        if len(self.steps) < cfg.warmup_points + 2:
            return False
        res = self._test()
        if not res:
            return self.alarm is not None
        self.last = res
        self.tested.append((step, res["statistic"], res["departure"]))
        flag = res["statistic"] > cfg.break_chi2 and res["departure"] > cfg.min_log_departure
        self.run = self.run + 1 if flag else 0
        if self.alarm is None and self.run >= cfg.persist:
            self.alarm = dict(step=step, **res)
        return self.alarm is not None

    def verdict(self) -> SequentialVerdict:
        cfg = self.config
        a, last = self.alarm, self.last
        given = self._sigmas()[1] if self.steps else True
        if a is not None:
            reason = (f"proxy left its {a['null']} law in {self.time_axis} time: a broken power law beats it by "
                      f"Λ = {a['statistic']:.1f} > {cfg.break_chi2:g} on {cfg.persist} evaluation(s) in a row, "
                      f"alarm at step {a['step']:,} ({a['departure']:+.3f} above the pre-break law); onset at step "
                      f"{a['onset']:,} ({cfg.onset_ci:.0%} interval {a['interval'][0]:,}–{a['interval'][1]:,})")
        elif last is None:
            reason = (f"{len(self.steps)} evaluation(s) with τ > 0; the test needs {cfg.warmup_points + 2}")
        else:
            reason = (f"proxy on its {last['null']} law in {self.time_axis} time: a broken power law gains "
                      f"Λ = {last['statistic']:.1f} (threshold {cfg.break_chi2:g}) at the last evaluation, "
                      f"{last['departure']:+.3f} above the pre-break law")
        return SequentialVerdict(
            detected=a is not None,
            onset_step=a["onset"] if a else None,
            onset_interval=a["interval"] if a else None,
            alarm_step=a["step"] if a else None,
            statistic=last["statistic"] if last else None,
            departure_at_alarm=a["departure"] if a else None,
            departure_at_end=last["departure"] if last else None,
            alpha=last["alpha"] if last else None,
            null_law=last["null"] if last else None,
            time_axis=self.time_axis,
            n_points=len(self.steps),
            se_source="given" if given else "scatter",
            reason=reason,
            test_steps=np.array([t[0] for t in self.tested], dtype=np.int64),
            statistics=np.array([t[1] for t in self.tested]),
            departures=np.array([t[2] for t in self.tested]),
            config=cfg,
        )


def lr_columns(metrics) -> dict:
    """{"lr_sum": ..., "lr": ...} from a `kdlab.analysis.Metrics` table, for `detect_proxy_sequential`:
    kdlab's `lr_sum` and `lr`, else a Hugging Face trainer's `learning_rate` as `lr` (None where absent).
    A negative learning rate raises MetricsError naming the file and the column."""
    from kdlab.analysis.loading import MetricsError

    out = {"lr_sum": metrics.optional("lr_sum"), "lr": metrics.optional("lr")}
    if out["lr"] is None:
        out["lr"] = metrics.optional("learning_rate")
    for name, col in out.items():
        if col is not None and (col[np.isfinite(col)] < 0).any():
            column = name if name != "lr" or metrics.has("lr") else "learning_rate"
            raise MetricsError(f"{metrics.path}: column '{column}' holds a negative learning rate")
    return out


def detect_proxy_sequential(
    steps,
    proxy,
    proxy_se=None,
    *,
    lr_sum=None,
    lr=None,
    config: SequentialConfig | None = None,
) -> SequentialVerdict:
    """Offline form of `SequentialProxyDetector`: replay a finished curve one evaluation at a time.

    steps, proxy, proxy_se: the evaluation curve (SEs optional, NaN where unknown).
    lr_sum / lr: the learning-rate columns, when logged (see `lr_time`); the time axis is then the
    cumulative learning rate. Rows are taken in increasing step order.
    """
    s = _as_array(steps, "steps")
    y = _as_array(proxy, "proxy", len(s))
    se = None if proxy_se is None else _as_array(proxy_se, "proxy_se", len(s))
    order = np.argsort(s, kind="stable")
    if len(np.unique(s)) != len(s):
        raise ValueError("steps must be distinct (one evaluation per step)")
    tau, axis = lr_time(s[order], lr_sum=None if lr_sum is None else _as_array(lr_sum, "lr_sum", len(s))[order],
                        lr=None if lr is None else _as_array(lr, "lr", len(s))[order])
    det = SequentialProxyDetector(config, time_axis=axis)
    for j, i in enumerate(order):
        det.update(int(s[i]), y[i], None if se is None else se[i], tau[j])
    return det.verdict()
