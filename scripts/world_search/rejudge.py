"""Judge every world directory under ROOT again with the current kdlab.analysis.worlds (the search
process judges a world with the code it started with) and write one JSON line per world to OUT.

usage: rejudge.py ROOT OUT.jsonl   (world directories are named <family>-w<world seed>)
"""
import json
import re
import sys
from pathlib import Path

from kdlab.analysis.worlds import assess_world, assessment_table

root, out = Path(sys.argv[1]), Path(sys.argv[2])
with open(out, "w") as f:
    for wdir in sorted(p for p in root.iterdir() if p.is_dir() and re.search(r"-w\d+$", p.name)):
        family, seed = wdir.name.rsplit("-w", 1)
        a = assess_world([wdir])
        print(f"\n## {wdir.name}\n{assessment_table(a)}")
        f.write(json.dumps({"family": family, "world_seed": int(seed), **a.to_dict()}) + "\n")
