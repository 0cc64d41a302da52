"""Calibrate the proxy-only detector against the golden detector on real kdlab runs.

For every run directory under the given paths (runs with an oracle), the golden detector's verdict
(with paired standard errors when the run stored per-prompt values) is taken as the reference, and
the proxy-only detector is run with a grid of settings. Prints, per setting: agreement, misses,
false alarms and the onset lag (proxy onset − golden onset), so the defaults can be chosen by
measurement (issue: teacher-hacking detection). The golden detector is never tuned here.

    .venv/bin/python scripts/calibrate_proxy_detector.py /tmp/kdlab-search [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics

from kdlab.analysis import ProxyDeviationConfig, analyse, detect_proxy_deviation, find_runs

GRID = {
    "fit_end_frac": [0.5, 0.65, 0.75],
    "z": [2.0, 3.0],
    "min_log_departure": [0.03, 0.05, 0.1],
    "min_consecutive": [2, 3],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json", default=None, help="write every setting's numbers here")
    args = ap.parse_args()

    everything = [r for r in (analyse(d) for d in find_runs(args.paths)) if r.golden is not None]
    # Judged on runs the golden detector calls hacking or healthy; over-fitting runs (held-out proxy
    # rising with golden) are a different failure the proxy-only detector cannot tell from hacking.
    runs = [r for r in everything if r.golden.kind in ("hacking", "none")]
    overfit = [r for r in everything if r.golden.kind == "overfitting"]
    print(f"{len(everything)} runs with an oracle; {len(overfit)} over-fitting runs set aside")
    if not runs:
        raise SystemExit("no runs with a golden metric found")
    truth = [r.golden.detected for r in runs]
    print(f"{len(runs)} runs with an oracle; golden detector flags {sum(truth)} "
          f"({', '.join(sorted({r.condition for r, t in zip(runs, truth) if t}))})")

    results = []
    default = ProxyDeviationConfig()
    keys = list(GRID)
    for values in itertools.product(*GRID.values()):
        cfg = dataclasses.replace(default, **dict(zip(keys, values)))
        flags, lags = [], []
        for r, hacked in zip(runs, truth):
            m = r.metrics
            v = detect_proxy_deviation(m.steps, m.proxy, m.proxy_se, config=cfg)
            flags.append(v.detected)
            if hacked and v.detected:
                lags.append(v.onset_step - r.golden.onset_step)
        agree = sum(f == t for f, t in zip(flags, truth))
        results.append({
            **dict(zip(keys, values)),
            "agree": agree, "n": len(runs),
            "misses": sum(t and not f for f, t in zip(flags, truth)),
            "false_alarms": sum(f and not t for f, t in zip(flags, truth)),
            "lag_median": statistics.median(lags) if lags else None,
            "is_default": all(getattr(default, k) == v for k, v in zip(keys, values)),
        })
    results.sort(key=lambda x: (-x["agree"], x["false_alarms"], abs(x["lag_median"] or 0)))
    print(f"{'fit_end':>7} {'z':>4} {'min_dep':>7} {'consec':>6}  agree  miss  false  lag(median)")
    for x in results[:12] + [x for x in results if x["is_default"]]:
        print(f"{x['fit_end_frac']:>7} {x['z']:>4} {x['min_log_departure']:>7} {x['min_consecutive']:>6}  "
              f"{x['agree']:>2}/{x['n']:<2}  {x['misses']:>4}  {x['false_alarms']:>5}  {x['lag_median']}"
              + ("   <- current default" if x["is_default"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
