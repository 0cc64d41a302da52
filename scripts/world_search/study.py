"""Run a set of stage-2 conditions x seeds on one world (kdlab's run_study, 2 workers, 1 thread each)
and print a per-run summary with kdlab's detectors (default thresholds).

usage: study.py OUT --base CONFIG [--set k=v ...] [--cond NAME:k=v,k=v ...] [--demo] [--seeds 0,1,2]
  --demo: the 7 demo conditions of kdlab.pipeline.demo.demo_conditions on this config.
"""
import argparse, sys, time
from pathlib import Path
from kdlab.config import load_config
from kdlab.pipeline.study import Condition, run_study, study_configs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--base", default="configs/search/base.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--cond", action="append", default=[])
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    cfg = load_config(a.base, a.set)
    conds = []
    if a.demo:
        from kdlab.pipeline.demo import demo_conditions
        conds += demo_conditions(cfg)
    for c in a.cond:
        name, _, ov = c.partition(":")
        conds.append(Condition(name, "search", [o for o in ov.split(",") if o]))
    out = Path(a.out)
    configs = study_configs(cfg, conds, [int(s) for s in a.seeds.split(",")], out)
    for c in configs:  # share one stage-1 cache across studies (study_configs puts it under OUT)
        c.cache_dir = cfg.cache_dir
    t0 = time.time()
    run_study(configs, jobs=a.jobs, log=lambda m: print(m, file=sys.stderr))
    print(f"# study wall {time.time() - t0:.0f} s", flush=True)
    import subprocess
    subprocess.run([sys.executable, str(Path(__file__).with_name("summarize.py")), str(out)])


if __name__ == '__main__':  # spawn workers re-import this file
    main()
