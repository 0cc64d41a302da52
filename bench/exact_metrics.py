"""Exact metrics and targets at a real vocabulary size: reference storage compared (issue 18).

    .venv/bin/python bench/exact_metrics.py                   # the issue's sizes; prints the tables
    .venv/bin/python bench/exact_metrics.py --write-results   # and replaces its section of bench/RESULTS.md
    .venv/bin/python bench/exact_metrics.py --quick           # small sizes, to check the script

Workload (CPU, float32, 2 torch threads): vocabulary V = 151,936 (Qwen2.5's), a reference ("teacher") Llama
of 1 layer x hidden 512 with peaked distributions, and a student that is a noisy copy of it (see `_models`);
512 evaluation prompts of 16 tokens, each with one response of 128 tokens. The responses are drawn uniformly at random with a fixed seed instead of sampled from
the teacher: what is measured (storage, time, memory, error) does not depend on where they come from, and
sampling 65k tokens at this V would cost more than everything measured here.

Evaluation, one fkl = Σ_t KL(A_t ‖ S_t) over the 512 x 128 tokens, by storage of the reference:
  topk   — today's top-256 cache (a lower bound): the student's dense logits per batch + a SparseTarget;
  hidden — the reference's final hidden states + head (exact): both models' logits chunk by chunk (lean path);
  live   — nothing stored (exact): the reference runs at each evaluation, on the lean path too;
  full   — float32 log-probs: 512 x 128 x V x 4 bytes = 39.8 GB does not fit this 24 GiB machine, so its
           size is computed and it is built and checked on the first 8 prompts only (the exactness check).
Training, one step (forward + backward of the student, lean loss, 16 sequences x 128 tokens) on an offline
set of 4,096 sequences, with top-k (k = 64, the offline default) or hidden targets; the set's size on disk
is measured for hidden and top-k on 256 sequences and scaled linearly (the bytes per sequence are fixed).

Each case runs in a fresh subprocess; time is the median of ``--repeats`` calls (cases alternate); peak extra
memory = peak resident set during the measured calls minus the resident set just before (reset through
/proc/self/clear_refs), so the models and inputs loaded before do not count; the reference cache does count
when the case builds it. Error: |value − exact| / exact, with the hidden value as exact (itself checked against
full log-probs on the 8-prompt subset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, reset_peak, status_mib, write_section

HEADING = "## Exact metrics at V = 151,936 (bench/exact_metrics.py)"
SIZES = {"full": dict(V=151_936, H=512, N=512, P=16, R=128, eval_batch=16, chunk=1024, topk=256,
                      train_B=16, offline_seqs=4096, offline_probe=256, offline_topk=64),
         "quick": dict(V=8_192, H=64, N=32, P=8, R=16, eval_batch=8, chunk=256, topk=64,
                       train_B=8, offline_seqs=512, offline_probe=32, offline_topk=16)}
EVAL_MODES = ("topk", "hidden", "live")
TRAIN_MODES = ("topk", "hidden")


def _models(s: dict):
    """A reference with peaked next-token distributions (its head scaled so the logits have a standard
    deviation of about 4: entropies of a few nats, as trained LMs have, where random-init ones are near
    uniform), and a student that is a noisy copy of it (every weight + 30 % Gaussian noise): close to its
    teacher as a student in training is, so the KL and top-k's share of it are of a realistic size."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from kdlab.models import LM, tiny_llama_config

    torch.manual_seed(1)
    cfg = tiny_llama_config(s["V"], s["H"], 1, 4, max_position_embeddings=s["P"] + s["R"] + 8)
    teacher = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        teacher.lm_head.weight.normal_(0, 4.0 / s["H"] ** 0.5)
        student = copy.deepcopy(teacher)
        g = torch.Generator().manual_seed(2)
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return LM(teacher), LM(student)


def _data(s: dict, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s["V"], (n, s["P"]), generator=g), torch.randint(0, s["V"], (n, s["R"]), generator=g)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def case(kind: str, mode: str, s: dict, repeats: int) -> dict:
    """One measured case in this process (the parent runs each in a fresh subprocess)."""
    import torch

    from kdlab.metrics import ReferenceCache, sequence_fkl_sums

    torch.set_num_threads(2)
    teacher, student = _models(s)
    out: dict = {"kind": kind, "mode": mode, "load_before": os.getloadavg()[0]}
    if kind == "eval":
        prompts, responses = _data(s, s["N"], 0)
        rss0 = reset_peak()
        t0 = time.perf_counter()
        storage = "none" if mode == "live" else mode
        cache = ReferenceCache.from_samples(teacher, prompts, None, responses, storage=storage, topk=s["topk"],
                                            batch_size=s["eval_batch"])
        out["build_s"] = time.perf_counter() - t0
        out["memory_bytes"] = cache.nbytes - sum(t.numel() * t.element_size() for t in
                                                 (cache.prompt_ids_NxP, cache.prompt_mask_NxP,
                                                  cache.response_ids_MxR, cache.response_mask_MxR))
        if mode == "hidden":  # the head is the model's own tensor in memory: it costs nothing extra there
            out["memory_bytes_without_shared_head"] = out["memory_bytes"] - cache.targets.weight.numel() * 4
        tmp = Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
        try:
            cache.save(tmp / "c")
            out["disk_bytes"] = _dir_bytes(tmp / "c") - sum(
                t.numel() * t.element_size() for t in (cache.prompt_ids_NxP, cache.prompt_mask_NxP,
                                                       cache.response_ids_MxR, cache.response_mask_MxR))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out["build_peak_extra_mib"] = status_mib("VmHWM") - rss0
        times, value = [], None
        rss1 = reset_peak()
        for _ in range(repeats):
            t0 = time.perf_counter()
            sums, _ = sequence_fkl_sums(student, cache, reference_lm=teacher, batch_size=s["eval_batch"])
            times.append(time.perf_counter() - t0)
            value = float(sums.double().mean())
        out["eval_s"], out["eval_s_all"], out["value"] = statistics.median(times), times, value
        out["eval_peak_extra_mib"] = status_mib("VmHWM") - rss1
    elif kind == "check":  # full log-probs on a subset: the exactness check of hidden (and of live)
        prompts, responses = _data(s, s["N"], 0)
        n = 8
        vals = {}
        for storage in ("full", "hidden", "none"):
            cache = ReferenceCache.from_samples(teacher, prompts[:n], None, responses[:n], storage=storage,
                                                batch_size=s["eval_batch"])
            sums, _ = sequence_fkl_sums(student, cache, reference_lm=teacher, batch_size=s["eval_batch"])
            vals[storage] = sums.double().tolist()
        out["check"] = vals
    else:  # one training step on an offline set
        from kdlab.data.offline import build_offline_dataset, load_offline_dataset
        from kdlab.losses import lean_loss

        tmp = Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
        try:
            n = s["offline_probe"]
            prompts, _ = _data(s, n, 1)
            t0 = time.perf_counter()
            targets = "topk" if mode == "topk" else "hidden"
            build_offline_dataset(teacher, prompts, torch.ones_like(prompts, dtype=torch.bool), generations_per_prompt=1,
                                  max_new_tokens=s["R"], generator=torch.Generator().manual_seed(3), out_dir=tmp / "d",
                                  targets=targets, topk=s["offline_topk"], batch_size=s["train_B"])
            out["build_s_per_seq"] = (time.perf_counter() - t0) / n
            out["disk_bytes_per_seq"] = _dir_bytes(tmp / "d") / n
            if mode == "hidden":  # the head is stored once per set, not per sequence
                head = _dir_bytes(tmp / "d") - _dir_bytes(tmp / "d" / "data") - (tmp / "d" / "kdlab.json").stat().st_size
                out["head_bytes"] = head
                out["disk_bytes_per_seq"] = (_dir_bytes(tmp / "d") - head) / n
            data = load_offline_dataset(tmp / "d")
            idx = torch.arange(s["train_B"])
            target = data.target(idx)
            p_ids, p_mask = data.prompt_ids[idx], data.prompt_mask[idx]
            r_ids, r_mask = data.response_ids[idx], data.response_mask[idx]
            times = []
            rss1 = reset_peak()
            for _ in range(repeats):
                student.hf.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                hidden = student.response_hidden(p_ids, p_mask, r_ids, r_mask)
                loss = lean_loss("forward_kl", hidden, student.lm_head_weight, target, r_mask, chunk_size=s["chunk"])
                loss.backward()
                times.append(time.perf_counter() - t0)
            out["step_s"], out["step_s_all"], out["loss"] = statistics.median(times), times, float(loss)
            out["step_peak_extra_mib"] = status_mib("VmHWM") - rss1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run(kind: str, mode: str, size: str, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, __file__, "--case", kind, mode, "--size", size, "--repeats", str(repeats)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"case {kind}/{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.3f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def _machine() -> str:
    m = machine()
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; Python {m['python']}, torch {m['torch']}, "
            "2 torch threads")


def report(results: dict, s: dict, wall: float, size: str) -> str:
    ev, tr, chk = results["eval"], results["train"], results["check"]
    M, R, V, H_t = s["N"], s["R"], s["V"], s["H"]
    full_bytes = M * R * V * 4
    exact = ev["hidden"]["value"]
    mem_total = machine()["memory_gib"] * 1024
    lines = [HEADING, "",
             f"Date {time.strftime('%Y-%m-%d')}. Machine: {_machine()}. Command: `.venv/bin/python bench/exact_metrics.py"
             f"{' --quick' if size == 'quick' else ''} --write-results`. Whole benchmark: {wall:.0f} s; 1-min load before each "
             "case in the tables (above about 2.5 on 2 cores other jobs were running and the times are noisy).",
             f"V = {V:,}, reference and student 1 layer x {H_t}, {M} prompts x {R} response tokens = {M * R:,} "
             f"tokens; evaluation batch {s['eval_batch']} sequences, lean chunk {s['chunk']} tokens; see the script's "
             "docstring for what each case does.", "",
             "**Evaluation** (one fkl over every token; time = median; peak extra = over the models and inputs):", "",
             "| storage | exact? | size in memory | size on disk | build (s) | evaluation (s) | peak extra, evaluation (MiB) "
             "| peak extra, build (MiB) | value (nats/seq) | error vs exact | load before |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| full log-probs | yes | {_gib(full_bytes)} (computed) | {_gib(full_bytes)} (computed) | – | – | – | – | – | – "
             "| – |"]
    for mode in EVAL_MODES:
        r = ev[mode]
        label = {"topk": f"top-{s['topk']} (today's default)", "hidden": "hidden states + head", "live": "none (live reference)"}[mode]
        err = abs(r["value"] - exact) / exact
        lines.append(f"| {label} | {'no: lower bound' if mode == 'topk' else 'yes'} | {_gib(r['memory_bytes'])} | "
                     f"{_gib(r['disk_bytes'])} | {r['build_s']:.1f} | {r['eval_s']:.1f} | {r['eval_peak_extra_mib']:.0f} | "
                     f"{r['build_peak_extra_mib']:.0f} | {r['value']:.4f} | {err:.2e} | {r['load_before']:.1f} |")
    h, t, lv = ev["hidden"], ev["topk"], ev["live"]
    check = chk["check"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(check["hidden"], check["full"]))
    rel_live = max(abs(a - b) / abs(b) for a, b in zip(check["none"], check["full"]))
    lines += ["",
              f"- Storage: hidden / full = 1/{full_bytes / h['memory_bytes']:.0f} in memory "
              f"(1/{full_bytes / h['disk_bytes']:.0f} on disk; target ≤ 1/50). The head ({_gib(V * H_t * 4)}) is the "
              f"model's own tensor in memory on the CPU: without it the cache holds {_gib(h.get('memory_bytes_without_shared_head', 0))}.",
              f"- Time: exact (hidden) / top-{s['topk']} evaluation = **{h['eval_s'] / t['eval_s']:.2f}×** (target ≤ 2×); "
              f"live / top-{s['topk']} = {lv['eval_s'] / t['eval_s']:.2f}×.",
              f"- Peak memory: exact (hidden) / top-{s['topk']} evaluation = **{h['eval_peak_extra_mib'] / t['eval_peak_extra_mib']:.2f}×** "
              f"(target ≤ 2×); {h['eval_peak_extra_mib'] / mem_total:.1%} of the machine's {mem_total / 1024:.0f} GiB.",
              f"- Error: top-{s['topk']} is {abs(t['value'] - exact) / exact:.2%} below the exact value (a lower bound, "
              f"as it must be); hidden vs full log-probs on 8 prompts: max relative difference {rel:.1e} per sequence; "
              f"live vs full: {rel_live:.1e}.", "",
              f"**Training step** on an offline set of {s['offline_seqs']:,} sequences (forward + backward of the student, "
              f"lean forward KL, batch {s['train_B']} x {R} tokens; time = median; disk scaled from {s['offline_probe']} "
              "sequences):", "",
              "| targets | exact? | set on disk | build (s, scaled) | step (s) | peak extra, step (MiB) | loss | load before |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode in TRAIN_MODES:
        r = tr[mode]
        disk = r["disk_bytes_per_seq"] * s["offline_seqs"] + r.get("head_bytes", 0)
        label = {"topk": f"top-{s['offline_topk']} (offline default before)", "hidden": "hidden states + head"}[mode]
        lines.append(f"| {label} | {'no: biased' if mode == 'topk' else 'yes'} | {_gib(disk)} | "
                     f"{r['build_s_per_seq'] * s['offline_seqs']:.0f} | {r['step_s']:.2f} | {r['step_peak_extra_mib']:.0f} | "
                     f"{r['loss']:.4f} | {r['load_before']:.1f} |")
    full_set = s["offline_seqs"] * R * V * 4
    lines += ["", f"- Full log-prob targets for this set would be {_gib(full_set)}; hidden targets are "
              f"1/{full_set / (tr['hidden']['disk_bytes_per_seq'] * s['offline_seqs'] + tr['hidden'].get('head_bytes', 0)):.0f} of that. "
              f"Step time hidden / top-{s['offline_topk']} = {tr['hidden']['step_s'] / tr['topk']['step_s']:.2f}×; "
              f"peak memory {tr['hidden']['step_peak_extra_mib'] / tr['topk']['step_peak_extra_mib']:.2f}×.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (checks the script in seconds)")
    ap.add_argument("--repeats", type=int, default=2, help="measured calls per case (median reported)")
    ap.add_argument("--write-results", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = args.size or ("quick" if args.quick else "full")
    s = SIZES[size]
    if args.case:
        print(json.dumps(case(*args.case, s, args.repeats)))
        return
    t0 = time.perf_counter()
    results = {"eval": {}, "train": {}}
    # Alternate the peers: top-k, hidden, live for evaluation; top-k, hidden for training.
    for mode in EVAL_MODES:
        print(f"[bench] evaluation, {mode} ...", file=sys.stderr, flush=True)
        results["eval"][mode] = _run("eval", mode, size, args.repeats)
    print("[bench] exactness check on 8 prompts ...", file=sys.stderr, flush=True)
    results["check"] = _run("check", "all", size, 1)
    for mode in TRAIN_MODES:
        print(f"[bench] training step, {mode} ...", file=sys.stderr, flush=True)
        results["train"][mode] = _run("train", mode, size, max(args.repeats, 3))
    text = report(results, s, time.perf_counter() - t0, size)
    print(text)
    Path(tempfile.gettempdir(), f"kdlab-exact-metrics-{size}.json").write_text(json.dumps(results, indent=2))
    if args.write_results:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
