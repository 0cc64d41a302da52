"""Power-law (polynomial convergence) fits of a metric against the training step.

Healthy distillation runs follow a polynomial convergence law, a straight line on log-log axes
(Tiapkin et al. 2025, §5; the same form as the distillation scaling laws of Busbridge et al. 2025):

    pure law:   log y(s) = a − α·log s                    (y = e^a · s^(−α))
    floor law:  y(s) = c + e^a · s^(−α),  c ≥ 0          (an irreducible divergence c)

Both are fitted in log space, so each point's error is relative (a 2 % standard error weighs the
same at y = 10 and at y = 0.1), which matches how the evaluation noise of a divergence behaves.
Step 0 (the evaluation before training) has no logarithm and is always skipped.

Uncertainty. With per-point standard errors `se`, each point gets the log-space error
σ_i = se_i / y_i and the fit is weighted least squares; the parameter covariance is
(JᵀWJ)⁻¹ · max(1, χ²/dof) — the known noise is a floor on the uncertainty, and when the points
scatter more than their error bars (the law does not fit exactly) the covariance grows with
the scatter (the Birge ratio). Without `se` the fit is ordinary least squares with
cov = σ̂² (JᵀJ)⁻¹, σ̂² = Σ r_i² / dof, and intervals use Student's t with dof = n − p.
A bootstrap over residuals (resampled with the dof correction √(n/dof)) gives a second interval
for α that does not lean on the normal approximation, useful for the nonlinear floor law.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import special  # quantiles only: scipy.stats costs ~1 s of import time in every CLI call


@dataclass
class PowerLawFit:
    """A fitted law y = c + e^a · s^(−α) (c = 0 for the pure law) with its uncertainty.

    `*_ci` are `ci`-level intervals from the fit's covariance; `alpha_ci_boot` is the residual
    bootstrap's percentile interval (None when `n_boot == 0`). `residuals` are
    log(y) − log(ŷ) at the fitted `steps`; `sigma` is their scale (log units) and `dof` = n − p.
    """

    a: float
    alpha: float
    c: float
    floor: bool
    a_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    c_ci: tuple[float, float] | None
    alpha_ci_boot: tuple[float, float] | None
    ci: float
    cov: np.ndarray
    sigma: float
    dof: int
    chi2: float | None  # Σ (r_i/σ_i)² when per-point errors were given
    quantile: float  # the t (or normal) quantile used for the intervals
    window: tuple[float | None, float | None]
    steps: np.ndarray = field(repr=False)
    values: np.ndarray = field(repr=False)
    residuals: np.ndarray = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.steps)

    def predict_log(self, steps) -> np.ndarray:
        """log ŷ(s) at `steps` (> 0)."""
        x = np.log(np.asarray(steps, dtype=float))
        power = np.exp(self.a - self.alpha * x)
        return np.log(self.c + power) if self.floor else self.a - self.alpha * x

    def predict(self, steps) -> np.ndarray:
        """ŷ(s) = c + e^a · s^(−α) at `steps` (> 0)."""
        return np.exp(self.predict_log(steps))

    def predict_log_se(self, steps) -> np.ndarray:
        """Standard error of log ŷ(s) from the parameter covariance (delta method):
        √(gᵀ Σ g) with g = ∂ log ŷ / ∂(a, α[, c]). It grows with the distance from the fitted
        window, which is what makes an extrapolation honest about what it does not know."""
        grad = _log_model_jacobian(np.asarray(steps, dtype=float), self._theta(), self.floor)
        return np.sqrt(np.einsum("ij,jk,ik->i", grad, self.cov, grad).clip(min=0.0))

    def _theta(self) -> np.ndarray:
        return np.array([self.a, self.alpha, self.c] if self.floor else [self.a, self.alpha])

    def to_dict(self) -> dict:
        """JSON-friendly summary (no arrays)."""
        return {
            "law": "floor" if self.floor else "power",
            "a": self.a,
            "alpha": self.alpha,
            "c": self.c,
            "alpha_ci": list(self.alpha_ci),
            "alpha_ci_boot": list(self.alpha_ci_boot) if self.alpha_ci_boot else None,
            "c_ci": list(self.c_ci) if self.c_ci else None,
            "ci": self.ci,
            "sigma": self.sigma,
            "n": self.n,
            "window": [_maybe_int(w) for w in self.window],
            "fit_steps": [int(s) for s in (self.steps[0], self.steps[-1])],
        }


def _maybe_int(v):
    return None if v is None else (int(v) if float(v).is_integer() else float(v))


def _log_model_jacobian(s: np.ndarray, theta: np.ndarray, floor: bool) -> np.ndarray:
    """∂ log ŷ / ∂θ, rows per step. Pure law: (1, −log s). Floor law with p = e^a s^(−α),
    ŷ = c + p: (p/ŷ, −log s · p/ŷ, 1/ŷ)."""
    x = np.log(s)
    if not floor:
        return np.stack([np.ones_like(x), -x], axis=1)
    a, alpha, c = theta
    power = np.exp(a - alpha * x)
    yhat = c + power
    return np.stack([power / yhat, -x * power / yhat, 1.0 / yhat], axis=1)


def _fit_pure(x: np.ndarray, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares for z = a − α x; `z` may be n × B (B bootstrap replicates at once)."""
    design = np.stack([np.ones_like(x), -x], axis=1) * np.sqrt(w)[:, None]
    rhs = z * (np.sqrt(w)[:, None] if z.ndim == 2 else np.sqrt(w))
    theta, *_ = np.linalg.lstsq(design, rhs, rcond=None)
    return theta


def _fit_floor(s: np.ndarray, z: np.ndarray, w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Nonlinear least squares for log y = log(c + e^a s^(−α)), c ≥ 0.

    The floor is written c = u² so the problem is unconstrained and MINPACK's Levenberg–Marquardt
    (scipy `method="lm"`, several times faster than the bounded trust-region solver) applies; the
    detectors run this fit on every curve. Without `start`, several starting floors are tried
    because the c direction is often flat; the lowest cost wins."""
    from scipy import optimize  # imported on first use: most callers never fit a floor

    x = np.log(s)
    sw = np.sqrt(w)

    def unpack(p):
        return np.array([p[0], p[1], p[2] ** 2])

    def residual(p):
        return (z - np.log(p[2] ** 2 + np.exp(p[0] - p[1] * x))) * sw

    def jac(p):
        grad = _log_model_jacobian(s, unpack(p), True)
        grad[:, 2] *= 2 * p[2]  # chain rule: ∂/∂u = 2u ∂/∂c
        return -grad * sw[:, None]

    y_min = float(np.exp(z.min()))
    starts = [] if start is None else [np.array([start[0], start[1], np.sqrt(max(start[2], 0.0))])]
    for frac in (0.05, 0.5, 0.9) if start is None else ():
        c0 = frac * y_min
        # Straight-line fit of log(y − c0) gives a and α consistent with that floor.
        a0, alpha0 = _fit_pure(x, np.log(np.clip(np.exp(z) - c0, 1e-12 * y_min, None)), w)
        starts.append(np.array([a0, alpha0, np.sqrt(c0)]))
    best = None
    for p0 in starts:
        res = optimize.least_squares(residual, p0, jac=jac, method="lm")
        if best is None or res.cost < best.cost:
            best = res
    return unpack(best.x)


def fit_power_law(
    steps,
    values,
    *,
    se=None,
    window: tuple[float | None, float | None] | None = None,
    floor: bool = False,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> PowerLawFit:
    """Fit log y = a − α·log s (or y = c + e^a s^(−α) with `floor=True`) on a window of steps.

    steps, values: evaluation steps and the metric (positive); step 0 and non-finite values are
        skipped. se: optional standard errors of `values` (weighted fit, see the module docstring).
    window: (lo, hi) inclusive step bounds, either may be None; None fits every step > 0.
    ci: level of the intervals. n_boot: residual-bootstrap replicates for `alpha_ci_boot` (0 = none).
    Raises ValueError when fewer than p + 2 usable points remain (p = 2 or 3 parameters), since a
    fit with no residual degrees of freedom has no uncertainty to report.
    """
    s = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    err = None if se is None else np.asarray(se, dtype=float)
    keep = (s > 0) & np.isfinite(y) & (y > 0)
    if err is not None:
        keep &= np.isfinite(err) & (err > 0)
    lo, hi = window if window is not None else (None, None)
    if lo is not None:
        keep &= s >= lo
    if hi is not None:
        keep &= s <= hi
    s, y = s[keep], y[keep]
    n_params = 3 if floor else 2
    if len(s) < n_params + 2:
        raise ValueError(
            f"power-law fit needs at least {n_params + 2} points with step > 0 and value > 0 in the window "
            f"{window}, got {len(s)}"
        )
    z = np.log(y)
    w = np.ones_like(z) if err is None else (y / err[keep]) ** 2  # 1 / σ_i², σ_i = se_i / y_i
    theta = _fit_floor(s, z, w) if floor else _fit_pure(np.log(s), z, w)
    grad = _log_model_jacobian(s, theta, floor)
    residuals = z - (np.log(theta[2] + np.exp(theta[0] - theta[1] * np.log(s))) if floor else grad @ theta)
    dof = len(s) - n_params
    info = grad.T @ (grad * w[:, None])
    base_cov = np.linalg.pinv(info)
    if err is None:
        sigma = float(np.sqrt(np.sum(residuals**2) / dof))
        cov = base_cov * sigma**2
        chi2 = None
        quantile = float(special.stdtrit(dof, 0.5 + ci / 2))
    else:
        chi2 = float(np.sum(w * residuals**2))
        birge = max(1.0, chi2 / dof)
        cov = base_cov * birge
        sigma = float(np.sqrt(np.sum(residuals**2) / dof))
        # The known noise needs no t correction; a Birge-inflated scale is itself estimated.
        quantile = float(special.stdtrit(dof, 0.5 + ci / 2) if birge > 1.0 else special.ndtri(0.5 + ci / 2))
    half = quantile * np.sqrt(np.diag(cov).clip(min=0.0))

    def interval(i):
        return (float(theta[i] - half[i]), float(theta[i] + half[i]))

    c_ci = None
    if floor:
        lo_c, hi_c = interval(2)
        c_ci = (max(0.0, lo_c), hi_c)

    boot = None
    if n_boot > 0:
        boot = _bootstrap_alpha(s, z, w, theta, residuals, dof, floor, n_boot, ci, seed)

    return PowerLawFit(
        a=float(theta[0]),
        alpha=float(theta[1]),
        c=float(theta[2]) if floor else 0.0,
        floor=floor,
        a_ci=interval(0),
        alpha_ci=interval(1),
        c_ci=c_ci,
        alpha_ci_boot=boot,
        ci=ci,
        cov=cov,
        sigma=sigma,
        dof=dof,
        chi2=chi2,
        quantile=quantile,
        window=(lo, hi),
        steps=s,
        values=y,
        residuals=residuals,
    )


def _bootstrap_alpha(s, z, w, theta, residuals, dof, floor, n_boot, ci, seed) -> tuple[float, float]:
    """Percentile interval of α over fits to ẑ + r*, where r* are the standardised residuals
    r_i √w_i, inflated by √(n/dof) (raw residuals are too small by that factor on average),
    resampled with replacement and rescaled to each point's own error 1/√w_i; then widened about α̂
    by t_dof / z."""
    rng = np.random.default_rng(seed)
    n = len(s)
    sw = np.sqrt(w)
    standardised = residuals * sw * np.sqrt(n / dof)
    standardised = standardised - standardised.mean()
    z_hat = z - residuals
    draws = standardised[rng.integers(0, n, size=(n, n_boot))] / sw[:, None]
    z_star = z_hat[:, None] + draws
    if floor:
        alphas = np.array([_fit_floor(s, z_star[:, b], w, start=theta)[1] for b in range(n_boot)])
    else:
        alphas = _fit_pure(np.log(s), z_star, w)[1]
    tail = (1 - ci) / 2 * 100
    lo, hi = np.percentile(alphas, [tail, 100 - tail])
    # The replicates spread with the *estimated* residual scale as if it were exact; widening the
    # percentile interval about α̂ by t_dof / z restores the small-sample coverage (measured 0.93
    # → 0.95 over 2,000 curves of 29 points).
    widen = special.stdtrit(dof, 0.5 + ci / 2) / special.ndtri(0.5 + ci / 2)
    alpha = theta[1]
    return (float(alpha + (lo - alpha) * widen), float(alpha + (hi - alpha) * widen))
