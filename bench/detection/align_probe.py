"""Gradient-alignment probe on configs/tiny.yaml (docs/LOG.md, issue 16): timings and cosines of one offline run.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/align_probe.py
"""
import time, json, statistics
from pathlib import Path
from kdlab.config import load_config
from kdlab.pipeline.distill import run
from kdlab.pipeline.rundir import read_metrics
TINY = Path("configs/tiny.yaml")
out = {}
for name, extra in (("plain", []), ("aligned", ["eval.grad_alignment=true"])):
    cfg = load_config(TINY, [f"output_dir=/tmp/align16/{name}", "cache_dir=/tmp/align16/cache", "stage2.steps=200", "eval.num_points=8", "threads=1", *extra])
    import shutil; shutil.rmtree(f"/tmp/align16/{name}", ignore_errors=True)
    t = time.time(); d = run(cfg, log=lambda m: None, progress=False); out[name] = time.time() - t
    rows = read_metrics(d / "metrics.jsonl")
print(out)
for r in rows: print(r["step"], r.get("grad_cos_fresh"), r.get("grad_cos_golden"), r.get("grad_align_seconds"), r["proxy_fkl"], r.get("golden_fkl"))
