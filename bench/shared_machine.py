"""kdlab on a shared machine (issue 23 item 4): the demo's stage-1 build beside other CPU-bound processes.

    .venv/bin/python bench/shared_machine.py [--competitors 1] [--repeats 2] [--quick] [--write]

Each measurement builds the demo world (its stage 1: oracle pools, teacher SFT, student-init SFT) into a fresh
cache in a new process, with one of the thread settings below, while `--competitors` busy-loop processes
(`while True: pass`, one core each) run beside it; settings alternate within each repeat. `--competitors 0`
is the quiet baseline. A measurement that passes `--timeout` seconds is stopped and reported as "> timeout".
`--whole-demo` times the whole `kdlab demo` (kdlab's own thread and worker choices) instead. Settings:
- `torch default`: what a process gets without kdlab choosing (torch's intra-op pool = physical cores);
- `1 thread`: torch.set_num_threads(1);
- `passive wait`: torch's default threads with OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep
  instead of spinning);
- `kdlab auto`: `kdlab.threads.apply(None)`, the default of every kdlab command (threads = cores free now).
`--write` puts the table into bench/RESULTS.md with the machine, date and load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = r"""
import os, sys, tempfile, time
mode = sys.argv[1]
quick = sys.argv[2] == "1"
import torch
from kdlab import threads
if mode == "1 thread":
    torch.set_num_threads(1)
elif mode == "kdlab auto":
    threads.apply(None)
from kdlab.pipeline.demo import demo_config
from kdlab.pipeline.world import build_world
cfg = demo_config()
cfg.cache_dir = tempfile.mkdtemp(prefix="kdlab-shared-")
if quick:
    cfg.stage1.teacher.steps, cfg.stage1.teacher.num_samples, cfg.stage1.student.steps = 250, 1000, 100
t = time.perf_counter()
build_world(cfg, log=lambda m: None)
print(f"{time.perf_counter() - t:.2f} {torch.get_num_threads()}")
"""

MODES = ("torch default", "1 thread", "passive wait", "kdlab auto")


def measure(mode: str, quick: bool, timeout: float, whole_demo: bool = False) -> tuple[float | None, int | None]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KDLAB_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    if whole_demo:  # `kdlab demo` as a user runs it (its own thread and worker choices), into a fresh directory
        with tempfile.TemporaryDirectory(prefix="kdlab-shared-demo-") as d:
            cmd = [sys.executable, "-c", "import sys; from kdlab.cli import main; sys.exit(main())", "demo",
                   "--out", str(Path(d) / "demo"), *(["--quick"] if quick else [])]
            t = time.perf_counter()
            try:
                subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True)
            except subprocess.TimeoutExpired:
                return None, None
            return time.perf_counter() - t, None
    if mode == "passive wait":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        out = subprocess.run([sys.executable, "-c", WORKLOAD, mode, "1" if quick else "0"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout, check=True).stdout.split()
    except subprocess.TimeoutExpired:
        return None, None
    return float(out[0]), int(out[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a shorter stage 1 (250 teacher steps)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--whole-demo", action="store_true",
                    help="time the whole `kdlab demo` (its default threads and workers) instead of stage 1's settings")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if args.whole_demo:
        args.modes = ["kdlab auto"]
    load = os.getloadavg()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.competitors)]
    results: dict[str, list] = {m: [] for m in args.modes}
    try:
        for r in range(args.repeats):
            order = args.modes if r % 2 == 0 else list(reversed(args.modes))
            for mode in order:
                secs, n = measure(mode, args.quick, args.timeout, args.whole_demo)
                results[mode].append((secs, n))
                print(f"[{r}] {mode}: {'> %.0f' % args.timeout if secs is None else '%.1f' % secs} s "
                      f"({n} threads)", flush=True)
    finally:
        for p in busy:
            p.kill()
    lines = [f"| setting | threads | seconds (each repeat) | median |", "|---|---|---|---|"]
    for mode, vals in results.items():
        secs = sorted(s if s is not None else float("inf") for s, _ in vals)
        med = secs[len(secs) // 2] if len(secs) % 2 else 0.5 * (secs[len(secs) // 2 - 1] + secs[len(secs) // 2])
        shown = ", ".join("> %.0f" % args.timeout if s is None else f"{s:.1f}" for s, _ in vals)
        lines.append(f"| {mode} | {vals[0][1]} | {shown} | {'> %.0f' % args.timeout if med == float('inf') else f'{med:.1f}'} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        m = machine()
        what = ", whole demo" if args.whole_demo else ""
        head = f"## Shared machine: {args.competitors} competitor(s){what}{', quick stage 1' if args.quick else ''}"
        write_section(head, f"{head}\n{m}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-min load before: {load[0]:.2f}\n"
                      f"`{' '.join(['bench/shared_machine.py', *(argv or sys.argv[1:])])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
