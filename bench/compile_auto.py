"""`stage2.compile_*: auto` (issue 23, item 1): what a compile costs cold and warm, what it saves, what `auto` decides,
and whether the demo's runs got slower.

    .venv/bin/python bench/compile_auto.py [--steps 40] [--demo-repeats 2] [--write]

Part 1, per workload (the demo world's offline regime with live teacher targets, `stage2.offline.targets=none`,
and its online_student regime), in a fresh cache directory:
- run A: an `auto` run whose record is seeded to say that compiling is free and halves a step, so it compiles
  after its 7-step probe; it measures the cold compile (nothing in the Inductor cache) and the saving, and writes
  them to compile-costs.json;
- run B: the same workload again with the same cache directory and the seeded record: the warm compile (Inductor's
  cache in the cache directory filled by run A);
- the decisions `auto` takes from run B's measurements for the demo's 1,500 steps and for 20,000 steps.
Part 2: the demo world's own stage 2 (offline with cached targets, 1,500 steps; what `kdlab demo` runs 21 times),
`auto` (default) against `false`, alternating, `--demo-repeats` each: wall time and the decision logged.
`--write` puts the tables into bench/RESULTS.md with the machine, date and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "kdlab" / "pipeline" / "demo_configs" / "demo.yaml"
WORKLOADS = {"offline, live teacher": ["stage2.offline.targets=none"], "online_student": ["stage2.regime=online_student"]}


def one_run(overrides: list[str], cache: Path, out: Path, seed_record: bool) -> dict:
    """`run_here` in a new process (a sweep's runs are separate processes: no compiled code kept in memory)."""
    arg = json.dumps({"overrides": overrides, "cache": str(cache), "out": str(out), "seed_record": seed_record})
    p = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def run_here(overrides: list[str], cache: Path, out: Path, seed_record: bool) -> dict:
    """One stage-2 run of the demo world; returns its wall time, step times and the [compile auto] log lines."""
    from kdlab.config import load_config
    from kdlab.pipeline import autocompile as ac
    from kdlab.pipeline.distill import run

    cfg = load_config(DEMO, [f"cache_dir={cache}", f"output_dir={out}", *overrides])
    if seed_record:
        key = ac.workload_key(cfg, cfg.stage2.regime, ("student", "teacher"))
        path = cache / ac.RECORD
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = {"compile_s": 0.0, "saving": 0.5, "seeded": True}  # "free and useful": compile after the probe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    lines, stamps = [], []
    t0 = time.perf_counter()
    run(cfg, log=lines.append, progress=False, on_step=lambda step, total: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    rec = None
    if seed_record:
        rec = json.loads((cache / ac.RECORD).read_text())[key]
    return {"wall": wall, "steps": steps, "log": [m for m in lines if "[compile auto]" in m], "record": rec}


def part1(steps: int) -> list[dict]:
    from kdlab.pipeline.autocompile import decide

    rows = []
    for name, ov in WORKLOADS.items():
        with tempfile.TemporaryDirectory(prefix="compile-auto-") as d:
            cache = Path(d) / "cache"
            common = [f"stage2.steps={steps}", "eval.num_points=2", "threads=2"]
            # the world first (stage 1 is not what is measured)
            one_run([*ov, *common, "stage2.steps=1", "stage2.compile_student=false", "stage2.compile_teacher=false"],
                    cache, Path(d) / "world", False)
            a = one_run([*ov, *common], cache, Path(d) / "a", True)
            b = one_run([*ov, *common], cache, Path(d) / "b", True)
        for label, r in (("A (cold cache)", a), ("B (warm cache)", b)):
            rec = r["record"]
            rows.append({"workload": name, "run": label, "compile_s": rec["compile_s"], "saving": rec["saving"],
                         "eager_ms": rec["eager_step_s"] * 1e3, "compiled_ms": rec["compiled_step_s"] * 1e3,
                         "wall": r["wall"], "log": r["log"]})
        rec = b["record"]
        for n in (1500, 20_000):
            d_ = decide(n, rec["eager_step_s"], rec["compile_s"], rec["saving"])
            rows[-1].setdefault("decisions", []).append((n, d_.compile, d_.reason))
    return rows


def part2(repeats: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(prefix="compile-auto-demo-") as d:
        cache = Path(d) / "cache"
        one_run(["stage2.steps=1"], cache, Path(d) / "world", False)
        for rep in range(repeats):
            for mode in ("auto", "false"):
                ov = [] if mode == "auto" else ["stage2.compile_student=false", "stage2.compile_teacher=false"]
                r = one_run([*ov, "threads=2"], cache, Path(d) / f"{mode}-{rep}", False)
                out.append({"mode": mode, "repeat": rep, "wall": r["wall"], "log": r["log"]})
                print(f"  demo stage 2, compile {mode:5} repeat {rep}: {r['wall']:.1f} s  {' | '.join(r['log'])}",
                      flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps of each part-1 run (>= 13: probe, compile, measure)")
    ap.add_argument("--demo-repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        c = json.loads(a.child)
        r = run_here(c["overrides"], Path(c["cache"]), Path(c["out"]), c["seed_record"])
        print("RESULT " + json.dumps(r), flush=True)
        return
    from kdlab import threads

    threads.apply(2)
    load = os.getloadavg()
    print(machine(), f"1-min load {load[0]:.2f}", flush=True)
    rows = part1(a.steps)
    lines = ["| workload | run | compile | eager step | compiled step | saving |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['run']} | {r['compile_s']:.1f} s | {r['eager_ms']:.1f} ms | "
                     f"{r['compiled_ms']:.1f} ms | {r['saving']:+.0%} |")
    decisions = [f"- {r['workload']}: {n} steps -> {'compile' if c else 'eager'} ({why})"
                 for r in rows for n, c, why in r.get("decisions", [])]
    print("\n".join(lines + [""] + decisions), flush=True)
    demo = part2(a.demo_repeats)
    walls = {m: [r["wall"] for r in demo if r["mode"] == m] for m in ("auto", "false")}
    ratio = statistics.median(walls["auto"]) / statistics.median(walls["false"])
    demo_lines = [f"- demo stage 2 (offline, cached targets, 1,500 steps, 2 threads): auto "
                  f"{' / '.join(f'{w:.1f}' for w in walls['auto'])} s, false "
                  f"{' / '.join(f'{w:.1f}' for w in walls['false'])} s; median ratio auto / false {ratio:.3f}",
                  f"- auto's decision there: {demo[0]['log'][0] if demo[0]['log'] else 'none logged'}"]
    print("\n".join(demo_lines), flush=True)
    if a.write:
        head = "## Compile auto (bench/compile_auto.py)"
        stamp = f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-min load before: {load[0]:.2f}"
        write_section(head, "\n".join([head, stamp, "", *lines, "", *decisions, "", *demo_lines]))


if __name__ == "__main__":
    main()
