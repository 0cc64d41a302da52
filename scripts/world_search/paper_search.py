"""Paper-ordering world search and held-out runs (issue 15; protocol in docs/LOG.md).

For each candidate world family (a name and --set overrides on configs/search/paper.yaml) and each
world seed: run the conditions x training seeds with kdlab's run_study, judge the world with
kdlab.analysis.worlds (paper ordering, hacking in the paper's sense, teacher floor, iso-proxy gap)
and append one JSON line per world to OUT/results.jsonl; print the table.

usage: paper_search.py OUT --family NAME:k=v,k=v [--family ...] --world-seeds 100,101 [--seeds 0]
       [--conditions offline,offline-96x8,online_teacher] [--base CONFIG] [--jobs 2]
"""
import argparse
import json
import sys
import time
from pathlib import Path

from kdlab.analysis.worlds import assess_world, assessment_table
from kdlab.config import load_config
from kdlab.pipeline.study import Condition, run_study, study_configs


def condition(name: str, n: int) -> Condition:
    if name == "offline":
        return Condition("offline", "regimes", ["stage2.regime=offline"])
    if name.startswith("offline-"):  # offline-<prompts>x<generations>
        prompts, gens = name.split("-", 1)[1].split("x")
        return Condition(name, "diversity", ["stage2.regime=offline", f"stage2.offline.num_prompts={prompts}",
                                             f"stage2.offline.generations_per_prompt={gens}"])
    return Condition(name, "regimes", [f"stage2.regime={name}"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--base", default="configs/search/paper.yaml")
    ap.add_argument("--family", action="append", required=True)
    ap.add_argument("--world-seeds", default="100")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--conditions", default="offline,offline-96x8,online_teacher")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for fam in a.family:
        name, _, ov = fam.partition(":")
        overrides = [o for o in ov.split(",") if o]
        for ws in [int(x) for x in a.world_seeds.split(",")]:
            cfg = load_config(a.base, [*overrides, f"world.seed={ws}"])
            conds = [condition(c, cfg.stage2.offline.num_prompts) for c in a.conditions.split(",")]
            wdir = out / f"{name}-w{ws}"
            configs = study_configs(cfg, conds, [int(s) for s in a.seeds.split(",")], wdir)
            for c in configs:  # one stage-1 cache for every study of the search (else OUT/<world>/.kdlab-cache)
                if cfg.cache_dir:
                    c.cache_dir = cfg.cache_dir
            t0 = time.time()
            run_study(configs, jobs=a.jobs, log=lambda m: print(m, file=sys.stderr))
            assessment = assess_world([wdir])
            wall = time.time() - t0
            print(f"\n## {name} world seed {ws} ({wall:.0f} s) {' '.join(overrides)}")
            print(assessment_table(assessment), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps({"family": name, "overrides": overrides, "world_seed": ws, "seeds": a.seeds,
                                    "seconds": round(wall), **assessment.to_dict()}) + "\n")


if __name__ == "__main__":  # spawn workers re-import this file
    main()
