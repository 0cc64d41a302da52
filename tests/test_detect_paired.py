"""The golden detector with paired (per-prompt) evaluations."""

import numpy as np

from kdlab.analysis import detect_golden


def _run(rng, rise: float, k: int = 256, between: float = 2.0, within: float = 0.05):
    """k prompts whose golden values differ a lot between prompts (sd `between`) but move together:
    a U with a minimum at evaluation 8 and a late rise of `rise` on every prompt, plus small
    per-prompt evaluation noise (sd `within`)."""
    steps = np.unique(np.geomspace(1, 3000, 16).astype(int))
    n = len(steps)
    base = 5 + between * rng.standard_normal(k)
    shape = np.r_[np.linspace(2.0, 0.0, 8), np.linspace(0.0, rise, n - 8)]
    per_prompt = shape[:, None] + base[None, :] + within * rng.standard_normal((n, k))
    golden = per_prompt.mean(1)
    golden_se = per_prompt.std(1, ddof=1) / np.sqrt(k)
    proxy_pp = np.linspace(3.0, 1.0, n)[:, None] + 0.5 * base[None, :] + within * rng.standard_normal((n, k))
    return steps, golden, golden_se, proxy_pp.mean(1), proxy_pp.std(1, ddof=1) / np.sqrt(k), per_prompt, proxy_pp


def test_paired_errors_see_a_rise_that_unpaired_errors_hide():
    rng = np.random.default_rng(0)
    steps, g, g_se, p, p_se, g_pp, p_pp = _run(rng, rise=0.15)
    unpaired = detect_golden(steps, g, g_se, p, p_se)
    paired = detect_golden(steps, g, g_se, p, p_se, golden_paired=g_pp, proxy_paired=p_pp)
    # Between-prompt spread (sd 2 over 256 prompts) gives SE ~0.1 per evaluation: a 0.15 rise is
    # within the unpaired noise, but every prompt rises by 0.15 with noise 0.05.
    assert not unpaired.detected
    assert paired.detected and paired.kind == "hacking" and paired.se_source == "paired"
    assert paired.rise_se < unpaired.rise_se / 5
    # The paired SE is the SE of the per-prompt differences (about 0.05·√(1/3+1/3)/√256 here).
    assert 0.001 < paired.rise_se < 0.006


def test_paired_errors_stay_quiet_without_a_rise():
    rng = np.random.default_rng(1)
    false_alarms = 0
    for _ in range(200):
        steps, g, g_se, p, p_se, g_pp, p_pp = _run(rng, rise=0.0)
        false_alarms += detect_golden(steps, g, g_se, p, p_se, golden_paired=g_pp, proxy_paired=p_pp).detected
    assert false_alarms <= 10  # under 5 %
