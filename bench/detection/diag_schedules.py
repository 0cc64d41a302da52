"""Diagnostic (issue 16, after the held-out run; chooses nothing): why detection collapses under schedules in
learning-rate time. Held-out-style hacking runs, onset 0.6, departure 0.3, fresh seeds 300,200-300,299.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/diag_schedules.py
"""
import sys; sys.path.insert(0, "bench/detection")
import numpy as np, heldout as H
from kdlab.analysis.sequential import detect_proxy_sequential, SequentialConfig
variants = {"default": SequentialConfig(), "skip 0.3": SequentialConfig(skip_frac=0.3), "skip 0.45": SequentialConfig(skip_frac=0.45)}
            

for sched in ("cosine", "step", "warmup"):
    counts = {k: 0 for k in variants}; step_axis = 0; n = 0
    for seed in range(300_200, 300_300):
        run = H.make_run(np.random.default_rng(seed), kind="hacking", sched=sched, onset_frac=0.6, departure=0.3)
        r = run["rows"]
        s = np.array([x["step"] for x in r]); p = np.array([x["proxy_fkl"] for x in r]); se = np.array([x["proxy_fkl_se"] for x in r]); ls = np.array([x["lr_sum"] for x in r])
        for k, c in variants.items():
            counts[k] += detect_proxy_sequential(s, p, se, lr_sum=ls, config=c).detected
        step_axis += detect_proxy_sequential(s, p, se).detected
        n += 1
    print(sched, {k: f"{v}/{n}" for k, v in counts.items()}, "step axis", f"{step_axis}/{n}")
