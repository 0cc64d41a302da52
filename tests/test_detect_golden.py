"""Golden detector against constructed ground truth: hacking, over-fitting, clean controls."""

import numpy as np
import pytest

from kdlab.analysis import GoldenConfig, detect_golden
from kdlab.analysis import synthetic as syn

STEPS = syn.log_steps(8000, 30)


def v_curve(steps, k, depth_alpha=0.4, rise=0.15, g_min=4.0):
    """Noise-free golden falling as a power law to index k, then rising by `rise` (relative)."""
    x = np.maximum(steps, 1).astype(float)
    s_h = x[k]
    beta = np.log1p(rise) / np.log(x[-1] / s_h)
    return np.where(x <= s_h, g_min * (x / s_h) ** -depth_alpha, g_min * (x / s_h) ** beta)


def line(steps, amp=3.0, alpha=0.5):
    return amp * np.maximum(steps, 1).astype(float) ** -alpha


@pytest.mark.parametrize("k", [18, 21, 24])
def test_hacking_found_at_the_golden_minimum(k):
    rng = np.random.default_rng(k)
    sigma = 0.01
    g = v_curve(STEPS, k, rise=0.2) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    p = line(STEPS) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    v = detect_golden(STEPS, g, sigma * g, p, sigma * p)
    assert v.detected and v.kind == "hacking"
    assert abs(int(np.flatnonzero(STEPS == v.onset_step)[0]) - k) <= 1  # within one evaluation
    # The rise is measured as defined (tail mean − lowest 3-point mean); on the noise-free curve:
    g0 = v_curve(STEPS, k, rise=0.2)
    expected = g0[-3:].mean() - min(g0[j : j + 3].mean() for j in range(len(g0) - 5))
    assert abs(v.rise - expected) < 3 * v.rise_se
    assert v.rise_z > 3 and v.proxy_trend == "falling" and v.proxy_change < 0


def test_flat_proxy_is_still_hacking_and_rising_proxy_is_overfitting():
    rng = np.random.default_rng(0)
    k, sigma = 20, 0.01
    g = v_curve(STEPS, k, rise=0.2)
    x = np.maximum(STEPS, 1).astype(float)
    flat = np.where(np.arange(len(x)) <= k, line(STEPS), line(STEPS)[k])
    # Over-fitting: the held-out proxy rises by as many nats as golden.
    overfit = np.where(np.arange(len(x)) <= k, line(STEPS), line(STEPS)[k] + (g - g[k]))
    noise = lambda y: y * np.exp(sigma * rng.standard_normal(len(y)))  # noqa: E731
    gn = noise(g)
    v_flat = detect_golden(STEPS, gn, sigma * gn, noise(flat), sigma * flat)
    assert v_flat.kind == "hacking" and v_flat.proxy_trend == "flat"
    v_over = detect_golden(STEPS, gn, sigma * gn, noise(overfit), sigma * overfit)
    assert v_over.kind == "overfitting" and not v_over.detected
    assert v_over.onset_step == v_flat.onset_step  # same golden curve, same minimum
    assert v_over.proxy_trend == "rising"


def test_small_but_significant_proxy_rise_is_overfitting_in_the_papers_terms():
    """Issue 16: the paper's hacking is golden rising while the held-out proxy falls or stays flat.
    A proxy rising beyond its noise by a quarter of golden's rise (w0's "hacking" runs had 0.2–0.35)
    is over-fitting, described as partial; the same rise buried in noise stays hacking."""
    k, sigma = 20, 0.005
    g = v_curve(STEPS, k, rise=0.15, g_min=4.0)  # +0.6 nats
    p = np.where(np.arange(len(STEPS)) <= k, line(STEPS), line(STEPS)[k] + 0.25 * (g - g[k]))
    v = detect_golden(STEPS, g, sigma * g, p, sigma * p)
    assert v.kind == "overfitting" and not v.detected and v.proxy_trend == "rising"
    assert 0 < v.proxy_change < 0.5 * v.rise and "partly" in v.reason
    assert v.proxy_golden_ratio == pytest.approx(v.proxy_change / v.rise)
    # The same proxy change measured with errors of 0.2 nats is flat within its noise: hacking.
    noisy = detect_golden(STEPS, g, sigma * g, p, np.full(len(p), 0.2))
    assert noisy.kind == "hacking" and noisy.proxy_trend == "flat" and noisy.detected


def test_proxy_rising_while_golden_does_not_is_named_as_such():
    """Neither hacking nor over-fitting: the held-out proxy rises, golden keeps falling."""
    rng = np.random.default_rng(3)
    sigma = 0.01
    g = line(STEPS, 8.0, 0.3) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    p = line(STEPS)
    p = np.where(np.arange(len(STEPS)) <= 20, p, p[20] * 1.3)  # +30 % over the last evaluations
    v = detect_golden(STEPS, g, sigma * g, p * np.exp(sigma * rng.standard_normal(len(STEPS))), sigma * p)
    assert v.kind == "proxy_rise" and not v.detected and "not hacking" in v.reason
    assert detect_golden(STEPS, g, sigma * g, line(STEPS), sigma * line(STEPS)).kind == "none"


def test_single_outlier_at_the_end_does_not_fire():
    rng = np.random.default_rng(4)
    sigma = 0.02
    g = line(STEPS, 8.0, 0.3) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    g[-1] *= 1.3  # one wild evaluation (+15 SE)
    p = line(STEPS) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    v = detect_golden(STEPS, g, sigma * g, p, sigma * p)
    assert v.kind == "none" and not v.persistent
    # …but the same jump held over the last three points is a rise.
    g[-3:] = g[-4] * 1.3 * np.exp(sigma * rng.standard_normal(3))
    assert detect_golden(STEPS, g, sigma * g, p, sigma * p).detected


def test_without_standard_errors_noise_is_estimated_from_the_curve():
    rng = np.random.default_rng(2)
    g = v_curve(STEPS, 20, rise=0.2) * np.exp(0.01 * rng.standard_normal(len(STEPS)))
    p = line(STEPS) * np.exp(0.01 * rng.standard_normal(len(STEPS)))
    v = detect_golden(STEPS, g, None, p, None)
    assert v.detected and v.se_source == "scatter"
    flat = 4.0 * np.exp(0.01 * rng.standard_normal(len(STEPS)))
    assert detect_golden(STEPS, flat, None, p, None).kind == "none"


def test_too_few_points_and_missing_values():
    v = detect_golden([0, 1, 2, 4], [5, 4, 3, 4], [0.1] * 4, [3, 2, 1, 0.5])
    assert not v.detected and "too few" in v.reason
    g = v_curve(STEPS, 20, rise=0.2)
    g_nan = g.copy()
    g_nan[5] = np.nan  # a missing evaluation is dropped, not propagated
    v = detect_golden(STEPS, g_nan, 0.005 * g, line(STEPS), 0.005 * line(STEPS))
    assert v.detected and np.isfinite(v.rise)


def test_config_changes_the_threshold():
    rng = np.random.default_rng(8)
    sigma = 0.02
    g = v_curve(STEPS, 22, rise=0.12) * np.exp(sigma * rng.standard_normal(len(STEPS)))
    p = line(STEPS)
    v = detect_golden(STEPS, g, sigma * g, p, sigma * p)
    strict = detect_golden(STEPS, g, sigma * g, p, sigma * p, config=GoldenConfig(z=v.rise_z + 0.5))
    loose = detect_golden(STEPS, g, sigma * g, p, sigma * p, config=GoldenConfig(z=v.rise_z - 0.5))
    assert v.persistent and 3 < v.rise_z < 8  # a moderate rise: the threshold decides
    assert not strict.detected and loose.detected


FAMILIES = ["power", "floor", "transient"]


def test_false_positive_rate_on_clean_curves():
    """≥ 500 random clean golden curves (power laws with slow starts, plateaus, early transients;
    noise σ ∈ [1 %, 3 %]): the detector must stay quiet on almost all of them, with and without SEs."""
    rng = np.random.default_rng(2024)
    fired = {f: 0 for f in FAMILIES}
    fired_no_se = 0
    n_per = 200
    for family in FAMILIES:
        for _ in range(n_per):
            g = syn.clean_curve(rng, family)
            p = syn.clean_curve(rng, "power", g.steps)
            fired[family] += detect_golden(g.steps, g.values, g.se, p.values, p.se).kind != "none"
            fired_no_se += detect_golden(g.steps, g.values, None, p.values, None).kind != "none"
    total = sum(fired.values()) / (n_per * len(FAMILIES))
    assert total < 0.05 and all(v / n_per < 0.05 for v in fired.values()), fired
    assert fired_no_se / (n_per * len(FAMILIES)) < 0.05


def test_detection_rate_on_constructed_hacking():
    """Hacking runs on kdlab's evaluation grid (30 log-spaced steps), golden rising 15–25 % from a
    minimum at 0.7–0.8 of the log-step range (≥ 5 evaluations after it), noise 1–2 % (rise ≥ 8 SE
    of one point): detected in ≥ 95 %, onset within one evaluation of the true minimum in ≥ 90 %.
    (Rates against rise/noise and the number of points after the minimum are in docs/LOG.md.)"""
    rng = np.random.default_rng(7)
    n, hits, on_time = 300, 0, 0
    for _ in range(n):
        run = syn.hacking_run(rng, steps=STEPS, rise=rng.uniform(0.15, 0.25), sigma=rng.uniform(0.01, 0.02),
                              onset_frac=rng.uniform(0.7, 0.8))
        v = detect_golden(run.steps, run.golden.values, run.golden.se, run.proxy.values, run.proxy.se)
        hits += v.detected
        if v.detected:
            on_time += abs(int(np.flatnonzero(run.steps == v.onset_step)[0]) - run.onset_index) <= 1
    assert hits / n >= 0.95
    assert on_time / hits >= 0.9


def test_rise_without_proxy_is_not_called_hacking():
    g = v_curve(STEPS, 20, rise=0.2)
    v = detect_golden(STEPS, g, 0.005 * g)
    assert v.kind == "rise" and not v.detected and v.onset_step is not None
