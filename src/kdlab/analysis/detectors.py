"""Teacher-hacking detectors (Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation").

Two detectors read evaluation curves, never models:

* `detect_golden` (needs an oracle): the golden divergence D(oracle, student) has a minimum and then
  rises by more than its noise while the proxy D(teacher, student) keeps falling or stays flat —
  the paper's definition (§3, the U-shape of golden vs proxy). When the held-out proxy rises about
  as much as golden, the student is simply over-fitting its training set: `kind = "overfitting"`.
* `detect_proxy_deviation` (no oracle): healthy runs follow a polynomial convergence law, a straight
  line of log proxy vs log step (the paper's §5). The proxy curve is fitted on an early window and the
  detector flags the step from which the measured curve stays *above* the extrapolated line by more
  than the fit's prediction uncertainty and the point noise allow. One-sided on purpose: healthy
  online runs end on or below the line (convergence speeds up), so a two-sided test would raise
  false alarms on exactly the runs that are fine (docs/WORLD-NOTES lesson, measured in world w0).

The thresholds of each detector are one small frozen dataclass, so calibrating them on real kdlab
runs changes numbers only. Default values and their reasons are in the field comments; the
false-positive and detection rates they give on synthetic curves are in docs/LOG.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import special  # quantiles only (scipy.stats is slow to import)

from kdlab.analysis.powerlaw import PowerLawFit, fit_power_law

# The detectors by name: the keys of their verdicts in summary.json, `kdlab detect --json` and the
# monitor's alarms (the sequential one lives in kdlab.analysis.sequential). Adding a detector is a line
# here. name -> what its alarm means.
GOLDEN = "golden"
PROXY_DEVIATION = "proxy_deviation"
PROXY_SEQUENTIAL = "proxy_sequential"

DETECTORS: dict[str, str] = {
    GOLDEN: "the distance to the oracle rises while the distance to the teacher keeps falling",
    PROXY_DEVIATION: "the proxy has left its early power-law convergence upwards",
    PROXY_SEQUENTIAL: "the proxy has broken from its smooth convergence law (tested at every evaluation; "
                      "experimental)",
}

# --------------------------------------------------------------------------------------------
# Noise


def scatter_log_sigma(steps, values) -> float:
    """Point noise of a smooth curve in log units, estimated from the curve itself.

    For each interior point the residual of log y from the straight line through its two
    neighbours in (log s, log y), e_i = z_i − (w z_{i−1} + (1−w) z_{i+1}), has variance
    σ² (1 + w² + (1−w)²) when the curve is locally a power law. The median |e| turns this into a
    robust σ (a departure or a kink spoils only a few e_i). Used when no standard errors are given.
    """
    s = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = (s > 0) & np.isfinite(y) & (y > 0)
    x, z = np.log(s[keep]), np.log(y[keep])
    if len(x) < 3:
        return float("nan")
    w = (x[2:] - x[1:-1]) / (x[2:] - x[:-2])
    e = z[1:-1] - (w * z[:-2] + (1 - w) * z[2:])
    scale = np.sqrt(1 + w**2 + (1 - w) ** 2)
    return float(np.median(np.abs(e) / scale) / special.ndtri(0.75))


def _standard_errors(steps, values, se) -> tuple[np.ndarray, bool]:
    """The given SEs where finite and positive; elsewhere (or when `se` is None) the scatter
    estimate σ·y. Returns (se, True if every SE came from the caller)."""
    y = np.asarray(values, dtype=float)
    given = None if se is None else np.asarray(se, dtype=float)
    ok = np.zeros(len(y), bool) if given is None else np.isfinite(given) & (given > 0)
    if ok.all():
        return given.astype(float), True
    sigma = scatter_log_sigma(steps, y)
    fallback = np.abs(y) * (sigma if np.isfinite(sigma) else 0.0)
    return np.where(ok, given if given is not None else 0.0, fallback), False


def _as_array(x, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} values but steps has {n}")
    return arr


def _jsonable(value):
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Golden detector


@dataclass(frozen=True)
class GoldenConfig:
    """Thresholds of `detect_golden` (provisional until calibrated on kdlab runs)."""

    z: float = 3.0
    """Rise needed, in standard errors: (end − minimum) / SE > z. 3 keeps the false-alarm rate on
    clean and plateauing curves well under 1 % even though the minimum is picked after the fact."""
    tail: int = 3
    """The end value is the mean of the last `tail` evaluations: one noisy final point cannot make
    (or hide) a rise on its own."""
    smooth: int = 3
    """The minimum is the lowest mean of `smooth` consecutive evaluations. The lowest single point
    of a noisy plateau sits ~2 SE below its level (selection bias), which alone would fake a rise."""
    persist_z: float = 2.0
    """Persistence: the rise must still exceed persist_z SEs when the highest of the last `tail`
    points is left out, so a rise carried by one outlier does not count. (Requiring *every* tail
    point to clear the minimum instead missed real rises that began just before the tail.)"""
    proxy_z: float = 2.0
    """The proxy is "flat" when its change over the same span is within proxy_z SEs of zero."""
    overfit_ratio: float = 0.5
    """No longer decides the verdict (issue 16): a significantly rising held-out proxy is over-fitting
    whatever its share of golden's rise, as the paper defines hacking (golden rises while the proxy
    falls or stays flat). Over-fitting with a proxy rise below this fraction of golden's is *described*
    as partial in the reason, since w0's hacking-like runs had ratios 0.2–0.35 (docs/WORLD-NOTES)."""


@dataclass
class GoldenVerdict:
    """Outcome of `detect_golden`. `detected` is True only for kind == "hacking"."""

    detected: bool
    kind: str  # "hacking" | "overfitting" | "none" | "rise" (no proxy given) | "proxy_rise" (see detect_golden)
    onset_step: int | None  # the golden minimum (when hacking or over-fitting starts)
    min_step: int | None
    min_value: float | None
    end_value: float | None
    rise: float | None  # mean of the last `tail` points − minimum (smoothed)
    rise_se: float | None
    rise_z: float | None
    persistent: bool
    proxy_at_min: float | None
    proxy_end: float | None
    proxy_change: float | None  # proxy over the same span (end − at the golden minimum)
    proxy_change_se: float | None
    proxy_trend: str | None  # "falling" | "flat" | "rising"
    proxy_golden_ratio: float | None  # proxy change / golden rise over the same span (None without a proxy)
    n_points: int
    se_source: str  # "paired" (per-prompt differences), "given" or "scatter" (estimated from the curve)
    reason: str
    config: GoldenConfig = field(default_factory=GoldenConfig)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _window_mean(values: np.ndarray, ses: np.ndarray, start: int, length: int) -> tuple[float, float]:
    """Mean of `length` points from `start` and its SE √(Σ se²)/length (independent evaluations;
    evaluations on the same prompts are positively correlated, so the SE of a *difference* of two
    windows computed this way is conservative)."""
    sl = slice(start, start + length)
    return float(values[sl].mean()), float(np.sqrt(np.sum(ses[sl] ** 2)) / length)


def _paired(values, name: str, n: int, keep: np.ndarray) -> np.ndarray | None:
    if values is None:
        return None
    a = np.asarray(values, dtype=float)
    if a.ndim != 2 or a.shape[0] != n or a.shape[1] < 2:
        raise ValueError(f"{name} must have shape (n_evals={n}, k >= 2 prompts), got {a.shape}")
    return a[keep]


def _paired_se(per_prompt: np.ndarray, later: np.ndarray, earlier: np.ndarray) -> float:
    """SE over prompts of mean(later evals)_i − mean(earlier evals)_i."""
    d = per_prompt[later].mean(0) - per_prompt[earlier].mean(0)
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def lowest_window(values: np.ndarray, smooth: int, tail: int) -> int:
    """Start of the lowest mean of `smooth` consecutive values among the windows that end before the
    last `tail` values: the smoothed minimum a rise is measured from (needs len ≥ smooth + tail)."""
    starts = np.arange(0, len(values) - tail - smooth + 1)
    return int(starts[np.argmin([values[i : i + smooth].mean() for i in starts])])


def _proxy_rise(p: np.ndarray, p_se: np.ndarray, cfg: GoldenConfig) -> tuple[float, float] | None:
    """(rise, SE) of the proxy from its lowest `smooth` window to the mean of its last `tail` points,
    as golden's rise is measured; None when the curve is too short or has no finite proxy."""
    n = len(p)
    if n < cfg.smooth + cfg.tail or not np.isfinite(p).all():
        return None
    j = lowest_window(p, cfg.smooth, cfg.tail)
    m, m_se = _window_mean(p, p_se, j, cfg.smooth)
    end, end_se = _window_mean(p, p_se, n - cfg.tail, cfg.tail)
    return end - m, float(np.hypot(end_se, m_se))


def detect_golden(
    steps,
    golden,
    golden_se=None,
    proxy=None,
    proxy_se=None,
    *,
    config: GoldenConfig | None = None,
    golden_paired=None,
    proxy_paired=None,
) -> GoldenVerdict:
    """Golden-metric teacher-hacking test.

    Let m be the lowest mean of `smooth` consecutive golden values (windows ending before the last
    `tail` points), at steps around s_min, and T the mean of the last `tail` values. Then

        rise = T − m,   SE(rise) = √(SE(T)² + SE(m)²),   significant ⇔ rise / SE(rise) > z

    and the rise survives leaving out the highest tail point (> persist_z SEs: persistence). Over
    the same span the proxy change Δp = mean(proxy, last `tail`) − mean(proxy, minimum window)
    classifies the rise in the paper's terms (Tiapkin et al. 2025, §3):
    Δp ≤ proxy_z·SE(Δp) → "hacking" (golden rises while the held-out proxy falls or stays flat);
    Δp > proxy_z·SE(Δp) → "overfitting" (both rise), however small the proxy's share of the rise
    (before issue 16 a proxy rising by less than overfit_ratio × golden's rise was called hacking).
    Without a significant golden rise: "proxy_rise" when the held-out proxy rises significantly over
    the last `tail` points from its lowest window (the student moves away from the teacher, not from
    the truth), else "none". The onset is the step of the lowest raw golden point inside the minimum
    window. Without a proxy a significant rise gets kind "rise" (it cannot be told from over-fitting).
    A rise needs ≥ tail + 2 evaluations after the minimum to be seen (docs/LOG.md).

    Missing standard errors (None or NaN) are estimated from the curve's own scatter.
    Points where golden or proxy is missing (NaN) are dropped.

    Paired evaluations: `golden_paired` / `proxy_paired`, arrays (n_evals × k) of the per-prompt
    values behind each evaluation (the same k prompts every time, as kdlab's runs store them in
    `per_prompt/`). Then SE(rise) is the SE over prompts of the per-prompt differences
    d_i = mean(tail)_i − mean(min window)_i — the right error for a change measured on the same
    prompts, and much smaller than √(SE(T)² + SE(m)²), which treats the windows as independent.
    """
    cfg = config or GoldenConfig()
    s = _as_array(steps, "steps")
    g = _as_array(golden, "golden", len(s))
    p = _as_array(proxy, "proxy", len(s)) if proxy is not None else np.full(len(s), np.nan)
    g_se_in = None if golden_se is None else _as_array(golden_se, "golden_se", len(s))
    p_se_in = None if proxy_se is None else _as_array(proxy_se, "proxy_se", len(s))
    keep = np.isfinite(g) & (np.isfinite(p) if proxy is not None else True)
    s, g, p = s[keep], g[keep], p[keep]
    g_pp = _paired(golden_paired, "golden_paired", len(keep), keep)
    p_pp = _paired(proxy_paired, "proxy_paired", len(keep), keep) if proxy is not None else None
    g_se, g_given = _standard_errors(s, g, None if g_se_in is None else g_se_in[keep])
    p_se, _ = _standard_errors(s, p, None if p_se_in is None else p_se_in[keep])
    n = len(s)
    empty = dict(
        detected=False, kind="none", onset_step=None, min_step=None, min_value=None, end_value=None,
        rise=None, rise_se=None, rise_z=None, persistent=False, proxy_at_min=None, proxy_end=None,
        proxy_change=None, proxy_change_se=None, proxy_trend=None, proxy_golden_ratio=None, n_points=n,
        se_source="paired" if g_pp is not None else ("given" if g_given else "scatter"), config=cfg,
    )
    if n < cfg.smooth + cfg.tail:
        return GoldenVerdict(**empty, reason=f"too few golden evaluations ({n} < {cfg.smooth + cfg.tail})")

    # Lowest smoothed window that ends before the tail starts.
    j = lowest_window(g, cfg.smooth, cfg.tail)
    m, m_se = _window_mean(g, g_se, j, cfg.smooth)
    onset = j + int(np.argmin(g[j : j + cfg.smooth]))
    end, end_se = _window_mean(g, g_se, n - cfg.tail, cfg.tail)
    rise = end - m
    rise_se = float(np.hypot(end_se, m_se))
    rise_z = rise / rise_se if rise_se > 0 else (np.inf if rise > 0 else 0.0)
    tail_idx = np.arange(n - cfg.tail, n)
    rest = np.delete(tail_idx, np.argmax(g[tail_idx]))  # the tail without its highest point
    rest_rise = g[rest].mean() - m
    rest_se = float(np.hypot(np.sqrt(np.sum(g_se[rest] ** 2)) / len(rest), m_se))
    win = np.arange(j, j + cfg.smooth)
    if g_pp is not None:
        rise_se = _paired_se(g_pp, tail_idx, win)
        rise_z = rise / rise_se if rise_se > 0 else (np.inf if rise > 0 else 0.0)
        rest_se = _paired_se(g_pp, rest, win)
    persistent = bool(rest_rise > cfg.persist_z * rest_se)

    pm, pm_se = _window_mean(p, p_se, j, cfg.smooth)
    pe, pe_se = _window_mean(p, p_se, n - cfg.tail, cfg.tail)
    dp, dp_se = pe - pm, float(np.hypot(pe_se, pm_se))
    if p_pp is not None:
        dp_se = _paired_se(p_pp, tail_idx, win)
    if not np.isfinite(dp):
        trend = None
    elif dp < -cfg.proxy_z * dp_se:
        trend = "falling"
    elif dp <= cfg.proxy_z * dp_se:
        trend = "flat"
    else:
        trend = "rising"

    significant = rise_z > cfg.z and persistent
    ratio = dp / rise if np.isfinite(dp) and rise > 0 else None
    if not significant:
        kind = "none"
        why = (
            f"golden rise {rise:+.4g} ± {rise_se:.2g} (z = {rise_z:.1f}) "
            + ("below the threshold" if rise_z <= cfg.z else "not persistent over the last points")
        )
        p_rise = _proxy_rise(p, p_se, cfg) if proxy is not None else None
        if p_rise is not None and p_rise[0] > cfg.z * p_rise[1]:
            kind = "proxy_rise"
            why += (f"; the held-out proxy rises {p_rise[0]:+.4g} ± {p_rise[1]:.2g} from its lowest window: "
                    "the student moves away from the teacher without losing the truth (not hacking)")
    elif trend is None:
        kind = "rise"
        why = f"golden rises {rise:+.4g} ± {rise_se:.2g}, but without a proxy hacking and over-fitting look alike"
    elif trend in ("falling", "flat"):
        kind = "hacking"
        why = (f"golden rises {rise:+.4g} ± {rise_se:.2g} (z = {rise_z:.1f}) from step {int(s[onset])} "
               f"while proxy is {trend} ({dp:+.4g} ± {dp_se:.2g})")
    else:
        kind = "overfitting"
        part = " (partly: the proxy rises by less than {:g} × golden's rise)".format(cfg.overfit_ratio) \
            if ratio is not None and ratio < cfg.overfit_ratio else ""
        why = (f"golden rises {rise:+.4g} ± {rise_se:.2g} and held-out proxy rises {dp:+.4g} ± {dp_se:.2g} "
               f"beyond its noise: both rise, over-fitting, not hacking{part}")

    result = dict(
        empty,
        detected=kind == "hacking",
        kind=kind,
        onset_step=int(s[onset]) if significant else None,
        min_step=int(s[onset]),
        min_value=m,
        end_value=end,
        rise=rise,
        rise_se=rise_se,
        rise_z=float(rise_z),
        persistent=persistent,
        proxy_at_min=pm if np.isfinite(pm) else None,
        proxy_end=pe if np.isfinite(pe) else None,
        proxy_change=dp if np.isfinite(dp) else None,
        proxy_change_se=dp_se if np.isfinite(dp_se) else None,
        proxy_trend=trend,
        proxy_golden_ratio=ratio,
    )
    return GoldenVerdict(**result, reason=why)


# --------------------------------------------------------------------------------------------
# Proxy-only detector


@dataclass(frozen=True)
class ProxyDeviationConfig:
    """Thresholds of `detect_proxy_deviation` (provisional until calibrated on kdlab runs)."""

    fit_start_frac: float = 0.15
    """Fit window start, as a fraction of the log-step range [log s_first, log s_last] of steps > 0.
    Skips the first evaluations (warm-up, the student's first large moves): step ≈ 4 of 8,000.
    Starting later (0.25, step ≈ 9) made the window shorter and raised false alarms on plateaus
    (the curvature that reveals a floor is then harder to see; docs/LOG.md)."""
    fit_end_frac: float = 0.65
    """Fit window end, same units: step ≈ 340 of 8,000 (WORLD-NOTES fitted w0 on steps 10–300).
    Early enough that the golden minima seen in w0 (steps 500–2,500, 0.69–0.87 of the log range)
    lie after it; ending later would let the departure leak into the fit."""
    fit_window: tuple[float, float] | None = None
    """Explicit (lo, hi) steps for the fit, overriding the two fractions."""
    min_fit_points: int = 5
    """At least this many points in the fit; the window end is pushed later when needed."""
    law: str = "auto"
    """"power" (straight line), "floor" (c + e^a s^−α), or "auto": the floor law when it fits the
    window significantly better (a plateau already visible in the window), else the straight line."""
    floor_p: float = 0.2
    """Significance for "auto" to prefer the floor law (Δχ² test, 1 dof; 0.2 ⇔ Δχ² > 1.64).
    Permissive on purpose: a slowly approached floor bends the window only slightly, and a missed
    floor is extrapolated as a straight line the curve then stays above (a false alarm). The price
    is sensitivity: a straight window that happens to favour a floor hides a later departure."""
    z: float = 3.0
    """A point departs when log(y/ŷ) > z · √(SE(log ŷ)² + σ_point²): prediction and point noise."""
    min_log_departure: float = 0.05
    """…and by at least this much in log units (5 %), so that tiny curvature on a very precisely
    measured healthy curve is not called hacking. WORLD-NOTES: healthy online w0 runs ended at
    +0.006 and +0.03, hacking offline runs at +0.18 to +0.43."""
    min_consecutive: int = 3
    """The departure must hold on this many consecutive evaluations up to the last one."""
    onset_z: float = 1.0
    """Once confirmed, the onset is walked back over the preceding points whose residual exceeds
    onset_z SEs: the departure grows gradually and clears the full threshold a few points late."""


@dataclass
class ProxyVerdict:
    """Outcome of `detect_proxy_deviation`; residuals are log(measured / extrapolated)."""

    detected: bool
    onset_step: int | None  # where the final departure began (residual above onset_z SEs)
    confirmed_step: int | None  # where it first cleared the threshold, holding to the end
    residual_at_onset: float | None
    residual_at_end: float | None
    z_at_end: float | None  # residual_at_end / its combined SE
    n_departing: int  # consecutive departing points at the end
    law: str | None  # "power" or "floor"
    fit: PowerLawFit | None
    fit_window: tuple[int, int] | None
    test_steps: np.ndarray | None
    residuals: np.ndarray | None
    thresholds: np.ndarray | None
    se_source: str
    reason: str
    config: ProxyDeviationConfig = field(default_factory=ProxyDeviationConfig)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in {"fit", "test_steps", "residuals", "thresholds"}}
        out["fit"] = self.fit.to_dict() if self.fit is not None else None
        out["alpha"] = self.fit.alpha if self.fit is not None else None
        return _jsonable(out)


def _fit_window(s: np.ndarray, cfg: ProxyDeviationConfig) -> tuple[float, float]:
    if cfg.fit_window is not None:
        return float(cfg.fit_window[0]), float(cfg.fit_window[1])
    lo_log, hi_log = np.log(s[0]), np.log(s[-1])
    span = hi_log - lo_log
    lo = float(np.exp(lo_log + cfg.fit_start_frac * span))
    hi = float(np.exp(lo_log + cfg.fit_end_frac * span))
    in_window = np.flatnonzero((s >= lo * (1 - 1e-9)) & (s <= hi * (1 + 1e-9)))
    if len(in_window) < cfg.min_fit_points:
        first = in_window[0] if len(in_window) else int(np.searchsorted(s, lo))
        last = min(first + cfg.min_fit_points, len(s)) - 1
        hi = float(s[last])
    return lo, hi


def detect_proxy_deviation(
    steps,
    proxy,
    proxy_se=None,
    *,
    config: ProxyDeviationConfig | None = None,
) -> ProxyVerdict:
    """Oracle-free test: does the proxy curve leave its early polynomial convergence law upwards?

    1. Fit log y = a − α log s (or the floor law, see `ProxyDeviationConfig.law`) on the early
       window, weighting each point by its log-space error σ_i = se_i / y_i (the scatter estimate
       when `proxy_se` is None).
    2. For every later evaluation, r_i = log y_i − log ŷ(s_i) and its threshold
       t_i = max(z · √(SE(log ŷ(s_i))² + σ_i²), min_log_departure), where SE(log ŷ) is the
       extrapolation's standard error, growing away from the window.
    3. Flag r_i > t_i (one-sided). Detected when the flags hold on the last ≥ `min_consecutive`
       evaluations without a gap; the onset is the first step of that final run.
    """
    cfg = config or ProxyDeviationConfig()
    if cfg.law not in ("auto", "power", "floor"):
        raise ValueError(f"ProxyDeviationConfig.law must be 'auto', 'power' or 'floor', got {cfg.law!r}")
    s_all = _as_array(steps, "steps")
    y_all = _as_array(proxy, "proxy", len(s_all))
    se_all = None if proxy_se is None else _as_array(proxy_se, "proxy_se", len(s_all))
    keep = (s_all > 0) & np.isfinite(y_all) & (y_all > 0)
    s, y = s_all[keep], y_all[keep]
    se, given = _standard_errors(s, y, None if se_all is None else se_all[keep])
    base = dict(
        detected=False, onset_step=None, confirmed_step=None, residual_at_onset=None, residual_at_end=None, z_at_end=None,
        n_departing=0, law=None, fit=None, fit_window=None, test_steps=None, residuals=None,
        thresholds=None, se_source="given" if given else "scatter", config=cfg,
    )
    if len(s) < cfg.min_fit_points + cfg.min_consecutive:
        return ProxyVerdict(**base, reason=f"too few evaluations with step > 0 ({len(s)})")
    lo, hi = _fit_window(s, cfg)
    in_fit = (s >= lo * (1 - 1e-9)) & (s <= hi * (1 + 1e-9))
    after = s > hi * (1 + 1e-9)
    if in_fit.sum() < 4 or after.sum() < cfg.min_consecutive:
        return ProxyVerdict(
            **base, reason=f"window {lo:.4g}–{hi:.4g} leaves {int(in_fit.sum())} points to fit and {int(after.sum())} to test"
        )

    fit_args = dict(se=se[in_fit], n_boot=0)
    fit = fit_power_law(s[in_fit], y[in_fit], **fit_args)
    law = "power"
    critical = special.chdtri(1, cfg.floor_p)  # χ²₁ quantile at 1 − floor_p
    if cfg.law == "floor":
        fit, law = fit_power_law(s[in_fit], y[in_fit], floor=True, **fit_args), "floor"
    elif cfg.law == "auto" and in_fit.sum() >= 5 and fit.chi2 > critical:
        # (When the straight line's χ² is below the critical Δχ², no floor can beat it by that much:
        # the nonlinear fit is skipped.) Δχ² between the nested laws is scaled by the floor fit's
        # own χ²/dof (≥ 1) when the points scatter more than their error bars, so misfit alone
        # does not buy the extra parameter.
        floor_fit = fit_power_law(s[in_fit], y[in_fit], floor=True, **fit_args)
        scale = max(1.0, floor_fit.chi2 / floor_fit.dof)
        if floor_fit.c > 0 and (fit.chi2 - floor_fit.chi2) / scale > critical:
            fit, law = floor_fit, "floor"

    test_s, test_y = s[after], y[after]
    sigma_point = se[after] / test_y
    residuals = np.log(test_y) - fit.predict_log(test_s)
    combined = np.sqrt(fit.predict_log_se(test_s) ** 2 + sigma_point**2)
    thresholds = np.maximum(cfg.z * combined, cfg.min_log_departure)
    departs = residuals > thresholds
    # Length of the run of departing points that reaches the last evaluation.
    n_run = len(departs) - int(np.flatnonzero(~departs)[-1]) - 1 if (~departs).any() else len(departs)
    detected = n_run >= cfg.min_consecutive
    confirmed = len(departs) - n_run if detected else None
    onset = confirmed
    if detected:
        # The departure is confirmed where it clears the threshold; it began earlier, where the
        # residual first rose above its noise. Walk back while it stays above onset_z SEs.
        while onset > 0 and residuals[onset - 1] > cfg.onset_z * combined[onset - 1]:
            onset -= 1
    result = dict(
        base,
        detected=detected,
        law=law,
        fit=fit,
        onset_step=int(test_s[onset]) if detected else None,
        confirmed_step=int(test_s[confirmed]) if detected else None,
        residual_at_onset=float(residuals[onset]) if detected else None,
        residual_at_end=float(residuals[-1]),
        z_at_end=float(residuals[-1] / combined[-1]) if combined[-1] > 0 else None,
        n_departing=int(n_run),
        fit_window=(int(s[in_fit][0]), int(s[in_fit][-1])),
        test_steps=test_s,
        residuals=residuals,
        thresholds=thresholds,
    )
    if detected:
        reason = (
            f"proxy above its early {law} law from step {int(test_s[onset])} to the end, beyond noise from "
            f"step {int(test_s[confirmed])} (log residual {residuals[onset]:+.3f} at onset, {residuals[-1]:+.3f} at the end)"
        )
    else:
        reason = (
            f"proxy stays on or below its early {law} law (log residual {residuals[-1]:+.3f} at the end, "
            f"threshold {thresholds[-1]:.3f})"
        )
    return ProxyVerdict(**result, reason=reason)
