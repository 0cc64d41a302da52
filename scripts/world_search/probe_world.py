"""Build one world (stage 1, cached) and report teacher golden and student-init golden.

usage: probe_world.py TAG [key=value ...]   (overrides on configs/search/base.yaml)
Runs a 1-step stage 2 with 2 evaluation points; prints one JSON line."""
import json, sys, time, shutil
from pathlib import Path
from kdlab.config import load_config
from kdlab.pipeline.distill import run

tag, overrides = sys.argv[1], sys.argv[2:]
out = Path(f"/tmp/kdlab-search/probe/{tag}")
shutil.rmtree(out, ignore_errors=True)
cfg = load_config("configs/search/base.yaml", [*overrides, f"output_dir={out}", "stage2.steps=1",
                  "eval.num_points=2", "stage2.regime=online_teacher", "eval.train_prompts=0"])
t0 = time.time()
logs = []
run(cfg, log=logs.append, progress=False)
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
w = json.loads((out / "world.json").read_text())
print(json.dumps({"tag": tag, "overrides": overrides, "teacher_sft": w["teacher"]["sft_final_loss"],
                  "student_sft": w["student_init"]["sft_final_loss"], "stage1_s": w.get("seconds"),
                  "teacher_golden": round(w["teacher_golden_fkl"], 3), "teacher_golden_se": round(w["teacher_golden_fkl_se"], 3),
                  "student_golden": round(rows[0]["golden_fkl"], 3), "student_proxy": round(rows[0]["proxy_fkl"], 3),
                  "wall_s": round(time.time() - t0, 1)}), flush=True)
