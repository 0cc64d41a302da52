"""Choose the sequential proxy-only detector's thresholds on the CALIBRATION set only (issue 16).

Calibration set: curves from `kdlab.analysis.synthetic` (the generator the old detector was tuned
on), seeds 0–9,999 of this script (the held-out report uses other generators and seeds ≥ 100,000):
  healthy: its clean families "power", "floor" (plateau) and "transient", `n_clean` curves each;
  hacking: `hacking_run` with the proxy leaving its law at onset fractions 0.30–0.75 of the
           log-step range and departures 0.05–0.30 log units, `n_hack` runs per cell.
No learning-rate schedule is in it: the time axis (cumulative learning rate) is what is meant to
take care of schedules, and the held-out set checks that.

Grid: break_chi2 ∈ {2, 3, 4, 6, 8, 10, 14, 20} (penalty of the broken power law) × persist ∈ {1, 2, 3}
(consecutive flagged evaluations) × transient_null ∈ {True, False}. Fixed beforehand, not searched:
min_log_departure = 0.05 and skip_frac = 0.15 (the old detector's values), warmup_points = 6 (issue 16's
"after 6 evaluations"). The statistic and the departure at each evaluation do not depend on the
thresholds, so the detector runs once per curve and transient_null, and every (break_chi2, persist)
is read off its trace.

Selection rule (fixed before any held-out number was seen, docs/LOG.md protocol):
  1. keep the settings whose false-alarm rate is ≤ 3 % (a margin under the issue's 5 % target) on
     every calibration healthy family whose early window shows its law: "power"; "floor-early",
     plateau step in the first 25 % of the log-step range; "transient-early", the early bump or dip
     below 5 % by the step at 25 % of the range (|b| e^(−s/τ) < 0.05). The others, "floor-late"
     (plateau at 25–50 %) and "transient-late", bend where a departure at 0.30–0.50 bends, after
     the early window: the detector's premise (a short early window gives the law) does not hold
     for them, so their false-alarm rates are reported, not constrained (docs/LOG.md, issue 16);
  2. among them take the highest mean detection over the cells onset ≥ 0.30, departure ≥ 0.15;
     ties: the larger break_chi2, then the larger persist, then transient_null on.
  If no setting passes 1, take the one with the lowest worst-family false-alarm rate (ties: 2).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/calibrate.py --out bench/detection/calibration.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from kdlab.analysis import synthetic as syn
from kdlab.analysis.sequential import SequentialConfig, detect_proxy_sequential

ONSETS = (0.30, 0.45, 0.60, 0.75)
DEPARTURES = (0.05, 0.10, 0.15, 0.30)
BREAKS = (2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0)
PERSIST = (1, 2, 3)
TRANSIENT = (True, False)
FA_LIMIT = 0.03


def alarms(steps, values, se, transient_null) -> dict:
    """(break_chi2, persist) -> True when the detector would alarm on this curve."""
    cfg = SequentialConfig(break_chi2=np.inf, transient_null=transient_null)
    v = detect_proxy_sequential(steps, values, se, config=cfg)
    out = {}
    for b in BREAKS:
        flags = (v.statistics > b) & (v.departures > cfg.min_log_departure)
        run, longest = 0, 0
        for f in flags:
            run = run + 1 if f else 0
            longest = max(longest, run)
        for p in PERSIST:
            out[(b, p)] = longest >= p
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-clean", type=int, default=300)
    ap.add_argument("--n-hack", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    curves = []  # (group, cell, steps, values, se)
    seed = 0
    for family in ("power", "floor", "transient"):
        for _ in range(args.n_clean):
            c = syn.clean_curve(np.random.default_rng(seed), family)
            quarter = c.steps[-1] ** 0.25  # the step at 25 % of the log-step range (from step 1)
            if family == "floor":
                early = np.log(c.params["plateau_step"]) / np.log(c.steps[-1]) < 0.25
                family = "floor-early" if early else "floor-late"
            elif family == "transient":
                early = abs(c.params["b"]) * np.exp(-quarter / c.params["tau"]) < 0.05
                family = "transient-early" if early else "transient-late"
            curves.append(("healthy", family, c.steps, c.values, c.se))
            family = family.split("-")[0]
            seed += 1
    for onset, dep in itertools.product(ONSETS, DEPARTURES):
        for _ in range(args.n_hack):
            r = syn.hacking_run(np.random.default_rng(seed), onset_frac=onset, departure=dep)
            curves.append(("hacking", f"{onset:.2f}/{dep:.2f}", r.steps, r.proxy.values, r.proxy.se))
            seed += 1
    assert seed < 10_000, "calibration seeds are 0-9,999"
    hits: dict = {}  # (break_chi2, persist, transient_null) -> {cell: [hits, n]}
    for group, cell, s, y, se in curves:
        for tn in TRANSIENT:
            for (b, p), fired in alarms(s, y, se, tn).items():
                tally = hits.setdefault((b, p, tn), {}).setdefault(f"{group}:{cell}", [0, 0])
                tally[0] += fired
                tally[1] += 1
    rows = []
    for key, cells in hits.items():
        fa = {c.split(":")[1]: v[0] / v[1] for c, v in cells.items() if c.startswith("healthy")}
        det = {c.split(":")[1]: v[0] / v[1] for c, v in cells.items() if c.startswith("hacking")}
        target = [r for c, r in det.items() if float(c.split("/")[1]) >= 0.15]
        constrained = [v for f, v in fa.items() if not f.endswith("-late")]
        rows.append(dict(break_chi2=key[0], persist=key[1], transient_null=key[2], false_alarms=fa,
                         detection=det, target_mean=float(np.mean(target)), worst_fa=max(constrained)))
    passing = [r for r in rows if r["worst_fa"] <= FA_LIMIT]
    if passing:
        chosen = max(passing, key=lambda r: (r["target_mean"], r["break_chi2"], r["persist"], r["transient_null"]))
    else:
        chosen = min(rows, key=lambda r: (r["worst_fa"], -r["target_mean"], -r["break_chi2"], -r["persist"], -r["transient_null"]))
    print(f"{len(curves)} calibration curves, {len(rows)} settings, {len(passing)} pass FA ≤ {FA_LIMIT:.0%}; "
          f"{time.time() - t0:.0f} s")
    for r in sorted(rows, key=lambda r: (-r["target_mean"]))[:15]:
        print(f"break_chi2={r['break_chi2']:<4} persist={r['persist']} transient_null={r['transient_null']!s:5} "
              f"FA {', '.join(f'{f} {v:.1%}' for f, v in r['false_alarms'].items())}  target-cell detection {r['target_mean']:.1%}")
    print("chosen:", json.dumps({k: chosen[k] for k in ("break_chi2", "persist", "transient_null")}))
    print("  false alarms:", {f: f"{v:.1%}" for f, v in chosen["false_alarms"].items()})
    print("  detection:", {c: f"{v:.0%}" for c, v in chosen["detection"].items()})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"n_clean": args.n_clean, "n_hack": args.n_hack, "fa_limit": FA_LIMIT, "chosen": chosen,
                       "settings": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
