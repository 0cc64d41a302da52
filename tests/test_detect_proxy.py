"""Proxy-only detector against constructed ground truth: departures, accelerating and plateauing
healthy curves, noise, and its false-positive rate on random clean curves."""

import dataclasses

import numpy as np
import pytest

from kdlab.analysis import ProxyDeviationConfig, detect_proxy_deviation, scatter_log_sigma
from kdlab.analysis import synthetic as syn

STEPS = syn.log_steps(8000, 30)
X = np.maximum(STEPS, 1).astype(float)


def noisy(rng, y, sigma):
    return y * np.exp(sigma * rng.standard_normal(len(y)))


def kinked(k, alpha=0.6, slope_after=0.0, amp=20.0):
    """On the power law up to index k, then log-log slope `slope_after` (0: flat)."""
    s_h = X[k]
    return np.where(X <= s_h, amp * X**-alpha, amp * s_h**-alpha * (X / s_h) ** slope_after)


@pytest.mark.parametrize("k,slope_after", [(20, 0.0), (23, 0.0), (21, 0.1)])
def test_departure_found_where_the_curve_leaves_its_law(k, slope_after):
    rng = np.random.default_rng(k)
    sigma = 0.01
    y = noisy(rng, kinked(k, slope_after=slope_after), sigma)
    v = detect_proxy_deviation(STEPS, y, sigma * y)
    assert v.detected and v.law == "power"
    first_off = k + 1  # the first evaluation after the kink is the first one off the line
    assert abs(int(np.flatnonzero(STEPS == v.onset_step)[0]) - first_off) <= 1
    assert v.residual_at_end > v.residual_at_onset > 0
    assert v.residual_at_end == pytest.approx(np.log(y[-1] / v.fit.predict(STEPS[-1])), rel=1e-9)
    assert v.confirmed_step >= v.onset_step


def test_accelerating_healthy_curve_does_not_fire():
    """WORLD-NOTES: healthy online runs end *below* their early line (residual ≈ −0.45). The mirror
    image of a departure must not be flagged: the test is one-sided."""
    rng = np.random.default_rng(1)
    sigma = 0.01
    k = 21
    faster = kinked(k, alpha=0.5, slope_after=-1.0)  # the curve steepens after step ~1,000
    y = noisy(rng, faster, sigma)
    v = detect_proxy_deviation(STEPS, y, sigma * y)
    assert not v.detected and v.residual_at_end < -0.3
    # The same departure upwards is flagged: only the direction differs.
    up = noisy(rng, kinked(k, alpha=0.5, slope_after=0.0), sigma)
    assert detect_proxy_deviation(STEPS, up, sigma * up).detected


def test_visible_plateau_is_extrapolated_as_a_plateau():
    rng = np.random.default_rng(5)
    sigma = 0.015
    y0 = 0.8 + 30 * X**-0.8  # floor reached around step 40, inside the fit window
    y = noisy(rng, y0, sigma)
    v = detect_proxy_deviation(STEPS, y, sigma * y)
    assert not v.detected and v.law == "floor"
    # Forcing a straight line on the same curve would call the plateau a departure:
    forced = detect_proxy_deviation(STEPS, y, sigma * y, config=ProxyDeviationConfig(law="power"))
    assert forced.detected


def test_early_transient_is_outside_the_fit():
    rng = np.random.default_rng(6)
    sigma = 0.015
    # Fast initial drop over the first ~10 steps (b = 1, τ = 3), then a clean power law.
    y = noisy(rng, 10 * X**-0.5 * (1 + 1.0 * np.exp(-X / 3)), sigma)
    v = detect_proxy_deviation(STEPS, y, sigma * y)
    assert not v.detected and v.fit_window[0] >= 3


def test_single_high_point_at_the_end_does_not_fire():
    rng = np.random.default_rng(7)
    sigma = 0.01
    y = noisy(rng, 20 * X**-0.6, sigma)
    y[-1] *= 1.5
    v = detect_proxy_deviation(STEPS, y, sigma * y)
    assert not v.detected and v.n_departing == 1
    y[-3:-1] *= 1.5  # three in a row up to the end: that is a departure
    assert detect_proxy_deviation(STEPS, y, sigma * y).detected


def test_noise_estimated_from_the_curve_when_no_se():
    rng = np.random.default_rng(8)
    long_steps = syn.log_steps(10**6, 200)
    # One estimate from ~175 points scatters by ~10 %, the mean of 20 by ~2.5 %: within 10 % of σ.
    estimates = [scatter_log_sigma(long_steps, noisy(rng, 5 * np.maximum(long_steps, 1) ** -0.4, 0.02))
                 for _ in range(20)]
    assert np.mean(estimates) == pytest.approx(0.02, rel=0.1)
    y = noisy(rng, kinked(21), 0.01)
    v = detect_proxy_deviation(STEPS, y)
    assert v.detected and v.se_source == "scatter"


def test_config_is_one_dataclass_of_numbers():
    cfg = ProxyDeviationConfig()
    assert all(isinstance(getattr(cfg, f.name), (int, float, str, type(None))) for f in dataclasses.fields(cfg))
    rng = np.random.default_rng(9)
    y = noisy(rng, kinked(22), 0.01)
    assert detect_proxy_deviation(STEPS, y, 0.01 * y).detected
    never = dataclasses.replace(cfg, min_consecutive=50)
    assert not detect_proxy_deviation(STEPS, y, 0.01 * y, config=never).detected
    window = dataclasses.replace(cfg, fit_window=(10, 300))
    v = detect_proxy_deviation(STEPS, y, 0.01 * y, config=window)
    assert 10 <= v.fit_window[0] and v.fit_window[1] <= 300
    with pytest.raises(ValueError, match="law"):
        detect_proxy_deviation(STEPS, y, config=dataclasses.replace(cfg, law="quadratic"))


def test_short_curves_are_reported_not_guessed():
    v = detect_proxy_deviation([0, 1, 2, 4, 8], [9, 5, 3, 2, 1.5])
    assert not v.detected and v.fit is None and "too few" in v.reason


FAMILIES = ["power", "floor", "transient"]


def test_false_positive_rate_on_clean_curves():
    """900 random clean curves (power laws with slow starts, plateaus reached at 10–50 % of the
    log-step range, early transients; 20–40 log-spaced evaluations up to 1,000–10,000 steps; noise
    σ ∈ [1 %, 3 %]). Each family's false-alarm rate must stay under 5 %. Plateaus are the hard
    family (3.0 % over 3,000 curves, docs/LOG.md), so they get 500 curves: at 3 % the estimate's SD
    is 0.8 %, and 200 curves once gave 6.5 % by chance alone."""
    rng = np.random.default_rng(2025)
    counts = {"power": 200, "floor": 500, "transient": 200}
    rates = {}
    for family, n in counts.items():
        rates[family] = np.mean([
            detect_proxy_deviation(c.steps, c.values, c.se).detected
            for c in (syn.clean_curve(rng, family) for _ in range(n))
        ])
    assert all(r < 0.05 for r in rates.values()), rates
    assert rates["power"] < 0.01 and rates["transient"] < 0.01, rates


def test_detection_rate_on_constructed_hacking():
    """Proxy departures of 0.3–0.5 in log units by the end (WORLD-NOTES measured +0.37 to +0.43 for
    w0's low-diversity offline runs), onset at 0.7–0.8 of the log-step range, noise 1–3 %."""
    rng = np.random.default_rng(11)
    n, hits, near = 200, 0, 0
    for _ in range(n):
        run = syn.hacking_run(rng, steps=STEPS, departure=rng.uniform(0.3, 0.5), onset_frac=rng.uniform(0.7, 0.8))
        v = detect_proxy_deviation(run.steps, run.proxy.values, run.proxy.se)
        hits += v.detected
        if v.detected:
            near += abs(int(np.flatnonzero(run.steps == v.onset_step)[0]) - (run.onset_index + 1)) <= 1
    assert hits / n >= 0.85
    assert near / hits >= 0.8
