"""Synthetic evaluation curves with known ground truth, for testing and calibrating the detectors.

Every curve is evaluated at log-spaced steps (step 0 first, as kdlab does before training) and
observed with multiplicative noise: y_obs = y · exp(σ ε), ε ~ N(0, 1), with the reported standard
error se = σ · y_obs. Families:

* clean "power":     y = A (s + s0)^(−α), s0 ∈ [0, 20] (s0 > 0: a slow start, an early transient)
* clean "floor":     y = c + A s^(−α), the plateau c reached at a step inside the early fit window
* clean "transient": y = A s^(−α) (1 + b e^(−s/τ)), a bump or dip over the first ~10–50 steps
* "hacking":   golden falls to a minimum at s_h then rises by `rise` (relative); the proxy follows
               its power law until s_h, then flattens to end `departure` above its line (log units)
* "overfitting": as hacking, but the proxy rises from s_h as much (in nats) as golden does.

`write_run` turns curves into a kdlab run directory (config.yaml + metrics.jsonl) so the report and
the CLI can be tested without the training pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlab.data.regimes import OFFLINE, ONLINE_STUDENT


@dataclass
class Curve:
    """Noisy observations at `steps` (step 0 included) with their SEs and the truth behind them."""

    steps: np.ndarray
    values: np.ndarray
    se: np.ndarray
    truth: np.ndarray
    family: str
    params: dict


def log_steps(last: int, n: int) -> np.ndarray:
    """0 followed by about `n` distinct integer steps geometrically spaced from 1 to `last`."""
    return np.concatenate([[0], np.unique(np.round(np.geomspace(1, last, n)).astype(int))])


def _observe(rng: np.random.Generator, truth: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    values = truth * np.exp(sigma * rng.standard_normal(len(truth)))
    return values, sigma * values


def _random_grid(rng: np.random.Generator) -> np.ndarray:
    return log_steps(int(rng.integers(1000, 10001)), int(rng.integers(20, 41)))


def clean_curve(rng: np.random.Generator, family: str = "power", steps: np.ndarray | None = None) -> Curve:
    """A healthy curve of the given family with random parameters and noise σ ∈ [1 %, 3 %]."""
    s = _random_grid(rng) if steps is None else np.asarray(steps)
    x = np.maximum(s, 1).astype(float)  # step 0 gets the step-1 value (student init ≈ after 1 step)
    amp, alpha = rng.uniform(2, 50), rng.uniform(0.2, 1.0)
    sigma = rng.uniform(0.01, 0.03)
    params = dict(amp=amp, alpha=alpha, sigma=sigma)
    if family == "power":
        s0 = rng.uniform(0, 20)
        truth = amp * (x + s0) ** (-alpha)
        params["s0"] = s0
    elif family == "floor":
        # The power part equals the floor at s_p, log-uniform over the first 10–50 % of log steps.
        s_p = np.exp(rng.uniform(0.1, 0.5) * np.log(x[-1]))
        c = amp * s_p ** (-alpha)
        truth = c + amp * x ** (-alpha)
        params.update(c=c, plateau_step=s_p)
    elif family == "transient":
        b, tau = rng.uniform(-0.5, 1.0), rng.uniform(2, 10)
        truth = amp * x ** (-alpha) * (1 + b * np.exp(-x / tau))
        params.update(b=b, tau=tau)
    else:
        raise ValueError(f"unknown clean family {family!r}")
    values, se = _observe(rng, truth, sigma)
    return Curve(s, values, se, truth, family, params)


@dataclass
class RunCurves:
    """Golden and proxy curves of one synthetic run; `onset_index` is the golden minimum's index."""

    steps: np.ndarray
    golden: Curve
    proxy: Curve
    onset_index: int | None
    kind: str


def hacking_run(
    rng: np.random.Generator,
    *,
    kind: str = "hacking",
    steps: np.ndarray | None = None,
    rise: float | None = None,
    departure: float | None = None,
    onset_frac: float | None = None,
    sigma: float | None = None,
) -> RunCurves:
    """Golden V-shape with a proxy that leaves its power law upwards ("hacking") or rises as much
    as golden ("overfitting").

    golden(s) = g_min (s/s_h)^(−α_g) for s ≤ s_h, then g_min (s/s_h)^β with β set so that golden at
    the last step is (1 + rise) · g_min (rise ∈ [8 %, 20 %] by default; WORLD-NOTES measured 5–15 %).
    s_h is the evaluation step nearest to `onset_frac` of the log-step range (default: random in
    [0.7, 0.85], after the proxy fit window; w0's golden minima lay at 0.69–0.87).
    proxy(s) = P s^(−α_p) up to s_h, with P set so proxy(s_h) ∈ [0.2, 1] · g_min (the teacher is closer
    to the student than the oracle is). Hacking: after s_h the log-log slope changes so that the
    proxy ends `departure` above its line in log units (default ∈ [0.15, 0.5], WORLD-NOTES measured
    +0.18 to +0.43); a large departure makes the proxy rise slightly, as held-out proxies did in w0.
    Over-fitting: after s_h the proxy rises by the same amount (in nats) as golden.
    """
    s = _random_grid(rng) if steps is None else np.asarray(steps)
    x = np.maximum(s, 1).astype(float)
    frac = rng.uniform(0.7, 0.85) if onset_frac is None else onset_frac
    k = int(np.argmin(np.abs(np.log(x) - frac * np.log(x[-1]))))
    s_h = x[k]
    rise = rng.uniform(0.08, 0.2) if rise is None else rise
    departure = rng.uniform(0.15, 0.5) if departure is None else departure
    sigma = rng.uniform(0.01, 0.03) if sigma is None else sigma
    g_min, alpha_g = rng.uniform(2, 6), rng.uniform(0.2, 0.6)
    beta = np.log1p(rise) / np.log(x[-1] / s_h)
    golden = np.where(x <= s_h, g_min * (x / s_h) ** (-alpha_g), g_min * (x / s_h) ** beta)
    alpha_p = rng.uniform(0.3, 1.0)
    p_h = rng.uniform(0.2, 1.0) * g_min
    line = p_h * (x / s_h) ** (-alpha_p)
    if kind == "hacking":
        slope_after = -alpha_p + departure / np.log(x[-1] / s_h)
        proxy = np.where(x <= s_h, line, p_h * (x / s_h) ** slope_after)
    elif kind == "overfitting":
        proxy = np.where(x <= s_h, line, p_h + (golden - g_min))
    else:
        raise ValueError(f"unknown run kind {kind!r}")
    gv, gse = _observe(rng, golden, sigma)
    pv, pse = _observe(rng, proxy, sigma)
    params = dict(s_h=s_h, rise=rise, departure=departure if kind == "hacking" else None, sigma=sigma, alpha_p=alpha_p)
    return RunCurves(s, Curve(s, gv, gse, golden, kind, params), Curve(s, pv, pse, proxy, kind, params), k, kind)


def write_run(run_dir: str | Path, rows: list[dict], config: dict | None = None) -> Path:
    """Write a run directory in kdlab's format: `metrics.jsonl` (one object per row) and
    `config.yaml` (when `config` is given)."""
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return run_dir


def run_rows(run: RunCurves, *, regime: str = OFFLINE, train_loss_scale: float = 0.8, golden: bool = True) -> list[dict]:
    """metrics.jsonl rows for a synthetic run. The training loss (per token, 16 tokens per
    response) tracks the proxy's running minimum: training keeps improving on its own data."""
    train_loss = train_loss_scale * np.minimum.accumulate(run.proxy.truth) / 16
    rows = []
    for i, step in enumerate(run.steps):
        row = {
            "step": int(step),
            "tokens": int(step) * 1024,
            "regime": regime,
            "train_loss": float(train_loss[i]),
            "proxy_fkl": float(run.proxy.values[i]),
            "proxy_fkl_se": float(run.proxy.se[i]),
            "golden_fkl": float(run.golden.values[i]) if golden else None,
            "golden_fkl_se": float(run.golden.se[i]) if golden else None,
        }
        rows.append(row)
    return rows


def healthy_run(rng: np.random.Generator, steps: np.ndarray | None = None) -> RunCurves:
    """A run where both curves keep falling (golden towards a plateau above the proxy's)."""
    s = _random_grid(rng) if steps is None else np.asarray(steps)
    golden = clean_curve(rng, "floor", s)
    proxy = clean_curve(rng, "power", s)
    return RunCurves(s, golden, proxy, None, "none")


def _reobserve(curve: Curve, rng: np.random.Generator) -> Curve:
    """The same truth with fresh noise: another seed of the same condition."""
    values, se = _observe(rng, curve.truth, curve.params["sigma"])
    return Curve(curve.steps, values, se, curve.truth, curve.family, curve.params)


# condition → (regime, offline shape or None, kind of run); the shapes echo WORLD-NOTES' w0 sweep.
SWEEP_CONDITIONS = {
    f"{OFFLINE} 256×8": (OFFLINE, (256, 8), "hacking"),
    f"{OFFLINE} 128×1": (OFFLINE, (128, 1), "overfitting"),
    ONLINE_STUDENT: (ONLINE_STUDENT, None, "none"),
}


def write_sweep(root: str | Path, *, seeds=(0, 1, 2), conditions=None, steps: np.ndarray | None = None,
                golden: bool = True) -> list[Path]:
    """A sweep directory of synthetic runs: one run directory per (condition, seed), with a
    config.yaml shaped like kdlab's (`seed`, `stage2.regime`, `stage2.offline.*`). Seeds of a
    condition share the curves' parameters and differ by their noise. Returns the run directories."""
    root = Path(root)
    steps = log_steps(8000, 30) if steps is None else steps
    runs = []
    for ci, name in enumerate(conditions or SWEEP_CONDITIONS):
        regime, shape, kind = SWEEP_CONDITIONS[name]
        base_rng = np.random.default_rng(1000 + ci)
        if kind == "none":
            base = healthy_run(base_rng, steps)
        else:
            base = hacking_run(base_rng, kind=kind, steps=steps, rise=0.15 if kind == "hacking" else 0.4,
                               departure=0.35, onset_frac=0.75, sigma=0.015)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            run = RunCurves(steps, _reobserve(base.golden, rng), _reobserve(base.proxy, rng), base.onset_index, kind)
            # As kdlab's studies do: one `name` per condition, shared by its seeds.
            config = {"name": name, "seed": seed,
                      "stage2": {"regime": regime, "steps": int(steps[-1]), "loss": "forward_kl"}}
            if shape is not None:
                config["stage2"]["offline"] = {"num_prompts": shape[0], "generations_per_prompt": shape[1]}
            run_dir = root / f"{name.replace(' ', '_').replace('×', 'x')}-seed{seed}"
            rows = run_rows(run, regime=regime, golden=golden)
            for row in rows:
                row.update(condition=name, seed=seed)
            runs.append(write_run(run_dir, rows, config))
    return runs


def measure_detectors(n: int = 1000, seed: int = 0) -> dict:
    """False-alarm and detection rates of both detectors on `n` synthetic curves per family, with
    their standard errors (the numbers in docs/LOG.md come from here). Clean families are scored with
    the given SEs and without them (noise estimated from the curve); hacking runs use the default
    `hacking_run` ranges (golden rise 8–20 %, proxy departure 0.15–0.5, onset at 0.7–0.85 of the
    log-step range, 20–40 evaluations, noise 1–3 %)."""
    from kdlab.analysis.detectors import detect_golden, detect_proxy_deviation

    rng = np.random.default_rng(seed)

    def rate(hits: int, total: int) -> dict:
        p = hits / total
        return {"rate": p, "se": float(np.sqrt(max(p * (1 - p), 1e-12) / total)), "n": total}

    out: dict = {"false_alarms": {}, "hacking": {}, "overfitting": {}}
    for family in ("power", "floor", "transient"):
        counts = dict(golden=0, golden_no_se=0, proxy=0, proxy_no_se=0)
        for _ in range(n):
            g = clean_curve(rng, family)
            p = clean_curve(rng, family, g.steps)
            counts["golden"] += detect_golden(g.steps, g.values, g.se, p.values, p.se).kind != "none"
            counts["golden_no_se"] += detect_golden(g.steps, g.values, None, p.values, None).kind != "none"
            counts["proxy"] += detect_proxy_deviation(p.steps, p.values, p.se).detected
            counts["proxy_no_se"] += detect_proxy_deviation(p.steps, p.values).detected
        out["false_alarms"][family] = {k: rate(v, n) for k, v in counts.items()}
    for kind in ("hacking", "overfitting"):
        kinds: dict[str, int] = {}
        g_on_time = p_hits = p_near = 0
        for _ in range(n):
            run = hacking_run(rng, kind=kind)
            gv = detect_golden(run.steps, run.golden.values, run.golden.se, run.proxy.values, run.proxy.se)
            kinds[gv.kind] = kinds.get(gv.kind, 0) + 1
            if gv.onset_step is not None:
                g_on_time += abs(int(np.flatnonzero(run.steps == gv.onset_step)[0]) - run.onset_index) <= 1
            pv = detect_proxy_deviation(run.steps, run.proxy.values, run.proxy.se)
            p_hits += pv.detected
            if pv.detected:
                p_near += abs(int(np.flatnonzero(run.steps == pv.onset_step)[0]) - (run.onset_index + 1)) <= 1
        flagged = sum(v for k, v in kinds.items() if k != "none")
        out[kind] = {
            "golden_kinds": {k: rate(v, n) for k, v in sorted(kinds.items())},
            "golden_onset_within_1": rate(g_on_time, max(flagged, 1)),
            "proxy_detected": rate(p_hits, n),
            "proxy_onset_within_1_of_first_off_point": rate(p_near, max(p_hits, 1)),
        }
    return out
