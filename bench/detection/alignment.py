"""Gradient alignment as an early oracle-free warning (issue 16 item 4, protocol D in docs/LOG.md).

    .venv/bin/python bench/detection/alignment.py DIR [DIR ...] [--json OUT]

Every finished run under each DIR that logged `grad_cos_fresh` (eval.grad_alignment: true) is read with
`kdlab.analysis.runs.analyse`, as in agreement.py. The alignment signal fires, by two rules fixed in the
protocol before any run: `neg`, the first evaluation after the first at which the cosine is <= 0, and `mean3`,
the first evaluation at which the mean of the last three cosines is <= 0. Both rules are applied to the
oracle-free cosine (grad_cos_fresh) and to the oracle's (grad_cos_golden). Printed: how often each fires on
runs with and without a golden rise (the golden detector's verdict, as in protocol C), and its median lead
time over the default proxy-only detector, the sequential one and the golden detector on the runs where both
fire, in fractions of the run's log-step range (positive: the alignment signal is earlier), whatever its sign.
Overhead: the logged `grad_align_seconds` summed over a run, over the run's wall time (done.json), and one
measurement over the mean time of one training step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kdlab import record
from kdlab.analysis.runs import analyse

from agreement import _frac, _rate  # noqa: E402 (same folder: run as a script)

SIGNALS = ("grad_cos_fresh", "grad_cos_golden")
RULES = ("neg", "mean3")


def first_alarm(steps: list[int], cos: np.ndarray, rule: str) -> int | None:
    """The step at which `rule` first fires on the cosines (NaN = not measured, skipped)."""
    seen: list[float] = []
    for i, (step, c) in enumerate(zip(steps, cos)):
        if not np.isfinite(c):
            continue
        seen.append(float(c))
        if rule == "neg" and len(seen) > 1 and c <= 0:
            return step
        if rule == "mean3" and len(seen) >= 3 and np.mean(seen[-3:]) <= 0:
            return step
    return None


def judge(run_dir: Path) -> dict | None:
    a = analyse(run_dir)
    if not a.metrics.has(SIGNALS[0]):
        return None
    steps = [int(s) for s in a.metrics.steps]
    g, seq = a.golden, a.sequential
    rise = bool(g is not None and g.kind in ("hacking", "overfitting"))
    row = {"run": str(run_dir), "condition": a.condition, "regime": a.regime, "golden": rise,
           "golden_kind": g.kind if g is not None else None,
           "golden_onset": _frac(g.onset_step, steps) if rise else None,
           "proxy_onset": _frac(a.proxy.onset_step, steps) if a.proxy.detected else None,
           "sequential_onset": _frac(seq.onset_step, steps) if seq is not None and seq.detected else None}
    for sig in SIGNALS:
        cos = a.metrics.optional(sig)
        for rule in RULES:
            step = first_alarm(steps, cos, rule) if cos is not None else None
            row[f"{sig}/{rule}"] = _frac(step, steps) if step is not None else None
            row[f"{sig}/{rule}/fired"] = step is not None
    secs = a.metrics.optional("grad_align_seconds")
    done = json.loads((run_dir / record.DONE).read_text())
    wall = done.get("seconds_this_session")
    row["align_seconds"] = float(np.nansum(secs)) if secs is not None else None
    row["wall_seconds"] = wall
    row["steps"] = done.get("steps")
    n_meas = int(np.sum(np.isfinite(secs))) if secs is not None else 0
    row["align_per_measurement"] = row["align_seconds"] / n_meas if n_meas else None
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [r for d in args.dirs for p in record.find_runs([d]) if (p / record.DONE).exists()
            for r in [judge(p)] if r is not None]
    pos, neg = [r for r in rows if r["golden"]], [r for r in rows if not r["golden"]]
    print(f"{len(rows)} runs with gradient alignment: {len(pos)} with a golden rise "
          f"({sum(r['golden_kind'] == 'hacking' for r in rows)} paper hacking), {len(neg)} without")
    print("| signal / rule | fires on golden rises | fires without | lead over proxy-only (n) | "
          "lead over sequential (n) | lead over golden (n) |")
    print("|---|---|---|---|---|---|")
    out = {}
    for sig in SIGNALS:
        for rule in RULES:
            key = f"{sig}/{rule}"
            leads = {}
            for ref in ("proxy_onset", "sequential_onset", "golden_onset"):
                d = [r[ref] - r[key] for r in pos if r[key] is not None and r[ref] is not None]
                leads[ref] = (float(np.median(d)) if d else None, len(d))
            out[key] = {"fires_pos": _rate(sum(r[f"{key}/fired"] for r in pos), len(pos)),
                        "fires_neg": _rate(sum(r[f"{key}/fired"] for r in neg), len(neg)), "leads": leads}
            cells = [f"{m:+.2f} ({n})" if m is not None else f"– ({n})" for m, n in leads.values()]
            print(f"| {key} | {out[key]['fires_pos']} | {out[key]['fires_neg']} | " + " | ".join(cells) + " |")
    frac = [r["align_seconds"] / r["wall_seconds"] for r in rows if r["align_seconds"] and r["wall_seconds"]]
    per = [r["align_per_measurement"] for r in rows if r["align_per_measurement"]]
    step = [(r["wall_seconds"] - r["align_seconds"]) / r["steps"] for r in rows
            if r["align_seconds"] is not None and r["wall_seconds"] and r["steps"]]
    if frac:
        print(f"\noverhead: median {np.median(frac):.1%} of a run's wall time (range {min(frac):.1%}-{max(frac):.1%}); "
              f"one measurement {np.median(per):.3f} s = {np.median(per) / np.median(step):.1f} x the mean time "
              f"of one step with its share of evaluation ({np.median(step) * 1e3:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "summary": out}, indent=2))


if __name__ == "__main__":
    main()
