"""False-alarm and firing rates of the drift-panel alarms on finished runs (issue 21, protocol E in docs/LOG.md).

    .venv/bin/python bench/detection/alarm_rates.py DIR [DIR ...]

Every finished kdlab run (done.json) under each DIR that logged the drift panel is read with
`kdlab.analysis.runs.analyse`. A run is *healthy* when the golden detector confirms no golden rise (neither
hacking nor over-fitting); a false alarm is an alarm that fires on a healthy run. Printed per alarm: fired on
healthy runs / healthy runs (the false-alarm rate) and fired on the other runs; and per regime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdlab import record
from kdlab.analysis.alarms import ALARMS
from kdlab.analysis.runs import analyse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    runs = [analyse(p) for p in record.find_runs(args.dirs) if (p / record.DONE).exists()]
    runs = [a for a in runs if a.alarms]
    healthy = [a for a in runs if a.golden is None or a.golden.kind not in ("hacking", "overfitting")]
    other = [a for a in runs if a not in healthy]
    print(f"{len(runs)} runs with the drift panel: {len(healthy)} healthy (no golden rise), {len(other)} with one")
    print("| alarm | false alarms (healthy runs) | fired on runs with a golden rise | evaluable |")
    print("|---|---|---|---|")
    for name in ALARMS:
        ev = [a for a in runs if name in a.alarms]
        fa = sum(a.alarms[name].fired for a in healthy if name in a.alarms)
        n_h = sum(name in a.alarms for a in healthy)
        fo = sum(a.alarms[name].fired for a in other if name in a.alarms)
        n_o = sum(name in a.alarms for a in other)
        print(f"| {name} | {fa}/{n_h} | {fo}/{n_o} | {len(ev)} runs |")
    for regime in sorted({str(a.regime) for a in runs}):
        sub = [a for a in healthy if str(a.regime) == regime]
        fired = sum(any(v.fired for v in a.alarms.values()) for a in sub)
        print(f"regime {regime}: {fired}/{len(sub)} healthy runs with any alarm")
    # lead time over the golden detector where both fire (fractions of the log-step range; positive = earlier)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from agreement import _frac

    def at(step, steps):  # an onset at step 0 (the first evaluation) sits at the start of the range
        return 0.0 if step == 0 else _frac(step, steps)

    for name in ALARMS:
        leads = []
        for a in other:
            v = a.alarms.get(name)
            steps = [int(s) for s in a.metrics.steps]
            if v is not None and v.fired and a.golden is not None and a.golden.onset_step is not None:
                leads.append(at(a.golden.onset_step, steps) - at(v.onset_step, steps))
        if leads:
            print(f"lead of {name} over the golden detector: median {sorted(leads)[len(leads) // 2]:+.2f} (n = {len(leads)})")
    for a in runs:
        fired = {n: v.onset_step for n, v in a.alarms.items() if v.fired}
        print(f"  {a.path}: golden {a.golden.kind if a.golden else 'n/a'}; alarms {fired or 'none'}")


if __name__ == "__main__":
    main()
