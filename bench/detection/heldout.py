"""HELD-OUT curve families for the proxy-only detector (issue 16), written apart from
`kdlab.analysis.synthetic` (which the thresholds were calibrated on) and from the detector's own
model: other functional forms, other noise, learning-rate schedules, other evaluation grids.

Each run is a sequence of evaluations at steps s (step 0 first) with the columns kdlab writes:
proxy and golden divergences with standard errors, `lr` (the learning rate of the last step taken)
and `lr_sum` (Σ of the learning rate over the steps taken). The healthy law is a law of the
optimisation time T(s) = Σ_{t<s} η_t / η_peak (steps at the peak rate), not of the step.

Healthy proxy families (all observed through a schedule, below):
  "power-offset"  A (T + T0)^(−α)                      a slow start, then a straight line
  "soft-plateau"  (c^p + (A T^(−α))^p)^(1/p)          a floor approached with sharpness p
  "stretched-exp" c + A exp(−(T/T1)^κ)                exponential-type approach to a floor
  "speed-up"      A T^(−α), steepening to α + Δα after T_b (a late speed-up; healthy, downwards)
Schedules: "constant"; "warmup" (linear over the first 1–10 % of steps); "cosine" (to 0–10 % of
the peak, after a short warm-up); "step" (×0.1 at 50 % and again at 75 %); "restarts" (3–4 cosine
cycles, SGDR). An annealing bonus multiplies the divergence by exp(−C (1 − η_s/η_peak)), C ≤ 0.05:
lower rates give a lower loss at once, so a restart lifts it back (as in real SGDR runs).

Hacking runs ("gao"): distance travelled d(T) = (T/T_end)^γ; the golden divergence follows Gao et
al. (2023)'s over-optimisation shape, a parabola in d (the gold score d (α − β d)) whose minimum d*
is placed at the onset, its fall and rise drawn separately; (piecewise-scaled on each side of d*) the proxy follows its healthy law until d*, then leaves it upwards in log units by
δ · ramp(u), u ∈ [0, 1] the log-time fraction from the onset to the end, with ramp one of
"linear" (u), "softplus" (a smooth start), "saturating" (1 − e^(−4u), normalised) or "accelerating"
(u²); δ is the departure at the end. The onset fraction is in log *step* (what users see).

Noise: multiplicative log-normal σ ∈ [0.5 %, 3 %] with an occasional heavier tail (Student t, 5
dof), and reported SEs off by a factor in [0.8, 1.25] (estimated, not known).
"""

from __future__ import annotations

import numpy as np

HEALTHY = ("power-offset", "soft-plateau", "stretched-exp", "speed-up")
SCHEDULES = ("constant", "warmup", "cosine", "step", "restarts")
RAMPS = ("linear", "softplus", "saturating", "accelerating")


def eval_grid(rng: np.random.Generator) -> np.ndarray:
    """Either the issue's held-out grid (26 log-spaced evaluations, steps 10–10,000) or a random one
    (16–48 evaluations from step 1–5 to 2,000–20,000); step 0 first."""
    if rng.random() < 0.5:
        inner = np.geomspace(10, 10_000, 26)
    else:
        inner = np.geomspace(rng.integers(1, 6), rng.integers(2_000, 20_001), rng.integers(16, 49))
    return np.concatenate([[0], np.unique(np.round(inner).astype(int))])


def schedule(rng: np.random.Generator, name: str, total: int) -> np.ndarray:
    """η_t / η_peak for t = 0 … total − 1."""
    t = np.arange(total, dtype=float)
    if name == "constant":
        return np.ones(total)
    warm = max(1, int(total * rng.uniform(0.01, 0.1)))
    ramp = np.minimum(1.0, (t + 1) / warm)
    if name == "warmup":
        return ramp
    if name == "cosine":
        floor = rng.uniform(0.0, 0.1)
        prog = np.clip((t - warm) / max(total - warm, 1), 0, 1)
        return ramp * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * prog)))
    if name == "step":
        return ramp * np.where(t < 0.5 * total, 1.0, np.where(t < 0.75 * total, 0.1, 0.01))
    if name == "restarts":
        cycles = int(rng.integers(3, 5))
        length = total / cycles
        prog = (t % length) / length
        return ramp * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * prog)))
    raise ValueError(name)


def _observe(rng, truth):
    sigma = rng.uniform(0.005, 0.03)
    eps = rng.standard_t(5, len(truth)) * np.sqrt(3 / 5) if rng.random() < 0.2 else rng.standard_normal(len(truth))
    values = truth * np.exp(sigma * eps)
    return values, values * sigma * rng.uniform(0.8, 1.25), sigma


def _healthy_law(rng, family: str, T: np.ndarray, T_end: float) -> tuple[np.ndarray, dict]:
    A, alpha = rng.uniform(1, 40), rng.uniform(0.15, 0.9)
    Tq = np.maximum(T, 1e-3)
    if family == "power-offset":
        T0 = rng.uniform(0, 15)
        return A * (Tq + T0) ** -alpha, dict(T0=T0)
    if family == "soft-plateau":
        frac = rng.uniform(0.1, 0.6)  # the plateau step, as a fraction of the log range of T
        T_p = T_end**frac
        c = A * T_p**-alpha
        sharp = rng.uniform(1, 3)
        return (c**sharp + (A * Tq**-alpha) ** sharp) ** (1 / sharp), dict(plateau_frac=frac)
    if family == "stretched-exp":
        kappa = rng.uniform(0.3, 0.7)
        frac = rng.uniform(0.1, 0.6)  # the e-folding time T1 as a fraction of the log range
        T1 = T_end**frac
        c = A * rng.uniform(0.05, 0.5)
        return c + A * np.exp(-((Tq / T1) ** kappa)), dict(plateau_frac=frac, kappa=kappa)
    if family == "speed-up":
        frac = rng.uniform(0.3, 0.8)
        T_b = T_end**frac
        extra = rng.uniform(0.1, 0.5)
        law = A * Tq**-alpha * np.where(Tq > T_b, (Tq / T_b) ** -extra, 1.0)
        return law, dict(speedup_frac=frac)
    raise ValueError(family)


def _ramp(name: str, u: np.ndarray) -> np.ndarray:
    u = np.clip(u, 0, 1)
    if name == "linear":
        return u
    if name == "softplus":
        k = 8.0
        f = np.log1p(np.exp(k * (u - 0.15))) - np.log1p(np.exp(-k * 0.15))
        return f / (np.log1p(np.exp(k * 0.85)) - np.log1p(np.exp(-k * 0.15)))
    if name == "saturating":
        return (1 - np.exp(-4 * u)) / (1 - np.exp(-4))
    if name == "accelerating":
        return u**2
    raise ValueError(name)


def make_run(rng: np.random.Generator, *, kind: str, family: str | None = None, sched: str | None = None,
             onset_frac: float | None = None, departure: float | None = None, ramp: str | None = None) -> dict:
    """One held-out run: {"rows": metrics rows, "truth": {...}} (kind "healthy" or "hacking")."""
    steps = eval_grid(rng)
    total = int(steps[-1])
    sched = sched or SCHEDULES[rng.integers(len(SCHEDULES))]
    eta = schedule(rng, sched, total)
    cum = np.concatenate([[0.0], np.cumsum(eta)])  # T(s) for s = 0 … total
    T = cum[steps]
    T_end = T[-1]
    eta_last = np.concatenate([[eta[0]], eta[steps[1:] - 1]])  # the rate of the last step taken
    anneal = np.exp(-rng.uniform(0, 0.05) * (1 - eta_last))
    truth = dict(kind=kind, schedule=sched, steps_last=total)
    if kind == "healthy":
        family = family or HEALTHY[rng.integers(len(HEALTHY))]
        proxy, extra = _healthy_law(rng, family, T, T_end)
        golden = proxy * rng.uniform(1.5, 4) + rng.uniform(0.1, 1)  # falls with it, to a plateau
        truth.update(family=family, **extra)
    else:
        family = "power-offset"
        proxy, extra = _healthy_law(rng, family, T, T_end)
        onset_frac = rng.uniform(0.3, 0.75) if onset_frac is None else onset_frac
        departure = rng.uniform(0.05, 0.3) if departure is None else departure
        ramp = ramp or RAMPS[rng.integers(len(RAMPS))]
        pos = steps > 0
        log_s = np.log(np.where(pos, steps, 1))
        s_first = steps[pos][0]
        onset_step = float(np.exp(np.log(s_first) + onset_frac * (np.log(total) - np.log(s_first))))
        T_on = np.interp(onset_step, np.arange(total + 1), cum)
        u = np.where(T > T_on, np.log(np.maximum(T, 1e-9) / T_on) / np.log(T_end / T_on), 0.0)
        proxy = proxy * np.exp(departure * _ramp(ramp, u))
        gamma = rng.uniform(0.3, 1.0)
        d = (np.maximum(T, 0) / T_end) ** gamma
        d_star = (T_on / T_end) ** gamma
        g_min = rng.uniform(2, 6)
        depth, rise = rng.uniform(0.5, 3.0), rng.uniform(0.1, 0.4) * g_min
        # Gao et al. (2023): the gold score is d (α − β d), quadratic in the distance with its
        # optimum at d* = α / 2β. As a divergence: a parabola in d about d*, scaled on each side so
        # the fall from the start and the rise to the end have the drawn sizes.
        golden = g_min + np.where(d <= d_star, depth * ((d_star - d) / d_star) ** 2,
                                  rise * ((d - d_star) / (1 - d_star)) ** 2)
        truth.update(family="gao", onset_frac=onset_frac, onset_step=onset_step, departure=departure, ramp=ramp)
    proxy = proxy * anneal
    golden = golden * anneal
    pv, pse, psig = _observe(rng, proxy)
    gv, gse, _ = _observe(rng, golden)
    truth["sigma"] = psig
    rows = []
    for i, s in enumerate(steps):
        rows.append({"step": int(s), "lr": float(eta_last[i]) * 1e-3, "lr_sum": float(T[i]) * 1e-3,
                     "proxy_fkl": float(pv[i]), "proxy_fkl_se": float(pse[i]),
                     "golden_fkl": float(gv[i]), "golden_fkl_se": float(gse[i])})
    return {"rows": rows, "truth": truth}
