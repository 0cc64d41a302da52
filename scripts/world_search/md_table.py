"""Markdown table of a study directory: one row per condition, per-seed golden rise ± SE, kind and
proxy-only verdict (kdlab detectors, default thresholds).  usage: md_table.py DIR [--budget STEPS]"""
import json, sys
from collections import defaultdict
from pathlib import Path
import numpy as np
from kdlab.analysis import detect_golden, detect_proxy_deviation

root = Path(sys.argv[1])
budget = int(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else None
by = defaultdict(list)
for m in sorted(root.glob("*/seed-*/metrics.jsonl")):
    if not (m.parent / "done.json").exists():
        continue
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    if budget:
        rows = [r for r in rows if r["step"] <= budget]
    col = lambda k: np.array([np.nan if r.get(k) is None else r[k] for r in rows], float)
    s = col("step")
    g = detect_golden(s, col("golden_fkl"), col("golden_fkl_se"), col("proxy_fkl"), col("proxy_fkl_se"))
    p = detect_proxy_deviation(s, col("proxy_fkl"), col("proxy_fkl_se"))
    ep = rows[-1].get("epochs")
    by[m.parent.parent.name].append((m.parent.name[5:], g, p, ep))
print(f"budget: {budget or 'full'} steps\n")
print("| condition | epochs | golden min @ step (per seed) | golden end | rise ± SE (per seed) | kind | Δ held-out proxy | proxy-only det |")
print("|---|---|---|---|---|---|---|---|")
for c, v in by.items():
    ep = v[0][3]
    print(f"| {c} | {'—' if ep is None else f'{ep:.0f}'} | " + ", ".join(f"{g.min_value:.2f}@{g.min_step}" for _, g, _, _ in v)
          + " | " + ", ".join(f"{g.end_value:.2f}" for _, g, _, _ in v)
          + " | " + ", ".join(f"{g.rise:+.2f}±{g.rise_se:.2f}" for _, g, _, _ in v)
          + " | " + ", ".join({"hacking": "H", "overfitting": "O", "none": "–"}[g.kind] for _, g, _, _ in v)
          + " | " + ", ".join(f"{g.proxy_change:+.2f}" for _, g, _, _ in v)
          + " | " + ", ".join("Y" if p.detected else "n" for _, _, p, _ in v) + " |")
