"""Proxy-only detectors against the golden detector on kdlab runs (issue 16, protocol C in docs/LOG.md).

    .venv/bin/python bench/detection/agreement.py DIR [DIR ...] [--split KEY] [--json OUT]

Every finished run (a run directory with done.json) under each DIR is analysed by
`kdlab.analysis.runs.analyse` (what `kdlab detect` and `kdlab report` run). The golden detector's verdict is
the reference: `detected` (any golden rise: hacking or over-fitting); secondary: the paper's hacking. For
the default proxy-only detector (`detect_proxy_deviation`) and the experimental sequential one it prints
agreement, detection (on golden-detected runs), false alarms (on the others), and the median onset lag on runs
where both fire, in fractions of the run's log-step range (positive: the proxy-only detector is later). A
sequential verdict of "not tested" (too few evaluations) counts as not detected. Thresholds: the detectors'
defaults, unchanged. `--split stage2.lr_schedule` (protocol D) also reports each value of that config key as
its own set.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from kdlab import record
from kdlab.analysis.runs import analyse


def _frac(step, steps) -> float | None:
    """`step` as a fraction of the run's log-step range (steps > 0)."""
    pos = [s for s in steps if s > 0]
    if step is None or not pos or step <= 0:
        return None
    lo, hi = math.log(min(pos)), math.log(max(pos))
    return (math.log(step) - lo) / (hi - lo) if hi > lo else None


def config_value(config: dict, key: str):
    """`key` (dotted, e.g. stage2.lr_schedule) in a run's resolved config, or None."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def judge(run_dir: Path, split: str | None = None) -> dict:
    a = analyse(run_dir)
    steps = [int(s) for s in a.metrics.steps]
    g = a.golden
    seq = a.sequential
    return {
        "run": str(run_dir),
        "condition": a.condition,
        # Protocol C's reference: any golden rise the golden detector confirms, hacking or over-fitting
        # (its `detected` flag is set for hacking only).
        "golden": bool(g is not None and g.kind in ("hacking", "overfitting")),
        "golden_kind": g.kind if g is not None else None,
        "paper_hacking": bool(g is not None and g.kind == "hacking"),
        "golden_onset": _frac(g.onset_step, steps) if g is not None and g.kind in ("hacking", "overfitting") else None,
        "proxy": bool(a.proxy.detected),
        "proxy_onset": _frac(a.proxy.onset_step, steps) if a.proxy.detected else None,
        "sequential": bool(seq is not None and seq.detected),
        "sequential_onset": _frac(seq.onset_step, steps) if seq is not None and seq.detected else None,
        "split": config_value(a.config, split) if split else None,
    }


def _rate(hits: int, n: int) -> str:
    return f"{hits / n:.0%} ({hits}/{n})" if n else "– (0/0)"


def summarise(rows: list[dict], reference: str = "golden") -> dict[str, dict]:
    out = {}
    for det in ("proxy", "sequential"):
        agree = sum(r[det] == r[reference] for r in rows)
        pos = [r for r in rows if r[reference]]
        neg = [r for r in rows if not r[reference]]
        lags = [r[f"{det}_onset"] - r["golden_onset"] for r in pos
                if r[det] and r[f"{det}_onset"] is not None and r["golden_onset"] is not None]
        out[det] = {"agreement": _rate(agree, len(rows)), "agreement_frac": agree / len(rows) if rows else None,
                    "detection": _rate(sum(r[det] for r in pos), len(pos)),
                    "false_alarms": _rate(sum(r[det] for r in neg), len(neg)),
                    "median_lag": float(np.median(lags)) if lags else None, "n_lag": len(lags)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep, study or search directories of kdlab runs")
    ap.add_argument("--split", help="also report each value of this config key (e.g. stage2.lr_schedule) as a set")
    ap.add_argument("--json", type=Path, help="write every run's verdicts and the summaries here")
    args = ap.parse_args(argv)
    sets: dict[str, list[dict]] = {}
    for d in args.dirs:
        # finished kdlab runs, and monitor logs of trainer runs that ended (trl_runs.py writes trl_run.json last)
        runs = [p for p in record.find_runs([d]) if (p / record.DONE).exists() or (p / "trl_run.json").exists()]
        sets[d.name] = [judge(p, args.split) for p in runs]
    pooled = [r for rows in list(sets.values()) for r in rows]
    if args.split:
        for value in sorted({str(r["split"]) for r in pooled}):
            sets[f"{args.split}={value}"] = [r for r in pooled if str(r["split"]) == value]
    sets["pooled"] = pooled
    table = ["| set | runs | golden rises (hacking) | detector | agreement | detection | false alarms | median onset lag (n) |",
             "|---|---|---|---|---|---|---|---|"]
    summaries = {}
    for name, rows in sets.items():
        s = summaries[name] = summarise(rows)
        n_g, n_h = sum(r["golden"] for r in rows), sum(r["paper_hacking"] for r in rows)
        for det, label in (("proxy", "proxy-only (default)"), ("sequential", "sequential (experimental)")):
            v = s[det]
            lag = f"{v['median_lag']:+.2f} ({v['n_lag']})" if v["median_lag"] is not None else "–"
            table.append(f"| {name} | {len(rows)} | {n_g} ({n_h}) | {label} | {v['agreement']} | {v['detection']} | "
                         f"{v['false_alarms']} | {lag} |")
    print("\n".join(table))
    pooled = summaries["pooled"]["proxy"]["agreement_frac"]
    print(f"\nProtocol C success (pooled agreement of the default proxy-only detector >= 90 %): "
          f"{'MET' if pooled is not None and pooled >= 0.9 else 'NOT MET'} ({pooled:.1%})")
    by_kind = {}
    for r in sets["pooled"]:
        key = (r["golden_kind"] or "none", r["proxy"])
        by_kind[key] = by_kind.get(key, 0) + 1
    print("golden kind x proxy-only fired:", {f"{k[0]}/{'fired' if k[1] else 'silent'}": v for k, v in sorted(by_kind.items())})
    if args.json:
        args.json.write_text(json.dumps({"sets": sets, "summaries": summaries}, indent=2))


if __name__ == "__main__":
    main()
