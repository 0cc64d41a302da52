"""The paper's findings (Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation")
checked on a study's run directories.

1. Offline data hacks: the golden detector fires ("hacking", not over-fitting) in every seed of the
   offline condition.
2. Online data does not: no golden detection in any seed of online_teacher / online_student.
3. Diversity: at a fixed dataset size, the golden rise grows as prompts get fewer (N×1 < N/2×2 <
   N/5×5); at fixed prompts, more generations shrink it (N/5×1 > N/5×2 > N/5×5).
4. Detectable without an oracle: the proxy-only detector's verdicts agree with the golden ones.

Each finding is evaluated at the full budget and at shorter budgets (the same curves truncated),
because a finding can hold only inside a window of budgets (WORLD-NOTES: online runs of w0 also rose
after ~2,500 steps). Reads run directories only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from kdlab import record
from kdlab.analysis.detectors import detect_golden, detect_proxy_deviation
from kdlab.analysis.runs import RunAnalysis, final_value, mean_se as _mean_se, seed_stat


@dataclass
class Finding:
    key: str
    title: str
    holds: bool | None  # None: not enough data to decide
    evidence: str
    by_budget: dict[int, bool | None]

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "holds": self.holds, "evidence": self.evidence,
                "by_budget": {str(k): v for k, v in self.by_budget.items()}}


def _truncate(run: RunAnalysis, budget: int):
    """(golden verdict, proxy verdict) of a run's curves cut at `budget` steps."""
    m = run.metrics
    keep = m.steps <= budget
    s = m.steps[keep]
    sel = lambda a: None if a is None else a[keep]  # noqa: E731
    golden = None
    if m.golden is not None:
        golden = detect_golden(s, sel(m.golden), sel(m.golden_se), sel(m.proxy), sel(m.proxy_se),
                               golden_paired=sel(run.paired.get(m.golden_col)),
                               proxy_paired=sel(run.paired.get(m.proxy_col)))
    proxy = detect_proxy_deviation(s, sel(m.proxy), sel(m.proxy_se))
    return golden, proxy


def _fmt(mean: float, se: float) -> str:
    return f"{mean:+.2f}" + ("" if math.isnan(se) else f" ± {se:.2f}")


def check_findings(groups: dict[str, list[RunAnalysis]], *, offline: str, online: list[str],
                   diversity: list[str], generations: list[str], budgets: list[int]) -> list[Finding]:
    """Evaluate the four findings. `diversity` lists conditions in the order the paper predicts an
    increasing golden rise; `generations` likewise (fewest-generation condition last)."""
    verdicts = {b: {name: [_truncate(r, b) for r in runs] for name, runs in groups.items()} for b in budgets}
    full = max(budgets)

    def rises(name: str, budget: int) -> list[float]:
        return [g.rise for g, _ in verdicts[budget].get(name, []) if g is not None and g.rise is not None]

    def hacked(name: str, budget: int) -> list[bool]:
        return [bool(g is not None and g.detected) for g, _ in verdicts[budget].get(name, [])]

    findings = []

    # 1. offline hacks in every seed
    def f1(b):
        h = hacked(offline, b)
        return (all(h) if h else None), h

    holds, h = f1(full)
    details = []
    for r, (g, _) in zip(groups.get(offline, []), verdicts[full].get(offline, [])):
        if g is not None and g.rise is not None:
            where = f"from step {g.onset_step}" if g.onset_step is not None else f"minimum at step {g.min_step}"
            change = "n/a" if g.proxy_change is None else f"{g.proxy_change:+.2f}"
            details.append(f"seed {r.seed}: {g.kind}, rise {g.rise:+.2f} ± {g.rise_se:.2f} {where}, proxy change {change}")
    findings.append(Finding("offline_hacks", "Offline data hacks (golden rises while proxy falls, every seed)",
                            holds, f"detected in {sum(h)}/{len(h)} seeds; " + "; ".join(details),
                            {b: f1(b)[0] for b in budgets}))

    # 2. online does not hack in any seed
    def f2(b):
        h = sum((hacked(name, b) for name in online), [])
        return (not any(h) if h else None), h

    holds, h = f2(full)
    parts = []
    for name in online:
        rs = rises(name, full)
        parts.append(f"{name}: detected in {sum(hacked(name, full))}/{len(hacked(name, full))} seeds, "
                     f"rise {_fmt(*_mean_se(rs))}")
    findings.append(Finding("online_no_hacking", "Online data does not hack (no golden detection in any seed)",
                            holds, "; ".join(parts), {b: f2(b)[0] for b in budgets}))

    # 3. orderings of the mean golden rise: the means must increase along the predicted order, and
    # the two ends must differ by more than their noise (2 SE), so that an ordering of noise-level
    # differences between runs that do not rise at all is not reported as the finding.
    def ordering(names: list[str], b: int) -> bool | None:
        stats = [_mean_se(rises(n, b)) for n in names]
        if any(math.isnan(m) for m, _ in stats):
            return None
        increasing = all(a[0] < c[0] for a, c in zip(stats, stats[1:]))
        (m0, s0), (m1, s1) = stats[0], stats[-1]
        spread = math.sqrt((0 if math.isnan(s0) else s0) ** 2 + (0 if math.isnan(s1) else s1) ** 2)
        return increasing and (m1 - m0) > 2 * spread and m1 > 0

    for key, title, names in (
        ("diversity", "Fewer prompts (more generations each) at a fixed dataset size hack more", diversity),
        ("generations", "More generations per prompt at fixed prompts reduce hacking", generations),
    ):
        ev = "; ".join(f"{n}: rise {_fmt(*_mean_se(rises(n, full)))}" for n in names)
        findings.append(Finding(key, title, ordering(names, full), ev + " (golden end − minimum, mean over seeds ± SE; predicted: increasing "
                                "left to right, the ends apart by > 2 SE)",
                                {b: ordering(names, b) for b in budgets}))

    # 4. proxy-only agreement with golden. The golden detector tells three outcomes apart (hacking,
    # over-fitting, none); the proxy-only detector sees the proxy only, so on an over-fitting run
    # (held-out proxy rising with golden) it fires too. The finding is about hacking vs healthy
    # runs, so it is judged on the runs the golden detector calls hacking or none; the raw agreement
    # over every run, over-fitting included, is reported beside it.
    def f4(b):
        rows = [(g.kind, p.detected, g.onset_step, p.onset_step)
                for runs in verdicts[b].values() for g, p in runs if g is not None]
        judged = [(k == "hacking", pd) for k, pd, _, _ in rows if k in ("hacking", "none")]
        if not judged or not any(gd for gd, _ in judged):
            return None, rows  # no run hacked: agreement on "nothing" says nothing about detection
        return sum(gd == pd for gd, pd in judged) / len(judged) >= 0.8, rows

    holds, rows = f4(full)
    if rows:
        judged = [(k == "hacking", pd) for k, pd, _, _ in rows if k in ("hacking", "none")]
        agree = sum(gd == pd for gd, pd in judged)
        raw = sum((k == "hacking") == pd for k, pd, _, _ in rows)
        overfit = [pd for k, pd, _, _ in rows if k == "overfitting"]
        lags = [po - go for k, pd, go, po in rows if k == "hacking" and pd and go is not None and po is not None]
        misses = sum(gd and not pd for gd, pd in judged)
        false_alarms = sum(pd and not gd for gd, pd in judged)
        ev = (f"on runs golden calls hacking or healthy: {agree}/{len(judged)} agree "
              f"({agree / max(len(judged), 1):.0%}; holds at >= 80%), missed {misses}, false alarms {false_alarms}; "
              f"over-fitting runs (not hacking) flagged by proxy-only: {sum(overfit)}/{len(overfit)}; "
              f"raw agreement over all runs {raw}/{len(rows)}; onset lag (proxy − golden) "
              + (f"median {statistics.median(lags):+.0f} steps (range {min(lags):+d}..{max(lags):+d})" if lags else "n/a"))
    else:
        ev = "no runs with an oracle"
    findings.append(Finding("proxy_only_agrees", "Hacking is detectable without an oracle (proxy-only detector agrees)",
                            holds, ev, {b: f4(b)[0] for b in budgets}))
    return findings


def condition_rows(groups: dict[str, list[RunAnalysis]]) -> list[dict]:
    """Per condition: golden at start / minimum / end and proxy at start / end (mean over seeds ±
    SE; a single seed shows its own evaluation SE), and both detectors' verdicts."""
    rows = []
    for name, runs in groups.items():
        def stat(fn):
            return {k: v for k, v in seed_stat(fn(r) for r in runs).items() if k != "n"}

        def first(col):
            return lambda r: float(r.metrics.column(col)[0]) if r.metrics.has(col) else None

        def last(col):
            return lambda r: final_value(r, col)

        g_runs = [r for r in runs if r.golden is not None]
        rows.append({
            "condition": name,
            "seeds": len(runs),
            "golden_start": stat(first(record.GOLDEN)),
            "golden_min": stat(lambda r: float(np.nanmin(r.metrics.column(record.GOLDEN)))
                               if r.metrics.has(record.GOLDEN) else None),
            "golden_end": stat(last(record.GOLDEN)),
            "proxy_start": stat(first(record.PROXY)),
            "proxy_end": stat(last(record.PROXY)),
            "golden_detected": sum(r.golden.detected for r in g_runs),
            "golden_overfitting": sum(r.golden.kind == "overfitting" for r in g_runs),
            "golden_onsets": [r.golden.onset_step for r in g_runs if r.golden.detected],
            "proxy_detected": sum(r.proxy.detected for r in runs),
            "proxy_onsets": [r.proxy.onset_step for r in runs if r.proxy.detected],
        })
    return rows


def budgets_for(total_steps: int) -> list[int]:
    """The budgets at which findings are re-checked: a quarter, half and all of the run."""
    return sorted({max(1, total_steps // 4), max(1, total_steps // 2), total_steps})


__all__ = ["Finding", "budgets_for", "check_findings", "condition_rows"]
