"""Power-law fits against synthetic ground truth: known exponents, interval coverage, floors."""

import numpy as np
import pytest

from kdlab.analysis import fit_power_law
from kdlab.analysis.synthetic import log_steps

STEPS = log_steps(5000, 30)


def noisy_power_law(rng, alpha, amp=10.0, sigma=0.02, floor=0.0, steps=STEPS):
    x = np.maximum(steps, 1)
    return (floor + amp * x ** (-alpha)) * np.exp(sigma * rng.standard_normal(len(steps)))


def test_recovers_exact_law_and_skips_step_zero():
    y = 3.0 * np.maximum(STEPS, 1) ** -0.7
    y[0] = 1e6  # step 0 must be ignored: a value there would wreck the fit
    fit = fit_power_law(STEPS, y, n_boot=0)
    assert fit.alpha == pytest.approx(0.7, abs=1e-10)
    assert fit.a == pytest.approx(np.log(3.0), abs=1e-10)
    assert fit.n == len(STEPS) - 1
    np.testing.assert_allclose(fit.predict([10, 1000]), 3.0 * np.array([10, 1000]) ** -0.7, rtol=1e-10)
    np.testing.assert_allclose(fit.residuals, 0, atol=1e-10)


def test_window_restricts_the_fit():
    # A curve that bends at step 100: fitting before the bend recovers the early exponent only.
    x = np.maximum(STEPS, 1).astype(float)
    y = np.where(x <= 100, x**-1.0, 100**-1.0 * (x / 100) ** -0.2)
    early = fit_power_law(STEPS, y, window=(1, 100), n_boot=0)
    late = fit_power_law(STEPS, y, window=(100, None), n_boot=0)
    assert early.alpha == pytest.approx(1.0, abs=1e-9)
    assert late.alpha == pytest.approx(0.2, abs=1e-9)
    assert early.steps.max() <= 100 and late.steps.min() >= 100


@pytest.mark.parametrize("with_se", [False, True])
def test_interval_coverage_is_near_nominal(with_se):
    """Over 300 noisy curves with known α, the 95 % intervals (regression and bootstrap) must
    contain the truth about 95 % of the time: too narrow or too wide both fail. (Over 2,000 curves
    the measured coverage was 0.946 for the regression and 0.943 for the bootstrap intervals.)"""
    rng = np.random.default_rng(0)
    hits_reg = hits_boot = 0
    n_curves = 300
    widths = []
    for i in range(n_curves):
        alpha = rng.uniform(0.2, 1.0)
        sigma = rng.uniform(0.01, 0.03)
        y = noisy_power_law(rng, alpha, amp=rng.uniform(1, 50), sigma=sigma)
        fit = fit_power_law(STEPS, y, se=sigma * y if with_se else None, n_boot=300, seed=i)
        hits_reg += fit.alpha_ci[0] <= alpha <= fit.alpha_ci[1]
        hits_boot += fit.alpha_ci_boot[0] <= alpha <= fit.alpha_ci_boot[1]
        widths.append(fit.alpha_ci[1] - fit.alpha_ci[0])
    # Binomial SD of a coverage estimate from 300 curves at 0.95 is 0.0126: accept ±3 SD.
    assert 0.91 <= hits_reg / n_curves <= 0.99
    assert 0.91 <= hits_boot / n_curves <= 0.99
    assert np.median(widths) < 0.05  # informative, not trivially wide


def test_floor_law_recovers_exponent_and_floor():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(40):
        alpha = rng.uniform(0.4, 1.0)
        amp = rng.uniform(5, 50)
        c = amp * 300 ** (-alpha)  # plateau reached around step 300
        y = noisy_power_law(rng, alpha, amp=amp, sigma=0.01, floor=c)
        fit = fit_power_law(STEPS, y, floor=True, n_boot=0)
        assert fit.c == pytest.approx(c, rel=0.15)
        hits += fit.alpha_ci[0] <= alpha <= fit.alpha_ci[1]
    assert hits >= 34  # ≈ 95 % of 40, with room for the nonlinear fit's approximate intervals


def test_pure_law_misses_a_floor_that_the_floor_law_captures():
    x = np.maximum(STEPS, 1).astype(float)
    y = 0.5 + 20 * x**-0.8
    pure = fit_power_law(STEPS, y, n_boot=0)
    floor = fit_power_law(STEPS, y, floor=True, n_boot=0)
    assert np.abs(floor.residuals).max() < 1e-6
    assert np.abs(pure.residuals).max() > 0.1


def test_prediction_uncertainty_grows_away_from_the_window():
    rng = np.random.default_rng(0)
    y = noisy_power_law(rng, 0.5)
    fit = fit_power_law(STEPS, y, window=(10, 300), n_boot=0)
    se = fit.predict_log_se([50, 300, 3000, 30000])
    assert se[0] < se[1] < se[2] < se[3]
    assert se[3] > 3 * se[0]


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_power_law([0, 1, 2, 4], [5.0, 4.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_power_law([1, 2, 4, 8], [5.0, 4.0, 3.0, 2.0], floor=True)


def test_to_dict_is_json_ready():
    import json

    rng = np.random.default_rng(1)
    fit = fit_power_law(STEPS, noisy_power_law(rng, 0.6), n_boot=100)
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["law"] == "power" and d["alpha"] == pytest.approx(fit.alpha)
    assert d["alpha_ci_boot"][0] < fit.alpha < d["alpha_ci_boot"][1]
