"""Diagnostic (issue 16, after the held-out run; chooses nothing): detection on held-out-style hacking runs
under a constant schedule, onset 0.6, departure 0.3, with and without the slow start T0 of the power-offset law.
Fresh seeds 300,000-300,199.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/diag_slow_start.py
"""
import sys; sys.path.insert(0, "bench/detection")
import numpy as np, heldout as H
from kdlab.analysis.sequential import detect_proxy_sequential
res = {}
for label, t0max in (("T0 in [0,15] (as held out)", 15), ("T0 = 0", 0)):
    hits = n = 0
    for seed in range(300_000, 300_200):
        rng = np.random.default_rng(seed)
        # patch: the uniform(0, 15) draw for T0 scaled
        real_uniform = rng.uniform
        class R:
            def __getattr__(self, k): return getattr(rng, k)
            def uniform(self, lo=0.0, hi=1.0, size=None):
                if (lo, hi) == (0, 15): return real_uniform(0, t0max) if t0max else 0.0 * real_uniform(0, 1)
                return real_uniform(lo, hi, size)
        run = H.make_run(R(), kind="hacking", sched="constant", onset_frac=0.6, departure=0.3)
        r = run["rows"]
        s = np.array([x["step"] for x in r]); p = np.array([x["proxy_fkl"] for x in r]); se = np.array([x["proxy_fkl_se"] for x in r]); ls = np.array([x["lr_sum"] for x in r])
        hits += detect_proxy_sequential(s, p, se, lr_sum=ls).detected; n += 1
    res[label] = f"{hits}/{n}"
print(res)
