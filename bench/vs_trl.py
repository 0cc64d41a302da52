"""kdlab's distillation loop vs TRL's GKDTrainer on the same workload (issue 7; presets: issue 23).

    .venv/bin/python bench/vs_trl.py [--preset tiny|124m|qwen-0.5b-1.5b] [--smoke] [--device cpu|cuda]
        [--precision fp32|bf16|auto] [--threads N] [--configs off_fkl_cached,on_jsd] [--repeats 2] [--root DIR]
        [--auto-steps 1500] [--json out.json]

    .venv/bin/python bench/vs_trl.py                                   # issue 7's tiny table, all CPU rows
    .venv/bin/python bench/vs_trl.py --preset 124m --configs off_fkl_cached,off_fkl_live,on_jsd --json 124m.json
    .venv/bin/python bench/vs_trl.py --preset qwen-0.5b-1.5b --configs off_fkl_cached,on_jsd,on_jsd_vllm
    bash bench/gpu.sh [OUT_DIR]     # both large presets on one NVIDIA GPU, time-limited (bench/gpu.sh --smoke: CPU)

Workloads (`--preset`, a `Workload` below; random init, no downloads, no EOS: every response is full length):
  tiny (default)  issue 7's workload, unchanged: teacher Llama 4 layers / hidden 256 / 8 heads / intermediate
                  1024 (4,458,752 parameters); student 2 / 128 / 4 / 512 (656,000; head dim 32); vocab 512,
                  untied embeddings, float32, CPU, SDPA, 2 torch threads. Batches of 16 prompts of 16 tokens
                  + 48 response tokens; 24 steps, steps 1-3 warm-up, 4..23 timed (20 steps); 512 prompts.
  124m            GPT-2 small's shape in the Llama architecture, distilled from GPT-2 medium's. Student 12
                  layers / hidden 768 / 12 heads; teacher 24 / 1024 / 16; V = 32,000; both with tied
                  embeddings, as GPT-2. GPT-2's 4h GELU MLP has 8h² weights a layer; a SwiGLU MLP has 3·h·I,
                  and with tied embeddings of V = 32,000 (instead of GPT-2's 50,257 plus 1,024 learned
                  positions; Llama's rotary positions have no weights) the MLPs take the difference: student
                  I = 2560 (10h/3) gives 123,685,632 parameters, teacher I = 2944 (2.875h) 350,536,704.
                  (Llama's usual I = 8h/3 = 2048 would give 109.5M tied, 134.1M untied.) Batch 8 prompts of
                  64 tokens + 256 response tokens; 6 steps, 2 warm-up, 3 timed (the spread is printed);
                  48 prompts (one epoch). Precision `auto`: on the CPU, bf16 autocast when a 1024³ bf16
                  matmul is at least as fast as float32 (timed at the start; printed), else fp32; on CUDA
                  bf16. Meant for a CPU run of many minutes (each step is ~4 TFLOP) or a GPU.
  qwen-0.5b-1.5b  Qwen2.5-0.5B's shape as the student (hidden 896, 24 layers, 14 heads, 2 KV heads,
                  intermediate 4864, tied; 494,032,768 parameters) and Qwen2.5-1.5B's as the teacher (1536,
                  28, 12, 2, 8960, tied; 1,543,714,304), Qwen2 architecture (q/k/v biases), V = 151,936,
                  random init; bf16 on CUDA. Batch 8 prompts of 64 + 128 response tokens (128, not 256: cached
                  full targets at this vocabulary are N x R x V floats, 3.7 GB for the 48 prompts, and the GPU
                  run of bench/gpu.sh has minutes); 6 steps, 2 warm-up.
  --smoke         a preset shrunk to run on a CPU in seconds, same architecture, tying, GQA and code paths
                  (teacher 2 layers / hidden 64 / 4 heads, student 1 / 32 / 4, 2 KV heads where the preset
                  uses GQA, intermediate 2h, V 256, batch 4 x (8 + 16 tokens), 4 steps, 1 warm-up, 1 thread,
                  CPU; the preset's precision unless --precision): it keeps the script from rotting
                  (tests/test_bench_vs_trl.py, bench/gpu.sh --smoke); its times mean nothing.
  --device / --precision / --threads override the preset's. On CUDA kdlab runs with `device=cuda` and
  `precision=bf16` (float32 weights, bf16 autocast), TRL with `bf16=True, use_cpu=False` (the same: float32
  weights under accelerate's bf16 autocast).

Configurations (kdlab | TRL):
  off_fkl_cached   offline regime, targets=full (cached teacher log-probs), forward KL | lmbda=0, beta=0
  off_fkl_live     offline regime, targets=none (live teacher forward), forward KL   | lmbda=0, beta=0
  off_jsd_cached   ... generalized JSD beta=0.5                                        | lmbda=0, beta=0.5
  off_jsd_live
  off_rkl_cached   ... reverse KL                                                      | lmbda=0, beta=1
  off_rkl_live
  on_jsd           online_student, temperature 0.9, JSD beta=0.5                       | lmbda=1, beta=0.5
  on_jsd_vllm      on_jsd with kdlab's stage2.sampling.backend=vllm (the student sampled by an in-process
                   vLLM engine given the training weights before each call). Needs vLLM and a GPU: skipped
                   with a message otherwise, and left out of the default list on the CPU. TRL 1.16's
                   GKDTrainer has no vLLM path, so its column is its on_jsd measurement of the same repeat
                   when on_jsd ran in this invocation ("trl_reused_from" in the JSON), else a fresh one.
                   kdlab's engines run in-process (external_launcher): the child gets a one-process
                   torch.distributed environment (RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT). Not yet run on a GPU.
  *_ct             the live rows and on_jsd again with kdlab's stage2.compile_teacher=true (TRL as above)
  *_cs / *_c       with stage2.compile_student=true: the cached rows (_cs); the live rows and on_jsd with
                   both the student and the teacher compiled (_c; on-policy this includes the student's
                   compiled decode step)
  *_auto           kdlab's defaults in a long run (the base rows pin compile off; a 24-step run stays eager under
                   the default `auto` anyway): stage2.compile_* = auto, the run configured for --auto-steps steps
                   (default 1500, the demo's stage 2) and stopped once its timed steps are done; its warm-up covers
                   auto's eager probe, the compile and its alternating measurement (21 steps, then 20 timed). All *_auto
                   children of one --root share kdlab's cache directory (root/kd-cache-auto: the compile record and
                   Inductor's cache): the first run of a workload decides from the priors (cold), later ones from
                   its measurement (warm), as a sweep's runs do. Each row prints auto's decision. TRL: its base row
                   of the same repeat (reused) or a fresh one.

kdlab runs its real loop, `kdlab.pipeline.distill.run(cfg, on_step=...)` (what `kdlab run` runs); the
step time is the gap between consecutive `on_step` calls. TRL runs `GKDTrainer.train()` with a
callback timing `on_step_end`. Both: steps 1..warm-up are warm-up, steps warm-up+1 .. steps-1 are timed
(kdlab evaluates at steps 0, 1 and the last, so the last step is excluded; the step-1 evaluation runs
before step 1's `on_step`). Off-policy, both train on the same fixed teacher responses (sampled once at
temperature 0.9; kdlab samples its own offline dataset the same way before step 1, outside the timing).
On CUDA every timestamp and phase boundary is taken after `torch.cuda.synchronize()`.

Every measurement runs in its own child process (clean peak memory), alternating kdlab, TRL, kdlab, TRL...
For the 124m and Qwen presets the parent builds kdlab's stage-1 cache once (in `<root>/kd-cache`) before
any timing and deletes each child's run directory when it ends (a copy of the Qwen models is 8 GB); the
tiny preset keeps issue 7's layout (each kdlab child builds its own cache, run directories are kept). A
child that fails is reported and the others still run; the exit status is then 1.

Where the time goes (both tools, the same wrappers where the code is shared): sampling (kdlab's
regime `batch`, TRL's `generate_on_policy_outputs`), teacher forward (kdlab's `LM.response_logits` on
the teacher, or `PromptCachedTeacher.response_logits` under its default `stage2.teacher_prompt_cache: auto`;
TRL's teacher module), student forward + loss (kdlab's `loss_on_batch`, TRL's
`compute_loss`, less the teacher), backward (`torch.Tensor.backward`), optimizer step
(`torch.optim.AdamW.step`), rest (clip, zero_grad, schedule, loop).

What it prints: the workload, both models' parameter counts (sum of `p.numel()` over the built models),
the precision used (and on the CPU under `auto` why), the reference FLOP rate, then one row per
configuration and repeat: median step time of each tool, TRL/kdlab, the FLOP bound of a step, the share
of that bound each tool reaches, tokens/s (B x R / median step), peak memory; then each tool's phases and
step spread (min and max of the timed steps), and for on-policy rows the sampling bound.
- FLOPs (`step_flops`): the matmul FLOPs of a step from the workload's shapes (`forward_flops`: Q and O
  projections h x h, K and V h x (KV heads x head dim) under GQA, the 3-matrix MLP, attention scores and
  values, the lm_head on the loss positions; tying does not change FLOPs; element-wise work not counted).
  The teacher forward is counted over prompt + response for both tools, as TRL runs it: kdlab's default
  prompt cache (kdlab.models.prefix) runs only the response tokens (the prompts once per run, before step
  1, untimed, its time printed), so its "% lim" in the live and on-policy rows is against TRL's work.
- CPU: "% lim" = bound / median step, the bound being the FLOPs at the best rate of a 2048³ matmul in
  the run's precision (float32, or bf16 under bf16 autocast) on the run's threads, measured at the start.
  Peak memory = the child's peak RSS.
- CUDA: "MFU" = FLOPs / (median step x the GPU's dense bf16 peak) from `PEAK_BF16` by
  `torch.cuda.get_device_name()` (H100 SXM and H200 989 TFLOP/s, A100 312); for a GPU not in the table
  (or an fp32 run) the reference is the measured 8192³ matmul rate, and the output says so. The measured
  rate is printed in every case. Peak memory = `torch.cuda.max_memory_allocated()` of the child (with
  vLLM this includes the engine's KV cache, which vLLM allocates through torch); host peak RSS is in
  the JSON too.
`--json` writes the rows, the skipped and failed configurations and the run's metadata (workload,
parameter counts, FLOP reference, versions), rewritten after every row so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


# ------------------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Shape:
    """A decoder's shape. kv_heads < heads is grouped-query attention; head dim = hidden / heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False  # input and output embeddings shared


@dataclass(frozen=True)
class Workload:
    """Everything one benchmark run fixes. B rows of P prompt + R response tokens, loss on the R."""

    name: str
    vocab: int  # V
    prompt: int  # P
    response: int  # R
    batch: int  # B
    steps: int
    warmup: int  # steps 1..warmup are not timed
    num_prompts: int  # the offline dataset (kdlab) / fixed teacher responses (TRL), and kdlab's stage-2 pool
    temperature: float  # of every sampling call
    threads: int  # torch CPU threads of every process
    teacher: Shape
    student: Shape
    arch: str = "llama"  # "llama" | "qwen2"
    device: str = "cpu"  # "cpu" | "cuda"
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, float32 weights) | "auto" (resolve_precision)
    max_positions: int = 128  # the models' max_position_embeddings (rotary: no weights, no FLOPs)
    lean_disk: bool = False  # stage-1 cache built once by the parent; children's run directories deleted
    auto_steps: int = 1500  # the *_auto rows: the length of the run that compile 'auto' decides for (--auto-steps)

    def auto_timing(self) -> "Workload":
        """The *_auto rows' timing: their warm-up covers the steps until 'auto''s choice is final
        (kdlab.pipeline.autocompile.SETTLED_AFTER: the eager probe, the compile, the alternating measurement), plus 3;
        then as many timed steps as the other rows."""
        from kdlab.pipeline.autocompile import SETTLED_AFTER

        warmup = SETTLED_AFTER + 3
        return replace(self, warmup=warmup, steps=warmup + self.steps - self.warmup)

    def data_key(self) -> dict:
        """What the saved models and fixed responses in --root depend on."""
        return {k: v for k, v in asdict(self).items()
                if k in ("vocab", "prompt", "response", "num_prompts", "temperature", "teacher", "student", "arch",
                         "max_positions")}

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        d = json.loads(text)
        return cls(**{**d, "teacher": Shape(**d["teacher"]), "student": Shape(**d["student"])})


PRESETS = {
    # issue 7's workload (the module constants of the first versions of this script)
    "tiny": Workload("tiny", vocab=512, prompt=16, response=48, batch=16, steps=24, warmup=3, num_prompts=512,
                     temperature=0.9, threads=2, teacher=Shape(256, 4, 8, 8, 1024), student=Shape(128, 2, 4, 4, 512)),
    # GPT-2 small / medium shapes as tied Llamas; intermediate sizes chosen for ~124M / ~350M (module docstring)
    "124m": Workload("124m", vocab=32_000, prompt=64, response=256, batch=8, steps=6, warmup=2, num_prompts=48,
                     temperature=0.9, threads=2, teacher=Shape(1024, 24, 16, 16, 2944, tied=True),
                     student=Shape(768, 12, 12, 12, 2560, tied=True), precision="auto", max_positions=512,
                     lean_disk=True),
    # Qwen2.5-0.5B / -1.5B shapes (their config.json), random init
    "qwen-0.5b-1.5b": Workload("qwen-0.5b-1.5b", vocab=151_936, prompt=64, response=128, batch=8, steps=6, warmup=2,
                               num_prompts=48, temperature=0.9, threads=4,
                               teacher=Shape(1536, 28, 12, 2, 8960, tied=True),
                               student=Shape(896, 24, 14, 2, 4864, tied=True), arch="qwen2", device="cuda",
                               precision="bf16", max_positions=32768, lean_disk=True),
}


def smoke(w: Workload) -> Workload:
    """`w` shrunk for a CPU in seconds: same architecture, tying, GQA (or not) and code paths."""

    def small(s: Shape, hidden: int, layers: int) -> Shape:
        return Shape(hidden, layers, 4, 4 if s.kv_heads == s.heads else 2, 2 * hidden, s.tied)

    return replace(w, name=f"{w.name}-smoke", vocab=256, prompt=8, response=16, batch=4, steps=4, warmup=1,
                   num_prompts=16, threads=1, teacher=small(w.teacher, 64, 2), student=small(w.student, 32, 1),
                   device="cpu", max_positions=64)


CONFIGS = {
    "off_fkl_cached": dict(regime="offline", targets="full", loss="forward_kl", beta=0.0),
    "off_fkl_live": dict(regime="offline", targets="none", loss="forward_kl", beta=0.0),
    "off_jsd_cached": dict(regime="offline", targets="full", loss="generalized_jsd", beta=0.5),
    "off_jsd_live": dict(regime="offline", targets="none", loss="generalized_jsd", beta=0.5),
    "off_rkl_cached": dict(regime="offline", targets="full", loss="reverse_kl", beta=1.0),
    "off_rkl_live": dict(regime="offline", targets="none", loss="reverse_kl", beta=1.0),
    "on_jsd": dict(regime="online_student", targets="none", loss="generalized_jsd", beta=0.5),
    # kdlab samples the student with vLLM (GPU only); TRL's GKDTrainer has no vLLM path: its on_jsd run.
    "on_jsd_vllm": dict(regime="online_student", targets="none", loss="generalized_jsd", beta=0.5, backend="vllm",
                        trl_same_as="on_jsd"),
    # The same rows with kdlab's stage2.compile_teacher=true (torch.compile'd teacher forward; TRL unchanged).
    "off_fkl_live_ct": dict(regime="offline", targets="none", loss="forward_kl", beta=0.0, compile=True),
    "off_jsd_live_ct": dict(regime="offline", targets="none", loss="generalized_jsd", beta=0.5, compile=True),
    "off_rkl_live_ct": dict(regime="offline", targets="none", loss="reverse_kl", beta=1.0, compile=True),
    "on_jsd_ct": dict(regime="online_student", targets="none", loss="generalized_jsd", beta=0.5, compile=True),
    # stage2.compile_student=true (the student's training forward/backward compiled), with the teacher
    # compiled too where it runs live.
    "off_fkl_cached_cs": dict(regime="offline", targets="full", loss="forward_kl", beta=0.0, compile_student=True),
    "off_jsd_cached_cs": dict(regime="offline", targets="full", loss="generalized_jsd", beta=0.5,
                              compile_student=True),
    "off_rkl_cached_cs": dict(regime="offline", targets="full", loss="reverse_kl", beta=1.0, compile_student=True),
    "off_fkl_live_c": dict(regime="offline", targets="none", loss="forward_kl", beta=0.0, compile=True,
                           compile_student=True),
    "off_jsd_live_c": dict(regime="offline", targets="none", loss="generalized_jsd", beta=0.5, compile=True,
                           compile_student=True),
    "off_rkl_live_c": dict(regime="offline", targets="none", loss="reverse_kl", beta=1.0, compile=True,
                           compile_student=True),
    "on_jsd_c": dict(regime="online_student", targets="none", loss="generalized_jsd", beta=0.5, compile=True,
                     compile_student=True),
}
# kdlab's defaults in a long run (the module docstring's *_auto).
CONFIGS.update({f"{n}_auto": {**CONFIGS[n], "auto": True, "trl_same_as": n}
                for n in ("off_fkl_cached", "off_jsd_cached", "off_rkl_cached", "off_fkl_live", "off_jsd_live",
                          "off_rkl_live", "on_jsd")})


def unavailable(name: str, w: Workload) -> str | None:
    """Why configuration `name` cannot run on this workload here, or None."""
    if CONFIGS[name].get("backend") != "vllm":
        return None
    if w.device != "cuda":
        return f"stage2.sampling.backend=vllm needs a CUDA GPU and this run is on {w.device} (--device cuda)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not importable in this environment (pip install 'kdlab[vllm]' on the GPU machine)"
    return None


def timed_steps(stamps: dict[int, float], w: Workload) -> list[float]:
    """Durations of steps warmup+1 .. steps-1 from the end-of-step timestamps."""
    return [stamps[k] - stamps[k - 1] for k in range(w.warmup + 1, w.steps)]


def synchronizer(w: Workload):
    """A call that waits for the GPU's queued work (on CUDA), else None."""
    if w.device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


PHASES = ("sampling", "teacher forward", "student forward + loss", "backward", "optimizer step")


class PhaseClock:
    """Wall time per phase and training step: `wrap` a callable, and every call adds its duration to
    the phase's entry for the step in progress (= steps completed so far, set by `step_done`).

    The same wrappers time both tools: `torch.Tensor.backward` (kdlab's `loss.backward()`, TRL's
    `accelerator.backward`) and `torch.optim.AdamW.step` (both optimizers). Wrappers sit outside any
    compiled region, so compiled rows are timed the same way. `sync` (CUDA: `torch.cuda.synchronize`) is
    called before and after each timed call, so queued GPU work is charged to the phase that queued it.
    """

    def __init__(self, w: Workload, sync=None):
        self.w, self.sync = w, sync
        self.done = 0
        self.log = {name: {} for name in PHASES}
        self.active: set[str] = set()  # phases being timed now: a nested call of the same phase is not counted twice

    def step_done(self, n: int) -> None:
        self.done = n

    def wrap(self, owner, attr: str, phase: str, static: bool = False, when=None) -> None:
        fn = getattr(owner, attr)
        clock = self

        def timed(*a, **k):
            if (when is not None and not when(*a)) or phase in clock.active:
                return fn(*a, **k)
            if clock.sync is not None:
                clock.sync()
            clock.active.add(phase)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if clock.sync is not None:
                    clock.sync()
                clock.active.discard(phase)
                d = clock.log[phase]
                d[clock.done] = d.get(clock.done, 0.0) + time.perf_counter() - t

        setattr(owner, attr, staticmethod(timed) if static else timed)

    def medians(self, steps: list[float], inner: tuple[str, str] | None = None) -> dict:
        """Median per timed step of each phase (0 where a phase never ran); `inner` = (outer, part):
        the outer timer includes the part, which is subtracted. "rest" = step − the phases: grad clip,
        zero_grad, the LR schedule, logging, the loop itself."""
        timed = range(self.w.warmup + 1, self.w.steps)
        per_step = {name: [self.log[name].get(k - 1, 0.0) for k in timed] for name in PHASES}
        if inner is not None:
            outer, part = inner
            per_step[outer] = [o - i for o, i in zip(per_step[outer], per_step[part])]
        out = {name: statistics.median(v) for name, v in per_step.items()}
        out["rest"] = statistics.median([s - sum(v[i] for v in per_step.values()) for i, s in enumerate(steps)])
        return out


# ------------------------------------------------------------------------------------------ FLOPs
def forward_flops(m: Shape, vocab: int, positions: int, keys: float, logits: int) -> float:
    """Matmul FLOPs of a Llama/Qwen2 forward: `positions` query positions attending to `keys` keys on
    average, the lm_head on `logits` positions (multiply-add = 2 FLOPs; element-wise work not counted).
    Per layer and position: Q and O projections h x h, K and V projections h x (kv_heads x head dim)
    (smaller under GQA), the gate/up/down MLP 3 x h x I, scores and values 2 x keys x h."""
    h, kv = m.hidden, m.kv_heads * (m.hidden // m.heads)
    per_position = m.layers * (2 * (2 * h * h + 2 * h * kv) + 2 * 3 * h * m.intermediate + 2 * 2 * keys * h)
    return positions * per_position + logits * 2 * h * vocab


def step_flops(w: Workload, regime: str, targets: str) -> dict[str, float]:
    """The matmul FLOPs of one training step, by phase: B rows of P + R tokens, loss on R of them."""
    B, P, R, V = w.batch, w.prompt, w.response, w.vocab
    n, causal = B * (P + R), (P + R + 1) / 2
    out = {"student forward + backward": 3 * forward_flops(w.student, V, n, causal, B * R)}
    if targets == "none":
        out["teacher forward"] = forward_flops(w.teacher, V, n, causal, B * R)
    if regime == "online_student":  # a P-token prefill, then R single-position steps over the cache
        out["sampling"] = (forward_flops(w.student, V, B * P, (P + 1) / 2, B)
                           + sum(forward_flops(w.student, V, B, P + t + 1, B) for t in range(R - 1)))
    return out


def matmul_rate(threads: int, n: int = 2048, repeats: int = 7, dtype=None) -> dict[str, float]:
    """CPU FLOP/s of an n³ matmul through torch on `threads` threads (best and median of `repeats`);
    float32 unless `dtype`."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t))
    return {"best": max(rates), "median": statistics.median(rates)}


def cuda_matmul_rate(dtype, n: int = 8192, repeats: int = 7) -> dict[str, float]:
    """GPU FLOP/s of an n³ matmul (best and median of `repeats`, after two warm-up calls)."""
    import torch

    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        rates.append(2 * n ** 3 / (time.perf_counter() - t))
    del a, b
    torch.cuda.empty_cache()
    return {"best": max(rates), "median": statistics.median(rates)}


# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM
# part; H100 PCIe / NVL are not listed and get the measured rate).
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H200": 989e12, "A100": 312e12}


def flop_reference(w: Workload) -> dict:
    """The FLOP rate the bounds and MFU divide by, how it was obtained, and the measured matmul rate."""
    import torch

    if w.device == "cpu":
        dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
        rate = matmul_rate(w.threads, dtype=None if w.precision != "bf16" else dtype)
        what = f"{'bf16' if w.precision == 'bf16' else 'float32'} 2048^3 matmul on {w.threads} threads"
        return {"per_s": rate["best"], "source": f"measured {what} (best of 7)", "measured": rate,
                "measured_what": what, "kind": "limit"}
    name = torch.cuda.get_device_name()
    dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
    rate = cuda_matmul_rate(dtype)
    what = f"{'bf16' if w.precision == 'bf16' else 'float32'} 8192^3 matmul on {name}"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if w.precision == "bf16" else None
    if peak is not None:
        return {"per_s": peak, "source": f"dense bf16 peak of {name} (PEAK_BF16 table)", "measured": rate,
                "measured_what": what, "gpu": name, "kind": "mfu"}
    why = "no fp32 peak table" if w.precision != "bf16" else "GPU not in the PEAK_BF16 table"
    return {"per_s": rate["best"], "source": f"measured {what} ({why}): MFU against the measured rate",
            "measured": rate, "measured_what": what, "gpu": name, "kind": "mfu"}


def resolve(w: Workload) -> tuple[Workload, str]:
    """`w` with precision 'auto' decided (CPU: bf16 when a bf16 matmul is at least as fast as float32 on
    this CPU; CUDA: bf16), and a line saying what was used and why."""
    import torch

    if w.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if w.precision != "auto":
        return w, f"precision {w.precision} (as set)"
    if w.device == "cuda":
        return replace(w, precision="bf16"), "precision bf16 (auto on CUDA)"
    fp32 = matmul_rate(w.threads, n=1024, repeats=5)["best"]
    bf16 = matmul_rate(w.threads, n=1024, repeats=5, dtype=torch.bfloat16)["best"]
    use = "bf16" if bf16 >= fp32 else "fp32"
    return replace(w, precision=use), (
        f"precision {use} (auto: 1024^3 matmul on {w.threads} threads, bf16 {bf16 / 1e9:.0f} vs float32 "
        f"{fp32 / 1e9:.0f} GFLOP/s; torch CPU capability {torch.backends.cpu.get_cpu_capability()})")


# ------------------------------------------------------------------------------------------ models
def make_models(w: Workload, root: Path) -> tuple[Path, Path]:
    import torch

    from kdlab.models import LM, tiny_llama_config

    out = []
    for name, m in {"teacher": w.teacher, "student": w.student}.items():
        d = root / name
        if not (d / "config.json").exists():
            torch.manual_seed(0 if name == "teacher" else 1)
            if w.arch == "llama":
                from transformers import LlamaForCausalLM

                cfg = tiny_llama_config(vocab_size=w.vocab, hidden_size=m.hidden, num_layers=m.layers,
                                        num_heads=m.heads, intermediate_size=m.intermediate,
                                        max_position_embeddings=w.max_positions, num_key_value_heads=m.kv_heads,
                                        tie_word_embeddings=m.tied)
                hf = LlamaForCausalLM(cfg)
            elif w.arch == "qwen2":
                from transformers import Qwen2Config, Qwen2ForCausalLM

                # Qwen2.5's config.json values; no BOS/EOS/PAD ids, as the synthetic world (full-length responses)
                cfg = Qwen2Config(vocab_size=w.vocab, hidden_size=m.hidden, intermediate_size=m.intermediate,
                                  num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                  num_key_value_heads=m.kv_heads, tie_word_embeddings=m.tied,
                                  max_position_embeddings=w.max_positions, rms_norm_eps=1e-6,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                  attn_implementation="sdpa")
                hf = Qwen2ForCausalLM(cfg)
            else:
                raise ValueError(f"arch {w.arch!r}: 'llama' or 'qwen2'")
            LM(hf.float()).save(d)
            del hf
        out.append(d)
    return out[0], out[1]


def param_count(directory: Path) -> int:
    """sum(p.numel()) over the parameters of the saved model (tied weights once), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(p.numel() for p in hf.parameters())


def describe(m: Shape) -> str:
    return (f"{m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} KV, intermediate {m.intermediate}, "
            f"{'tied' if m.tied else 'untied'}")


def check_root(w: Workload, root: Path) -> None:
    """--root keeps models and fixed responses between invocations: only for the same workload's data."""
    key = root / "workload.json"
    want = json.dumps(w.data_key(), sort_keys=True)
    if key.exists():
        if key.read_text() != want:
            raise SystemExit(f"--root {root} holds the models of another workload ({key}); use another --root")
    elif (root / "teacher").exists():
        raise SystemExit(f"--root {root} holds models without {key.name} (an older vs_trl.py?); use another --root")
    else:
        key.write_text(want)


# ------------------------------------------------------------------------------------------ kdlab
def kdlab_overrides(w: Workload, name: str, root: Path, work: Path) -> list[str]:
    c = CONFIGS[name]
    cache = root / "kd-cache" if w.lean_disk else root / "kd-cache-auto" if c.get("auto") else work / "cache"
    compile_student = "auto" if c.get("auto") else str(c.get("compile_student", False)).lower()
    compile_teacher = "auto" if c.get("auto") else str(c.get("compile", False)).lower()
    return [
        "world.oracle=none", f"models.teacher=hf:{root / 'teacher'}", f"models.student=hf:{root / 'student'}",
        f"world.vocab_size={w.vocab}", f"world.prompt_length={w.prompt}", f"world.response_length={w.response}",
        "world.pools.stage1=16", "stage1.teacher.num_samples=16", "stage1.student.num_samples=16",
        f"world.pools.stage2={w.num_prompts}", "world.pools.eval=4",
        "eval.num_prompts=4", "eval.num_points=2", "eval.train_prompts=0",
        f"stage2.batch_size={w.batch}", f"stage2.steps={w.auto_steps if c.get('auto') else w.steps}",
        f"stage2.regime={c['regime']}",
        f"stage2.sampling.temperature={w.temperature}",
        f"stage2.offline.num_prompts={w.num_prompts}", "stage2.offline.generations_per_prompt=1",
        f"stage2.offline.targets={c['targets']}",
        f"loss.name={c['loss']}", "loss.beta=0.5", f"threads={w.threads}",
        f"output_dir={work / 'run'}", f"cache_dir={cache}",
        f"stage2.compile_teacher={compile_teacher}", f"stage2.compile_student={compile_student}",
        f"device={w.device}", f"precision={'bf16' if w.precision == 'bf16' else 'float32'}",
        f"stage2.sampling.backend={c.get('backend', 'builtin')}",
    ]


def prepare_world(w: Workload, name: str, root: Path) -> None:
    """Build kdlab's stage-1 cache (the teacher and student copied into it, the prompt pools) once, before
    any timing, for the children of a lean_disk workload: the stage-1 key is the same for every config."""
    from kdlab.config import build_config
    from kdlab.pipeline.world import build_world

    cfg = build_config({}, kdlab_overrides(w, name, root, root / "kd-prepare"))
    build_world(cfg, device="cpu", log=lambda m: None)


class _Enough(Exception):
    """An *_auto row's run has given its timed steps (its configured length is --auto-steps)."""


def child_kdlab(w: Workload, name: str, root: Path, tag: str) -> dict:
    import torch

    import kdlab.pipeline.distill as D
    from kdlab.models import LM
    from kdlab.models.prefix import PromptCachedTeacher
    from kdlab.config import build_config
    from kdlab.data import sources
    from kdlab.pipeline.distill import run

    c = CONFIGS[name]
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"kd-{name}-{tag}-"))
    cfg = build_config({}, kdlab_overrides(w, name, root, work))
    stamps: dict[int, float] = {}
    sync = synchronizer(w)
    clock = PhaseClock(w, sync)

    def on_step(step, total):
        if sync is not None:
            sync()
        stamps[step] = time.perf_counter()
        clock.step_done(step)
        if c.get("auto") and step == w.steps:
            raise _Enough

    source_cls = sources.OfflineSource if c["regime"] == "offline" else sources.OnlineStudentSource
    clock.wrap(source_cls, "batch", "sampling")
    clock.wrap(D, "loss_on_batch", "student forward + loss")
    clock.wrap(LM, "response_logits", "teacher forward",
               when=lambda lm, *a: getattr(lm.hf, "config", None) is not None
               and lm.hf.config.hidden_size == w.teacher.hidden)
    clock.wrap(PromptCachedTeacher, "response_logits", "teacher forward")  # the default live teacher (Llama)
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer step")
    t0 = time.perf_counter()
    said: list[str] = []
    try:
        run(cfg, progress=False, on_step=on_step, log=said.append)
    except _Enough:
        pass
    steps = timed_steps(stamps, w)
    return {"steps": steps, "wall": time.perf_counter() - t0,
            "phases": clock.medians(steps, inner=("student forward + loss", "teacher forward")),
            "compile_auto": [m for m in said if m.startswith("[compile auto]")],
            "prompt_cache": [m for m in said if "teacher prompt cache" in m]}


# ------------------------------------------------------------------------------------------ TRL
def fixed_responses(w: Workload, root: Path):
    """num_prompts uniform prompts and one teacher sample each (at the workload's temperature), made once
    and cached."""
    import torch

    path = root / "fixed.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from kdlab.models import LM, bf16_autocast
    from kdlab.models.sampling import sample

    teacher = LM.load(root / "teacher", device=w.device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, w.vocab, (w.num_prompts, w.prompt), generator=g)
    g_sample = g if w.device == "cpu" else torch.Generator(device=w.device).manual_seed(0)
    resp = []
    with torch.no_grad(), bf16_autocast(w.device, w.precision == "bf16"):
        for i in range(0, w.num_prompts, 64):
            s = sample(teacher, prompts[i:i + 64], max_new_tokens=w.response, temperature=w.temperature,
                       generator=g_sample)
            resp.append(s.response_ids_BxR.cpu())
    data = {"prompts": prompts, "responses": torch.cat(resp)}
    torch.save(data, path)
    del teacher
    if w.device == "cuda":
        torch.cuda.empty_cache()
    return data


def tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def child_trl(w: Workload, name: str, root: Path, tag: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(w.threads)
    c = CONFIGS[name]
    data = fixed_responses(w, root)
    prompts, responses = data["prompts"], data["responses"]
    ids = torch.cat([prompts, responses], 1)
    labels = ids.clone()
    labels[:, :w.prompt] = -100
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "prompts": prompts.tolist()})

    def collate(rows):
        out = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "prompts")}
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        out["prompt_attention_mask"] = torch.ones_like(out["prompts"])
        return out

    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(root / "student", **kw)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", **kw)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"trl-{name}-{tag}-"))
    args = GKDConfig(
        output_dir=str(work), use_cpu=w.device == "cpu", bf16=w.precision == "bf16", fp16=False,
        gradient_checkpointing=False,
        lmbda=1.0 if c["regime"] == "online_student" else 0.0, beta=c["beta"], seq_kd=False,
        max_new_tokens=w.response, temperature=w.temperature, per_device_train_batch_size=w.batch,
        max_steps=w.steps, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    stamps: dict[int, float] = {}
    sync = synchronizer(w)
    clock = PhaseClock(w, sync)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if sync is not None:
                sync()
            stamps[state.global_step] = time.perf_counter()
            clock.step_done(state.global_step)

    clock.wrap(GKDTrainer, "generate_on_policy_outputs", "sampling", static=True)
    clock.wrap(GKDTrainer, "compute_loss", "student forward + loss")
    clock.wrap(teacher, "forward", "teacher forward")
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer step")
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                         data_collator=collate, processing_class=tiny_tokenizer(w.vocab), callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    steps = timed_steps(stamps, w)
    return {"steps": steps, "wall": time.perf_counter() - t0,
            "phases": clock.medians(steps, inner=("student forward + loss", "teacher forward"))}


# ------------------------------------------------------------------------------------------ driver
def child_main(w: Workload, side: str, name: str, root: Path, tag: str) -> None:
    import torch

    torch.set_num_threads(w.threads)
    res = (child_kdlab if side == "kdlab" else child_trl)(w, name, root, tag)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if w.device == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(w: Workload, side: str, name: str, root: Path, tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(w.threads), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    if CONFIGS[name].get("backend") == "vllm" and side == "kdlab":
        # kdlab's vLLM engines use distributed_executor_backend="external_launcher" (in this process, as TRL's
        # colocate mode), which rendezvouses through torch.distributed's env:// variables: a one-process world
        # (WORLD_SIZE=1 keeps kdlab itself single-process: kdlab.pipeline.distributed).
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if CONFIGS[name].get("auto") and side == "kdlab":
        w = w.auto_timing()
    p = subprocess.run([sys.executable, __file__, "--child", side, name, str(root), tag,
                        "--workload", json.dumps(asdict(w))], capture_output=True, text=True, env=env)
    if w.lean_disk:  # the child's run / output directory (the Qwen student's checkpoint is 6 GB)
        for d in root.glob(f"{'kd' if side == 'kdlab' else 'trl'}-{name}-{tag}-*"):
            shutil.rmtree(d, ignore_errors=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} {name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def spread(steps: list[float]) -> str:
    return f"{min(steps) * 1e3:.1f}-{max(steps) * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--smoke", action="store_true", help="the preset shrunk to seconds on a CPU (keeps the code paths)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="override the preset's device")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None,
                    help="override the preset's precision (bf16 = bf16 autocast over float32 weights)")
    ap.add_argument("--threads", type=int, default=None, help="override the preset's torch CPU threads")
    ap.add_argument("--configs", default=None, help="comma-separated (default: all; on the CPU all but on_jsd_vllm)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--auto-steps", type=int, default=None,
                    help="the *_auto rows: the run length compile 'auto' decides for (default 1500, the demo's)")
    ap.add_argument("--root", default=None, help="directory for the models and runs (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, name, root, tag = a.child
        child_main(Workload.from_json(a.workload), side, name, Path(root), tag)
        return
    w = smoke(PRESETS[a.preset]) if a.smoke else PRESETS[a.preset]
    w = replace(w, **{k: v for k, v in (("device", a.device), ("precision", a.precision), ("threads", a.threads),
                                        ("auto_steps", a.auto_steps)) if v is not None})
    names = a.configs.split(",") if a.configs else [n for n in CONFIGS
                                                     if w.device == "cuda" or "backend" not in CONFIGS[n]]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    import torch

    torch.set_num_threads(w.threads)
    w, precision_line = resolve(w)
    root = Path(a.root or tempfile.mkdtemp(prefix="vs_trl-"))
    root.mkdir(parents=True, exist_ok=True)
    check_root(w, root)
    make_models(w, root)
    params = {who: param_count(root / who) for who in ("teacher", "student")}
    print(f"workload {w.name}: {w.arch}, V={w.vocab:,}, batch {w.batch} x ({w.prompt} prompt + {w.response} response) "
          f"tokens, {w.steps} steps ({w.warmup} warm-up, {w.steps - w.warmup - 1} timed), {w.device}, "
          f"{w.threads} threads; {precision_line}", flush=True)
    for who, m in (("teacher", w.teacher), ("student", w.student)):
        print(f"{who}: {params[who]:,} parameters ({describe(m)})", flush=True)
    if w.lean_disk:
        runnable = [n for n in names if unavailable(n, w) is None]
        if runnable:
            prepare_world(w, runnable[0], root)
    fixed_responses(w, root)  # made before any timing
    ref = flop_reference(w)
    meas = ref["measured"]
    print(f"{ref['measured_what']}: {meas['best'] / 1e9:,.0f} GFLOP/s best, {meas['median'] / 1e9:,.0f} median; "
          f"FLOP {'bounds' if ref['kind'] == 'limit' else 'utilisation'} below use {ref['source']}"
          + (f" = {ref['per_s'] / 1e12:,.0f} TFLOP/s" if ref["kind"] == "mfu" else ""), flush=True)
    frac, mem = ("%lim", "MB") if ref["kind"] == "limit" else ("MFU", "cuda MB")
    mem_key = "peak_rss_mb" if w.device == "cpu" else "peak_cuda_mb"
    meta = None
    results, skipped, failures = [], [], []

    def write_json():
        nonlocal meta
        if not a.json:
            return
        if meta is None:
            import platform

            import transformers
            import trl
            meta = {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__, "threads": w.threads,
                    "batch": w.batch, "prompt": w.prompt, "response": w.response, "steps": w.steps,
                    "warmup": w.warmup, "matmul_flops_per_s": meas, "cpu": platform.processor() or platform.machine(),
                    "preset": a.preset, "smoke": a.smoke, "workload": asdict(w), "device": w.device,
                    "precision": w.precision, "precision_reason": precision_line, "params": params,
                    "flop_reference": ref}
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results, "skipped": skipped,
                                            "failures": failures}, indent=1))

    print(f"{'config':18} {'rep':>3} {'kdlab ms':>9} {'TRL ms':>9} {'TRL/kdlab':>9} {'bound ms':>8} "
          f"{'kdlab ' + frac:>10} {'TRL ' + frac:>8} {'kdlab tok/s':>11} {'TRL tok/s':>9} "
          f"{'kdlab ' + mem:>8} {'TRL ' + mem:>7}", flush=True)
    trl_done: dict[tuple[str, int], dict] = {}
    for rep in range(a.repeats):
        for name in names:
            why = unavailable(name, w)
            if why is not None:
                print(f"{name:18} {rep:>3} skipped: {why}", flush=True)
                if rep == 0:
                    skipped.append({"config": name, "reason": why})
                    write_json()
                continue
            c = CONFIGS[name]
            try:
                k = run_child(w, "kdlab", name, root, f"r{rep}")
                reused = c.get("trl_same_as") if (c.get("trl_same_as"), rep) in trl_done else None
                t = trl_done[(reused, rep)] if reused else run_child(w, "trl", name, root, f"r{rep}")
            except RuntimeError as err:
                print(f"{name:18} {rep:>3} FAILED: {err}", flush=True)
                failures.append({"config": name, "repeat": rep, "error": str(err)[-4000:]})
                write_json()
                continue
            trl_done[(name, rep)] = t
            km, tm = statistics.median(k["steps"]), statistics.median(t["steps"])
            flops = step_flops(w, c["regime"], c["targets"])
            bound = sum(flops.values()) / ref["per_s"]
            tokens = w.batch * w.response
            row = {"config": name, "repeat": rep, **c,
                   "kdlab_median_s": km, "trl_median_s": tm, "speedup": tm / km,
                   "flops_per_step": flops, "flop_bound_s": bound,
                   "kdlab_fraction_of_limit": bound / km, "trl_fraction_of_limit": bound / tm,
                   "kdlab_tokens_per_s": tokens / km, "trl_tokens_per_s": tokens / tm,
                   "kdlab_peak_rss_mb": k["peak_rss_mb"], "trl_peak_rss_mb": t["peak_rss_mb"],
                   "kdlab_steps_s": k["steps"], "trl_steps_s": t["steps"],
                   "kdlab_wall_s": k["wall"], "trl_wall_s": t["wall"],
                   "kdlab_phases_s": k["phases"], "trl_phases_s": t["phases"],
                   "kdlab_compile_auto": k.get("compile_auto", []), "kdlab_prompt_cache": k.get("prompt_cache", [])}
            if w.device == "cuda":
                row.update(kdlab_peak_cuda_mb=k["peak_cuda_mb"], trl_peak_cuda_mb=t["peak_cuda_mb"])
            if reused:
                row["trl_reused_from"] = reused
            results.append(row)
            print(f"{name:18} {rep:>3} {km * 1e3:9.1f} {tm * 1e3:9.1f} {tm / km:8.2f}x {bound * 1e3:8.1f} "
                  f"{bound / km:10.0%} {bound / tm:8.0%} {tokens / km:11.0f} {tokens / tm:9.0f} "
                  f"{k[mem_key]:8.0f} {t[mem_key]:7.0f}", flush=True)
            for side, ph in (("kdlab", k["phases"]), ("TRL", t["phases"])):
                print(f"    {side:5}: " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in ph.items()) + " ms", flush=True)
            print(f"    steps min-max ms (n={len(k['steps'])}): kdlab {spread(k['steps'])}, TRL {spread(t['steps'])}"
                      + (f" (TRL: its {reused} run)" if reused else ""), flush=True)
            for line in k.get("compile_auto", []) + k.get("prompt_cache", []):
                print(f"    kdlab {line}", flush=True)
            if "sampling" in flops:
                print(f"    sampling bound {flops['sampling'] / ref['per_s'] * 1e3:.1f} ms: kdlab "
                      f"{flops['sampling'] / ref['per_s'] / k['phases']['sampling']:.0%}, TRL "
                      f"{flops['sampling'] / ref['per_s'] / t['phases']['sampling']:.0%} of the "
                      f"{'limit' if ref['kind'] == 'limit' else 'peak'}", flush=True)
            write_json()
    write_json()
    if failures:
        raise SystemExit(f"{len(failures)} configuration run(s) failed: " + ", ".join(f["config"] for f in failures))


if __name__ == "__main__":
    main()
