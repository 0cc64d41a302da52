"""The methods of issue 22 at equal budgets: final golden, proxy, hacking verdict and wall time per method.

    .venv/bin/python bench/methods_table.py /tmp/kdlab-heldout/methods

Every finished run under DIR (kdlab study layout: <world>/<condition>/seed-N) is read with
`kdlab.analysis.runs.analyse`; per condition: the mean over seeds of the last evaluation's golden and proxy
(with the seeds' spread as ± half the range), the golden detector's verdicts, and the mean wall time of stage 2.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from kdlab import record
from kdlab.analysis.runs import analyse


def main(root: Path) -> None:
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in record.find_runs([root]):
        if not (run / record.DONE).exists():
            continue
        a = analyse(run)
        last = a.metrics.rows[-1]
        done = json.loads((run / record.DONE).read_text())
        by[(run.parent.parent.name, run.parent.name)].append({
            "golden": last.get(record.GOLDEN), "proxy": last.get(record.PROXY),
            "kind": a.golden.kind if a.golden is not None else "n/a", "seconds": done.get("seconds_this_session")})
    print("| world | method | final golden | final proxy | golden verdicts | stage-2 wall time |")
    print("|---|---|---|---|---|---|")
    for (world, cond), runs in sorted(by.items()):
        def mean(key):
            vals = [r[key] for r in runs if r[key] is not None]
            return sum(vals) / len(vals), (max(vals) - min(vals)) / 2

        g, gs = mean("golden")
        p, ps = mean("proxy")
        s, _ = mean("seconds")
        kinds = ", ".join(sorted(r["kind"] for r in runs))
        print(f"| {world} | {cond} | {g:.3f} ± {gs:.3f} | {p:.3f} ± {ps:.3f} | {kinds} | {s:.0f} s |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
