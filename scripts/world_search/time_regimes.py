"""CPU time (time.process_time, one torch thread) of kdlab stage-2 runs: setup+evals vs steps.

usage: time_regimes.py STEPS [k=v ...]   runs offline / online_teacher / online_student for STEPS steps
with 2 evaluation points and again with the config's eval points; prints CPU seconds per step and per
evaluation. process_time is used because the 2-core machine is shared (wall time is inflated)."""
import json, sys, time, shutil
from pathlib import Path
import torch
torch.set_num_threads(1)
from kdlab.config import load_config
from kdlab.pipeline.distill import run

steps, ov = int(sys.argv[1]), sys.argv[2:]
for regime in ("offline", "online_teacher", "online_student"):
    res = {}
    for label, extra in (("noeval", ["eval.num_points=2"]), ("eval", [])):
        out = Path(f"/tmp/kdlab-search/timing/{regime}-{label}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config("configs/search/base.yaml", [*ov, *extra, f"output_dir={out}", f"stage2.steps={steps}",
                                                       f"stage2.regime={regime}", "stage2.checkpoint_every=100000"])
        c0, w0 = time.process_time(), time.time()
        run(cfg, log=lambda m: None, progress=False)
        res[label] = (time.process_time() - c0, time.time() - w0)
        n_evals = sum(1 for _ in open(out / "metrics.jsonl"))
        res[label + "_n"] = n_evals
    print(json.dumps({"regime": regime, "steps": steps, "overrides": ov,
                      "cpu_noeval": round(res["noeval"][0], 1), "cpu_with_evals": round(res["eval"][0], 1),
                      "n_evals": res["eval_n"], "wall_with_evals": round(res["eval"][1], 1)}), flush=True)
