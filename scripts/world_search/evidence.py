"""Summarise held-out world results (paper_search.py's results.jsonl) per protocol, and optionally
write the recorded-evidence lines the demo prints (src/kdlab/pipeline/demo_configs/evidence.json).

usage: evidence.py RESULTS.jsonl --condition offline [--label "protocol A ..."] [--min-seeds 2]
       [--min-worlds 4] [--write-demo LINES_JSON_FRAGMENT]
Prints one line per world (teacher golden, online best, ordering, hacking seeds per condition with their
rises) and whether the protocol's criterion is met: the condition hacks in >= min-seeds of its
training seeds in >= min-worlds worlds and no online run hacks.
"""
import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--condition", default="offline")
    ap.add_argument("--min-seeds", type=int, default=2)
    ap.add_argument("--min-worlds", type=int, default=4)
    a = ap.parse_args()
    worlds = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    passed, online_hacks, lines = 0, 0, []
    worlds = [w for w in worlds if a.condition in w["conditions"]]
    for w in worlds:
        c = w["conditions"][a.condition]
        online = {k: v for k, v in w["conditions"].items() if v["regime"] and v["regime"].startswith("online")}
        online_hacks += sum(v["hacking"] for v in online.values())
        ok = c["hacking"] >= a.min_seeds
        passed += ok
        order = w["ordering"]["holds"] if w.get("ordering") else None
        rises = ", ".join(f"{z:+.1f}" for z in c["rise_z"])
        gap = c.get("iso_proxy_gap") or {}
        gap_text = (f"; iso-proxy gap {gap['gap_end']:+.2f}±{gap['gap_end_se']:.2f}"
                    if gap.get("gap_end") is not None and gap.get("gap_end_se") else "")
        lines.append(f"world {w['world_seed']}: teacher golden {w['teacher_golden']:.2f}, online best {w['online_best']:.2f}"
                     f" ({'paper ordering' if order else 'not the paper ordering'}); {a.condition} hacks "
                     f"{c['hacking']}/{c['seeds']} (rise z {rises}; rise {c['rise'][0]:+.2f}){gap_text}; online "
                     + ", ".join(f"{k} {v['hacking']}/{v['seeds']}" for k, v in online.items()))
    met = passed >= a.min_worlds and online_hacks == 0
    lines.append(f"criterion ({a.condition} hacks in >= {a.min_seeds} seeds in >= {a.min_worlds} of {len(worlds)} worlds, "
                 f"no online run hacks): {'MET' if met else 'NOT MET'} ({passed}/{len(worlds)} worlds, "
                 f"{online_hacks} online hacking runs)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
