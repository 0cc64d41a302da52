"""Summarise runs under a directory: golden/proxy detectors (kdlab defaults), one line per run,
then mean over seeds per condition.  usage: summarize.py DIR [--budget STEPS]  (--budget truncates
the curves at STEPS to re-judge the same runs at a smaller budget)."""
import json, sys
from collections import defaultdict
from pathlib import Path
import numpy as np
from kdlab.analysis import detect_golden, detect_proxy_deviation

root = Path(sys.argv[1])
budget = int(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else None
by = defaultdict(list)
print(f"{'run':32s} {'T_gold':>6s} {'g0':>6s} {'gmin@step':>14s} {'gend':>6s} {'rise±SE':>14s} {'z':>5s} {'kind':>11s} "
      f"{'dproxy±SE':>15s} {'trainpx':>13s} {'pxdet':>5s} {'pxres':>6s} {'ep':>6s} {'sec':>5s}")
for m in sorted(root.glob("**/metrics.jsonl")):
    d = m.parent
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    if budget:
        rows = [r for r in rows if r["step"] <= budget]
    if len(rows) < 6:
        continue
    col = lambda k: np.array([np.nan if r.get(k) is None else r[k] for r in rows], float)
    s = col("step")
    g = detect_golden(s, col("golden_fkl"), col("golden_fkl_se"), col("proxy_fkl"), col("proxy_fkl_se"))
    p = detect_proxy_deviation(s, col("proxy_fkl"), col("proxy_fkl_se"))
    w = json.loads((d / "world.json").read_text()) if (d / "world.json").exists() else {}
    done = json.loads((d / "done.json").read_text()) if (d / "done.json").exists() else {}
    tp = col("train_proxy_fkl")
    tpx = f"{np.nanmin(tp):.2f}->{tp[-1]:.2f}" if np.isfinite(tp).any() else "-"
    name = str(d.relative_to(root))
    ep = rows[-1].get("epochs")
    print(f"{name:32s} {w.get('teacher_golden_fkl', np.nan):6.2f} {rows[0]['golden_fkl']:6.2f} "
          f"{g.min_value:6.2f}@{g.min_step:<7d} {g.end_value:6.2f} {g.rise:+6.2f}±{g.rise_se:5.2f} {g.rise_z:5.1f} {g.kind:>11s} "
          f"{(g.proxy_change or 0):+7.2f}±{(g.proxy_change_se or 0):5.2f} {tpx:>13s} {str(p.detected)[0]:>5s} "
          f"{(p.residual_at_end if p.residual_at_end is not None else np.nan):+6.2f} {ep if ep is not None else '-':>6} {done.get('seconds_this_session', '-'):>5}")
    cond = d.parent.name if d.name.startswith("seed-") else d.name
    by[cond].append((g, p))
print("\ncondition: mean rise, golden detections, overfit, proxy detections")
for c, v in by.items():
    print(f"  {c:28s} rise {np.mean([g.rise for g, _ in v]):+.3f}  golden {sum(g.detected for g, _ in v)}/{len(v)}  "
          f"overfit {sum(g.kind == 'overfitting' for g, _ in v)}/{len(v)}  proxy {sum(p.detected for _, p in v)}/{len(v)}")
