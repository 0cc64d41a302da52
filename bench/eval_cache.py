"""Cost of one evaluation of fkl = E_x E_{y~A} Σ_t KL(A_t ‖ S_t), with and without the reference cache.

Per evaluation, on the same eval prompts and (for the cached variants) the same reference samples:
- `no cache`       : sample y ~ A, reference forward, student forward (what you pay without a cache);
- `samples cached` : reference forward + student forward (ReferenceCache with storage='none');
- `full cache`     : student forward only (cached float32 log-probs, M×R×V);
- `top-k cache`    : student forward only (cached top-k log-probs; tail mass in one bucket),
                     with its relative error against the full cache (top-k KL underestimates).
Plus the one-time cost of building each cache and its size. Two workloads: the pipeline's `w0`
world (configs/w0.yaml) and a larger vocabulary one (the sampling bench's student, vocab 512).
float32, torch.set_num_threads(2); min and median of repeated runs, variants interleaved.

Run: .venv/bin/python bench/eval_cache.py [--repeats 5]
"""

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch
import transformers

from kdlab.metrics import ReferenceCache, sequence_fkl
from kdlab.models import LM, make_synthetic_oracle, tiny_llama_config

WORKLOADS = {
    # name: vocab, prompt len, response len, eval prompts, reference (layers, hidden, heads), student, top-k
    "w0": dict(V=32, P=8, R=16, N=512, ref=(2, 64, 4), stu=(1, 32, 2), topk=8),
    "v512": dict(V=512, P=16, R=48, N=128, ref=(4, 256, 4), stu=(2, 128, 4), topk=32),
}


def model(V, layers, hidden, heads, seed):
    torch.manual_seed(seed)
    return LM(transformers.AutoModelForCausalLM.from_config(tiny_llama_config(V, hidden, layers, heads)))


def run(name, w, repeats, batch_size=64):
    V, P, R, N = w["V"], w["P"], w["R"], w["N"]
    ref = make_synthetic_oracle(V, w["ref"][1], w["ref"][0], w["ref"][2], seed=1, logit_scale=4.0, init_std=0.3)
    stu = model(V, *w["stu"], seed=2)
    prompts = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(0))

    def make(storage, topk=None):
        return ReferenceCache.build(ref, prompts, generator=torch.Generator().manual_seed(3), storage=storage,
                                    topk=topk, max_new_tokens=R, batch_size=batch_size)

    c_none, c_full, c_topk = make("none"), make("full"), make("topk", w["topk"])
    k = w["topk"]
    jobs = {  # name -> (what it times, cache it uses or None)
        "no cache": (lambda: sequence_fkl(stu, make("none"), reference_lm=ref, batch_size=batch_size), None),
        "samples cached": (lambda: sequence_fkl(stu, c_none, reference_lm=ref, batch_size=batch_size), c_none),
        "full cache": (lambda: sequence_fkl(stu, c_full, batch_size=batch_size), c_full),
        f"top-{k} cache": (lambda: sequence_fkl(stu, c_topk, batch_size=batch_size), c_topk),
        "build: samples": (lambda: make("none"), None),
        "build: full": (lambda: make("full"), None),
        f"build: top-{k}": (lambda: make("topk", k), None),
    }
    # Round-robin over the variants so that background load on a shared machine hits them alike;
    # the minimum is the least disturbed run, the median what a loaded machine gives.
    times = {j: [] for j in jobs}
    results = {}
    for _ in range(repeats):
        for j, (fn, _) in jobs.items():
            t0 = time.perf_counter()
            results[j] = fn()
            times[j].append(time.perf_counter() - t0)
    e_full, e_samples, e_topk = results["full cache"], results["samples cached"], results[f"top-{k} cache"]
    assert abs(e_samples.mean - e_full.mean) <= 1e-5 * abs(e_full.mean)  # cached == live reference
    base = min(times["no cache"])
    print(f"\n[{name}] V={V} P={P} R={R} N={N} prompts x 1 sample; reference {w['ref']} student {w['stu']} "
          f"(layers, hidden, heads); fkl = {e_full.mean:.4f} ± {e_full.se:.4f}")
    print(f"{'variant':16s} {'min (ms)':>9s} {'median (ms)':>12s} {'no cache / this (min)':>22s} {'cache MiB':>10s}")
    for j, (_, c) in jobs.items():
        ts = times[j]
        ratio = f"{base / min(ts):.1f}x" if not j.startswith("build") else ""
        print(f"{j:16s} {min(ts) * 1e3:9.1f} {statistics.median(ts) * 1e3:12.1f} {ratio:>22s} "
              f"{'' if c is None else f'{c.nbytes / 2**20:.2f}':>10s}")
    print(f"top-{k} fkl {e_topk.mean:.4f} vs full {e_full.mean:.4f}: relative error "
          f"{(e_topk.mean - e_full.mean) / e_full.mean:+.2%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True, text=True)
    print(f"machine: {cpu.stdout.strip()} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {args.repeats} interleaved rounds")
    for name in args.workloads:
        run(name, WORKLOADS[name], args.repeats)
    print(f"\n1-min load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
