"""Time and peak memory of distillation losses, forward + backward, on CPU.

    .venv/bin/python bench/losses.py                  # print the table
    .venv/bin/python bench/losses.py --write-results  # and replace the Losses section of bench/RESULTS.md

Shapes: tokens = 8192, V = 32768, hidden = 512, float32, torch threads = 2. Paths:
  dense — logits = hidden @ W.T materialised, then kdlab.losses.<loss>;
  lean  — kdlab.losses.lean_loss (chunks of 1024 tokens; logits never materialised in full);
  naive — a straightforward reference: probabilities, not log space, and F.kl_div.
Each case runs in a fresh subprocess. Peak extra memory = the process's peak resident set during
forward + backward minus its resident set just before (the peak is reset with
/proc/self/clear_refs, so setup does not count); inputs (hidden, W, the 1 GiB teacher logits)
are allocated before. Large tensors are mmap'd by the allocator and returned on free, so RSS
tracks live tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import machine, reset_peak, status_mib, write_section

TOKENS, VOCAB, HIDDEN, THREADS, CHUNK = 8192, 32768, 512, 2, 1024
LOSSES = {"forward_kl": {}, "generalized_jsd": {"beta": 0.5}}
PATHS = ("dense", "lean", "naive")
DATE = "2026-11-23"
HEADING = "## Losses (bench/losses.py)"


def _naive(name, logits, teacher):
    import torch.nn.functional as F

    # F.kl_div(input, target) = Σ target·(log target − input) = KL(target ‖ exp(input)):
    # the *second* argument is the distribution the expectation is taken under. "batchmean"
    # divides by the first dimension, so the tokens go there.
    logits, teacher = logits.reshape(-1, logits.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    p = F.softmax(teacher, dim=-1)
    if name == "forward_kl":
        return F.kl_div(F.log_softmax(logits, dim=-1), p, reduction="batchmean")
    q = F.softmax(logits, dim=-1)
    m = 0.5 * (p + q)  # mixture in probability space, then log: the naive way
    log_m = m.log()
    return 0.5 * F.kl_div(log_m, p, reduction="batchmean") + 0.5 * F.kl_div(log_m, q, reduction="batchmean")


def run_case(path: str, name: str) -> dict:
    import torch

    import kdlab.losses as L

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, TOKENS, HIDDEN, generator=g)).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).requires_grad_()
    teacher = 2.0 * torch.randn(1, TOKENS, VOCAB, generator=g)
    params = LOSSES[name]

    base = reset_peak()
    start = time.perf_counter()
    if path == "lean":
        loss = L.lean_loss(name, hidden, weight, teacher, chunk_size=CHUNK, **params)
    elif path == "dense":
        loss = L.get(name, **params)(hidden @ weight.T, teacher)
    else:
        loss = _naive(name, hidden @ weight.T, teacher)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    return {
        "load_before": __import__("os").getloadavg()[0],
        "path": path,
        "loss": name,
        "value": loss.item(),
        "seconds": seconds,
        "peak_extra_mib": peak - base,
        "grad_w_norm": weight.grad.norm().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=2, metavar=("PATH", "LOSS"), help="run one case here (internal)")
    parser.add_argument("--write-results", action="store_true", help="replace the Losses section of RESULTS.md")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return

    rows, start = [], time.perf_counter()
    for name in LOSSES:
        for path in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, "--case", path, name], capture_output=True, text=True, check=True
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{name:16s} {path:6s} {row['seconds']:7.2f} s  peak extra {row['peak_extra_mib']:8.0f} MiB  "
                f"loss {row['value']:.6f}",
                flush=True,
            )
    lines = report(rows, time.perf_counter() - start)
    print("\n".join(lines))
    if args.write_results:
        write_results(lines)


def report(rows: list[dict], total_seconds: float) -> list[str]:
    info = machine()
    by = {(r["loss"], r["path"]): r for r in rows}
    lines = [
        HEADING,
        "",
        f"Date {DATE}. Machine: {info['cores']}-core CPU, {info['cpu']}; Python {info['python']}, "
        f"torch {info['torch']}, {THREADS} torch threads. Command: `.venv/bin/python bench/losses.py --write-results`.",
        f"Forward + backward, tokens = {TOKENS}, V = {VOCAB}, hidden = {HIDDEN}, float32; lean chunk = {CHUNK} "
        "tokens. One run per case in a fresh process; peak extra = peak RSS − RSS after the inputs (the 1 GiB "
        "teacher logits included in the inputs). The load column is the 1-min load average before each case "
        "(the previous cases of this benchmark count; above ≈ 2.5 on 2 cores means other jobs ran and the "
        f"times are noisy); the whole benchmark took {total_seconds:.0f} s.",
        "",
        "| loss | path | time (s) | peak extra memory (MiB) | loss value | 1-min load before |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['path']} | {r['seconds']:.2f} | {r['peak_extra_mib']:.0f} | {r['value']:.6f} "
            f"| {r['load_before']:.1f} |"
        )
    lines.append("")
    for name in LOSSES:
        dense, lean, naive = (by[(name, p)] for p in PATHS)
        lines.append(
            f"- {name}: lean / dense peak memory = {lean['peak_extra_mib'] / dense['peak_extra_mib']:.3f}, "
            f"lean / dense time = {lean['seconds'] / dense['seconds']:.2f}; naive / dense peak memory = "
            f"{naive['peak_extra_mib'] / dense['peak_extra_mib']:.2f}, time = {naive['seconds'] / dense['seconds']:.2f}; "
            f"|lean − dense| value = {abs(lean['value'] - dense['value']):.1e}"
        )
    return lines


def write_results(lines: list[str]) -> None:
    write_section(HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
