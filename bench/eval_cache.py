"""Cost of one evaluation of fkl = E_x E_{y~A} Σ_t KL(A_t ‖ S_t), with and without the reference cache.

Per evaluation, on the same eval prompts and (for the cached variants) the same reference samples:
- `no cache`       : sample y ~ A, reference forward, student forward (what you pay without a cache);
- `samples cached` : reference forward + student forward (ReferenceCache with storage='none');
- `full cache`     : student forward only (cached float32 log-probs, M×R×V);
- `top-k cache`    : student forward only (cached top-k log-probs; tail mass in one bucket),
                     with its relative error against the full cache (top-k KL underestimates).
Plus the one-time cost of building each cache and its size. Two workloads: the pipeline's `w0`
world (configs/w0.yaml) and a larger vocabulary one (the sampling bench's student, vocab 512).
float32, torch.set_num_threads(2); median of repeated runs after a warm-up.

Run: .venv/bin/python bench/eval_cache.py [--repeats 5]
"""

import argparse
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
    "v512": dict(V=512, P=16, R=48, N=256, ref=(4, 256, 4), stu=(2, 128, 4), topk=32),
}


def model(V, layers, hidden, heads, seed):
    torch.manual_seed(seed)
    return LM(transformers.AutoModelForCausalLM.from_config(tiny_llama_config(V, hidden, layers, heads)))


def median_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def run(name, w, repeats, batch_size=64):
    V, P, R, N = w["V"], w["P"], w["R"], w["N"]
    ref = make_synthetic_oracle(V, w["ref"][1], w["ref"][0], w["ref"][2], seed=1, logit_scale=4.0, init_std=0.3)
    stu = model(V, *w["stu"], seed=2)
    prompts = torch.randint(0, V, (N, P), generator=torch.Generator().manual_seed(0))
    build = dict(max_new_tokens=R, batch_size=batch_size)

    def make(storage, topk=None):
        return ReferenceCache.build(ref, prompts, generator=torch.Generator().manual_seed(3), storage=storage,
                                    topk=topk, **build)

    rows = []
    t_none_build, c_none = median_time(lambda: make("none"), 1)
    t_full_build, c_full = median_time(lambda: make("full"), 1)
    t_topk_build, c_topk = median_time(lambda: make("topk", w["topk"]), 1)
    t_nocache, e_nocache = median_time(
        lambda: sequence_fkl(stu, make("none"), reference_lm=ref, batch_size=batch_size), repeats)
    t_samples, e_samples = median_time(lambda: sequence_fkl(stu, c_none, reference_lm=ref, batch_size=batch_size), repeats)
    t_full, e_full = median_time(lambda: sequence_fkl(stu, c_full, batch_size=batch_size), repeats)
    t_topk, e_topk = median_time(lambda: sequence_fkl(stu, c_topk, batch_size=batch_size), repeats)
    assert abs(e_samples.mean - e_full.mean) <= 1e-5 * abs(e_full.mean)  # cached == live reference
    mb = lambda c: c.nbytes / 2**20  # noqa: E731
    print(f"\n[{name}] V={V} P={P} R={R} N={N} prompts x 1 sample; reference {w['ref']} student {w['stu']} "
          f"(layers, hidden, heads); fkl = {e_full.mean:.4f} ± {e_full.se:.4f}")
    print(f"{'variant':16s} {'eval (ms)':>10s} {'vs no cache':>12s} {'build once (ms)':>16s} {'cache MiB':>10s}")
    for label, t, tb, c in (("no cache", t_nocache, None, None), ("samples cached", t_samples, t_none_build, c_none),
                            ("full cache", t_full, t_full_build, c_full),
                            (f"top-{w['topk']} cache", t_topk, t_topk_build, c_topk)):
        print(f"{label:16s} {t * 1e3:10.1f} {t_nocache / t:11.2f}x {'' if tb is None else f'{tb * 1e3:.1f}':>16s} "
              f"{'' if c is None else f'{mb(c):.2f}':>10s}")
    print(f"top-{w['topk']} fkl {e_topk.mean:.4f} vs full {e_full.mean:.4f}: relative error "
          f"{(e_topk.mean - e_full.mean) / e_full.mean:+.2%}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True, text=True)
    print(f"machine: {cpu.stdout.strip()} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; median of {args.repeats} after warm-up")
    for name in args.workloads:
        run(name, WORKLOADS[name], args.repeats)


if __name__ == "__main__":
    main()
