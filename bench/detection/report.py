"""Detection report of the proxy-only detectors on the HELD-OUT families (issue 16): writes
bench/DETECTION.md. Every number in it is measured by this command:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/report.py [--n-hack 50] [--n-healthy 40]

Held-out runs come from bench/detection/heldout.py (not kdlab.analysis.synthetic), seeds from 100,000
up (the calibration used 0–9,999). The detector runs with its defaults (`SequentialConfig()`), which
were fixed from bench/detection/calibrate.py before this script was first run; the protocol and
success criteria were committed to docs/LOG.md before it too.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import heldout as H  # noqa: E402

from kdlab.analysis import detect_golden, detect_proxy_deviation  # noqa: E402
from kdlab.analysis.sequential import SequentialConfig, detect_proxy_sequential  # noqa: E402

ONSETS = (0.30, 0.45, 0.60, 0.75)
DEPARTURES = (0.05, 0.10, 0.15, 0.30)
SEED0 = 100_000


def columns(rows):
    col = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    return col("step"), col("proxy_fkl"), col("proxy_fkl_se"), col("golden_fkl"), col("golden_fkl_se"), col("lr_sum")


def run_detectors(run) -> dict:
    s, p, pse, g, gse, lr_sum = columns(run["rows"])
    seq = detect_proxy_sequential(s, p, pse, lr_sum=lr_sum)
    trace = detect_proxy_sequential(s, p, pse, lr_sum=lr_sum, config=SequentialConfig(break_chi2=np.inf))
    # The largest break_chi2 at which this run would have alarmed (persist 1): for the diagnostic sweep.
    flagged = trace.statistics[trace.departures > trace.config.min_log_departure]
    top = float(flagged.max()) if len(flagged) else -np.inf
    seq_step = detect_proxy_sequential(s, p, pse)  # the same detector on the step axis (no schedule)
    old = detect_proxy_deviation(s, p, pse)
    gold = detect_golden(s, g, gse, p, pse)
    return dict(top=top, seq=seq.detected, seq_step=seq_step.detected, old=old.detected, golden=gold.kind,
                onset=seq.onset_step, interval=seq.onset_interval, steps=s)


def rate(hits, n):
    p = hits / n if n else float("nan")
    return p, (np.sqrt(p * (1 - p) / n) if n else float("nan"))


def fmt(hits, n):
    p, _ = rate(hits, n)
    return f"{p:.0%} ({hits}/{n})"


REAL_RUNS_MARKER = "## Agreement with the golden detector on kdlab and TRL runs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-hack", type=int, default=50, help="held-out hacking runs per (onset, departure) cell")
    ap.add_argument("--n-healthy", type=int, default=40, help="held-out healthy runs per (family, schedule) cell")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "DETECTION.md"))
    args = ap.parse_args()
    t0 = time.time()
    seed = SEED0
    hack = []
    for onset, dep in itertools.product(ONSETS, DEPARTURES):
        for _ in range(args.n_hack):
            run = H.make_run(np.random.default_rng(seed), kind="hacking", onset_frac=onset, departure=dep)
            hack.append((onset, dep, run["truth"], run_detectors(run)))
            seed += 1
    healthy = []
    for family, sched in itertools.product(H.HEALTHY, H.SCHEDULES):
        for _ in range(args.n_healthy):
            run = H.make_run(np.random.default_rng(seed), kind="healthy", family=family, sched=sched)
            healthy.append((family, sched, run["truth"], run_detectors(run)))
            seed += 1
    elapsed = time.time() - t0

    out = []
    w = out.append
    cfg = SequentialConfig()
    w("# Proxy-only detection on held-out curves (issue 16)\n")
    w(f"Produced by `bench/detection/report.py --n-hack {args.n_hack} --n-healthy {args.n_healthy}` "
      f"({len(hack)} hacking and {len(healthy)} healthy held-out runs, seeds {SEED0}–{seed - 1}, {elapsed:.0f} s). "
      "Generators: `bench/detection/heldout.py` (independent of `kdlab.analysis.synthetic`, on which the "
      "thresholds were chosen by `bench/detection/calibrate.py`; protocol in docs/LOG.md).\n")
    w(f"Detector: `detect_proxy_sequential` with its defaults: {', '.join(f'{k}={v}' for k, v in vars(cfg).items())}; "
      "time axis = cumulative learning rate (`lr_sum`). For comparison: the same detector on the step axis, "
      "and the old fixed-window detector (`detect_proxy_deviation`).\n")

    w("## Detection rate by onset position and departure size (held-out hacking runs)\n")
    w("Onset: fraction of the log-step range; departure: log units at the last evaluation. "
      "Each cell mixes schedules, departure shapes and grids at random.\n")
    w("| onset \\ departure | " + " | ".join(f"{d:.2f}" for d in DEPARTURES) + " |")
    w("|---" * (len(DEPARTURES) + 1) + "|")
    for onset in ONSETS:
        cells = []
        for dep in DEPARTURES:
            sub = [h for h in hack if h[0] == onset and h[1] == dep]
            cells.append(fmt(sum(h[3]["seq"] for h in sub), len(sub)))
        w(f"| {onset:.2f} | " + " | ".join(cells) + " |")
    w("")
    target = [h for h in hack if h[1] >= 0.15]
    t_hits = sum(h[3]["seq"] for h in target)
    p, se = rate(t_hits, len(target))
    cell_rates = [rate(sum(h[3]["seq"] for h in hack if h[0] == o and h[1] == d), args.n_hack)[0]
                  for o in ONSETS for d in DEPARTURES if d >= 0.15]
    w(f"**Target: ≥ 90 % for onsets ≥ 0.30 with departure ≥ 0.15** — measured {p:.1%} ± {se:.1%} pooled "
      f"({t_hits}/{len(target)}), lowest cell {min(cell_rates):.0%}: "
      f"**{'met' if p >= 0.9 and min(cell_rates) >= 0.9 else 'missed'}**.\n")
    w("Same runs, other detectors (departure ≥ 0.15, all onsets pooled):\n")
    w("| detector | detection |")
    w("|---|---|")
    w(f"| sequential, cumulative-lr time (default) | {fmt(t_hits, len(target))} |")
    w(f"| sequential, step time | {fmt(sum(h[3]['seq_step'] for h in target), len(target))} |")
    w(f"| old fixed-window detector | {fmt(sum(h[3]['old'] for h in target), len(target))} |")
    w(f"| golden detector (kind = hacking) | {fmt(sum(h[3]['golden'] == 'hacking' for h in target), len(target))} |")
    w("")
    w("By departure shape and by schedule (departure ≥ 0.15):\n")
    w("| ramp | detection | | schedule | detection |")
    w("|---|---|---|---|---|")
    for ramp, sched in itertools.zip_longest(H.RAMPS, H.SCHEDULES):
        a = [h for h in target if h[2]["ramp"] == ramp] if ramp else []
        b = [h for h in target if h[2]["schedule"] == sched] if sched else []
        w(f"| {ramp or ''} | {fmt(sum(h[3]['seq'] for h in a), len(a)) if a else ''} | | {sched or ''} | "
          f"{fmt(sum(h[3]['seq'] for h in b), len(b)) if b else ''} |")
    w("")
    det = [h for h in hack if h[3]["seq"]]
    covered, lags = 0, []
    for onset, dep, truth, r in det:
        lo, hi = r["interval"]
        s = r["steps"]
        # One evaluation of slack: the break is placed at an evaluation, the true onset lies between two.
        i_lo, i_hi = max(np.searchsorted(s, lo) - 1, 0), min(np.searchsorted(s, hi) + 1, len(s) - 1)
        covered += s[i_lo] <= truth["onset_step"] <= s[i_hi]
        pos = s[s > 0]
        span = np.log(pos[-1]) - np.log(pos[0])
        lags.append((np.log(r["onset"]) - np.log(truth["onset_step"])) / span)
    if det:
        w(f"Onset: the {cfg.onset_ci:.0%} interval (± one evaluation) holds the true onset in "
          f"{fmt(covered, len(det))} of detected runs; median onset error {statistics.median(lags):+.3f} of the "
          f"log-step range (IQR {np.percentile(lags, 25):+.3f} to {np.percentile(lags, 75):+.3f}).\n")

    w("## False alarms on held-out healthy runs\n")
    w("| family \\ schedule | " + " | ".join(H.SCHEDULES) + " | all |")
    w("|---" * (len(H.SCHEDULES) + 2) + "|")
    for family in H.HEALTHY:
        sub = [h for h in healthy if h[0] == family]
        cells = [fmt(sum(h[3]["seq"] for h in sub if h[1] == sc), sum(h[1] == sc for h in sub)) for sc in H.SCHEDULES]
        w(f"| {family} | " + " | ".join(cells) + f" | {fmt(sum(h[3]['seq'] for h in sub), len(sub))} |")
    cells = [fmt(sum(h[3]["seq"] for h in healthy if h[1] == sc), sum(h[1] == sc for h in healthy)) for sc in H.SCHEDULES]
    w("| **all** | " + " | ".join(cells) + f" | {fmt(sum(h[3]['seq'] for h in healthy), len(healthy))} |")
    w("")

    def premise(h):  # the early window shows the law (as in the calibration's constrained families)
        frac = h[2].get("plateau_frac")
        return frac is None or frac < 0.25

    inside = [h for h in healthy if premise(h)]
    outside = [h for h in healthy if not premise(h)]
    w("Plateau families split by where the plateau arrives (fraction of the log-time range; < 0.25 = inside the "
      "early window, the detector's premise; later plateaus bend where a departure bends):\n")
    w("| healthy subset | " + " | ".join(H.SCHEDULES) + " | all |")
    w("|---" * (len(H.SCHEDULES) + 2) + "|")
    for name, sub in (("premise holds (no plateau, or plateau < 0.25)", inside), ("plateau ≥ 0.25", outside)):
        cells = [fmt(sum(h[3]["seq"] for h in sub if h[1] == sc), sum(h[1] == sc for h in sub)) for sc in H.SCHEDULES]
        w(f"| {name} | " + " | ".join(cells) + f" | {fmt(sum(h[3]['seq'] for h in sub), len(sub))} |")
    w("")
    worst_all = max(rate(sum(h[3]["seq"] for h in healthy if h[1] == sc), sum(h[1] == sc for h in healthy))[0]
                    for sc in H.SCHEDULES)
    worst_in = max(rate(sum(h[3]["seq"] for h in inside if h[1] == sc), sum(h[1] == sc for h in inside))[0]
                   for sc in H.SCHEDULES)
    w(f"**Target: ≤ 5 % false alarms on healthy curves, every schedule shape** — worst schedule over all healthy "
      f"runs {worst_all:.1%} (**{'met' if worst_all <= 0.05 else 'missed'}**); over the runs where the premise holds "
      f"{worst_in:.1%} (**{'met' if worst_in <= 0.05 else 'missed'}**).\n")
    w("The same healthy runs with the other detectors:\n")
    w("| detector | " + " | ".join(H.SCHEDULES) + " |")
    w("|---" * (len(H.SCHEDULES) + 1) + "|")
    for key, name in (("seq", "sequential, cumulative-lr time"), ("seq_step", "sequential, step time"),
                      ("old", "old fixed-window"), ("golden", "golden detector (any rise)")):
        hit = (lambda r: r[key] != "none") if key == "golden" else (lambda r: r[key])
        cells = [fmt(sum(hit(h[3]) for h in healthy if h[1] == sc), sum(h[1] == sc for h in healthy)) for sc in H.SCHEDULES]
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")

    w("## Diagnostic after the run: every break_chi2 of the calibration grid on the held-out runs\n")
    w("Computed after the held-out numbers above were seen and **not used to choose anything** (the default stays "
      "the calibration's choice). It says whether another threshold of this detector would have met the targets "
      "(persist 1, transient null on, as the default).\n")
    w("| break_chi2 | detection (departure ≥ 0.15) | false alarms, worst schedule | false alarms, all healthy |")
    w("|---|---|---|---|")
    for b in (2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0):
        d = sum(h[3]["top"] > b for h in target)
        worst = max(rate(sum(h[3]["top"] > b for h in healthy if h[1] == sc), sum(h[1] == sc for h in healthy))[0]
                    for sc in H.SCHEDULES)
        fa = sum(h[3]["top"] > b for h in healthy)
        w(f"| {b:g}{' (default)' if b == cfg.break_chi2 else ''} | {fmt(d, len(target))} | {worst:.1%} | {fmt(fa, len(healthy))} |")
    w("")
    w("## Agreement with the golden detector (held-out synthetic runs)\n")
    both = [h for h in hack if h[1] >= 0.15] + healthy
    agree = sum((h[3]["golden"] == "hacking") == h[3]["seq"] for h in both)
    w(f"On the hacking runs with departure ≥ 0.15 and every healthy run: proxy-only and golden verdicts agree on "
      f"{fmt(agree, len(both))}. These are synthetic runs, not kdlab runs of worlds outside the calibration: "
      "that agreement target is not measured here.\n")
    # Sections after the marker are the agreement on real runs (bench/detection/agreement.py): kept as they are.
    previous = Path(args.out).read_text(encoding="utf-8") if Path(args.out).exists() else ""
    kept = previous[previous.index(REAL_RUNS_MARKER):] if REAL_RUNS_MARKER in previous else ""
    Path(args.out).write_text("\n".join(out) + "\n" + ("\n" + kept if kept else ""), encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
