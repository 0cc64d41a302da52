"""The closed-loop controller against fixed regimes at equal budgets (issue 20, item 3; protocol F in docs/LOG.md).

    .venv/bin/python bench/controller_eval.py /tmp/kdlab-heldout/controller [--figure docs/img/controller-eval.png]

Per (world, seed): the final golden of each condition — the last evaluation's golden_fkl, or for a run the
controller stopped, the golden of the weights it restored (done.json). Fixed regimes at the controller's
teacher-sample budget (768 + 768): offline 768x1 and 1536x1; the online-teacher control (96,000 teacher samples)
is shown as a reference, not as an equal budget. Regret = controller − best fixed regime of equal budget in
hindsight, "within 1 SE" with the SEs of the two final goldens in quadrature; gain over plain offline 768x1;
false actions (actions where the same world and seed without the controller shows no golden rise); the
controller's seconds over the run's.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from kdlab import record
from kdlab.analysis.runs import analyse

FIXED = ("768x1", "1536x1")
CONTROLLED = ("refresh-any", "refresh-proxy", "stop-any")  # online-stop-any is counted for false actions only


def final(run: Path) -> tuple[float, float, dict]:
    done = json.loads((run / record.DONE).read_text())
    rows = record.read_metrics(run / record.METRICS).rows
    last = rows[-1]
    ctl = done.get("controller") or {}
    golden, se = last.get(record.GOLDEN), last.get(record.se_column(record.GOLDEN))
    if ctl.get("stopped_early") and ctl.get("stop", {}).get("restored_golden_fkl") is not None:
        restored = ctl["stop"]["restored_step"]
        row = next((r for r in rows if r[record.STEP] == restored), last)
        golden, se = ctl["stop"]["restored_golden_fkl"], row.get(record.se_column(record.GOLDEN), se)
    return float(golden), float(se), {**ctl, "wall": done.get("seconds_this_session")}


def figure(table: dict, path: Path) -> None:
    """Final golden (± 1 SE) of every condition, one column of points per (world, seed), at a column's width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = ["768x1", "1536x1", "control", *CONTROLLED]
    keys = sorted(table)
    fig, ax = plt.subplots(figsize=(3.4, 2.4), dpi=200)
    for j, cond in enumerate(conds):
        xs, ys, es = [], [], []
        for i, k in enumerate(keys):
            v = table[k].get(cond)
            if v is not None:
                xs.append(i + (j - len(conds) / 2) * 0.1)
                ys.append(v["golden"])
                es.append(v["se"])
        ax.errorbar(xs, ys, yerr=es, fmt="o", ms=2.5, lw=0.8, label=cond)
    ax.set_xticks(range(len(keys)), [f"w{k[0][-3:]}/{k[1][-1]}" for k in keys], fontsize=6)
    ax.set_ylabel("final golden (nats/response)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=5, ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {path}")


def main(root: Path, figure_path: Path | None = None) -> None:
    table: dict[tuple, dict] = defaultdict(dict)
    for run in record.find_runs([root]):
        if not (run / record.DONE).exists():
            continue
        cond, seed, world = run.parent.name, run.name, run.parent.parent.name
        g, se, ctl = final(run)
        a = analyse(run)
        rise = a.golden is not None and a.golden.kind in ("hacking", "overfitting")
        table[(world, seed)][cond] = {"golden": g, "se": se, "ctl": ctl, "rise": rise,
                                      "kind": a.golden.kind if a.golden else None}
    print("| world / seed | " + " | ".join(("768x1", "1536x1", "control (96k)", *CONTROLLED)) + " |")
    print("|---|" + "---|" * (3 + len(CONTROLLED)))
    regrets = defaultdict(list)
    for key in sorted(table):
        t = table[key]
        cells = []
        for cond in ("768x1", "1536x1", "control", *CONTROLLED):
            v = t.get(cond)
            if v is None:
                cells.append("–")
                continue
            acts = f", {v['ctl'].get('actions', 0)} act." if cond in CONTROLLED else ""
            cells.append(f"{v['golden']:.3f} ± {v['se']:.3f} ({v['kind']}{acts})")
        print(f"| {key[0]} / {key[1]} | " + " | ".join(cells) + " |")
        fixed = [(t[c]["golden"], t[c]["se"], c) for c in FIXED if c in t]
        if not fixed:
            continue
        best = min(fixed)
        for cond in CONTROLLED:
            if cond in t:
                c = t[cond]
                regret = c["golden"] - best[0]
                within = regret <= math.hypot(c["se"], best[1])
                gain = t["768x1"]["golden"] - c["golden"] if "768x1" in t else None
                regrets[cond].append((regret, within, gain, t["768x1"]["rise"] if "768x1" in t else None))
    print()
    for cond, rs in regrets.items():
        n = len(rs)
        within = sum(w for _, w, _, _ in rs)
        hacking_pairs = [(g) for _, _, g, rise in rs if rise]
        better = sum(g is not None and g > 0 for g in hacking_pairs)
        mean_regret = sum(r for r, _, _, _ in rs) / n
        print(f"{cond}: regret mean {mean_regret:+.3f}; within 1 SE of the best fixed regime on {within}/{n} "
              f"(world, seed) pairs; better than plain offline on {better}/{len(hacking_pairs)} pairs where "
              f"offline's golden rises")
    # A false action: an action in a setting that never hacks — the same (world, seed) without the controller
    # shows no golden rise (plain offline 768x1 for the offline conditions, the plain control for online-stop-any).
    reference = {**{c: "768x1" for c in CONTROLLED}, "online-stop-any": "control"}
    settled = [(k, c, t[c]["ctl"].get("actions", 0)) for k, t in table.items() for c in reference
               if c in t and reference[c] in t and not t[reference[c]]["rise"]]
    false = [(k, c) for k, c, n in settled if n > 0]
    print(f"false actions (an action where the run without the controller has no golden rise): "
          f"{len(false)}/{len(settled)} runs: {false}")
    if figure_path is not None:
        figure(table, figure_path)
    over = [v["ctl"]["seconds_this_session"] / v["ctl"]["wall"] for t in table.values() for c, v in t.items()
            if v["ctl"].get("seconds_this_session") is not None and v["ctl"].get("wall")]
    if over:
        print(f"controller overhead: median {sorted(over)[len(over) // 2]:.1%} of a run's wall time "
              f"(max {max(over):.1%})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--figure") + 1]) if "--figure" in sys.argv else None)
