"""kdlab's distillation loop vs TRL's GKDTrainer on the same tiny Llama workload (issue 7).

Workload: teacher Llama 4 layers / hidden 256 / 8 heads / intermediate 1024; student 2 / 128 / 4 / 512
(head dim 32); vocab 512, no EOS (every response is full length), untied embeddings, float32, random
init, SDPA, 2 torch threads. Batches of 16 prompts of 16 tokens + 48 response tokens, AdamW, loss on
response positions only.

Configurations (kdlab | TRL):
  off_fkl_cached   offline regime, targets=full (cached teacher log-probs), forward KL | lmbda=0, beta=0
  off_fkl_live     offline regime, targets=none (live teacher forward), forward KL   | lmbda=0, beta=0
  off_jsd_cached   ... generalized JSD beta=0.5                                        | lmbda=0, beta=0.5
  off_jsd_live
  off_rkl_cached   ... reverse KL                                                      | lmbda=0, beta=1
  off_rkl_live
  on_jsd           online_student, temperature 0.9, JSD beta=0.5                       | lmbda=1, beta=0.5
  *_ct             the live rows and on_jsd again with kdlab's stage2.compile_teacher=true (TRL as above)
  *_cs / *_c       with stage2.compile_student=true: the cached rows (_cs); the live rows and on_jsd with
                   both the student and the teacher compiled (_c; on-policy this includes the student's
                   compiled decode step)

kdlab runs its real loop, `kdlab.pipeline.distill.run(cfg, on_step=...)` (what `kdlab run` runs); the
step time is the gap between consecutive `on_step` calls. TRL runs `GKDTrainer.train()` with a
callback timing `on_step_end`. Both: 24 steps, steps 1-3 warm-up, steps 4..23 timed (20 steps; kdlab
evaluates at steps 0, 1 and 24, so the last step is excluded). Off-policy, both train on the same fixed
teacher responses (sampled once at temperature 0.9; kdlab samples its own offline dataset the same way
before step 1, outside the timing).

Every measurement runs in its own child process (clean peak RSS), alternating kdlab, TRL, kdlab, TRL...

Where the time goes (both tools, the same wrappers where the code is shared): sampling (kdlab's
regime `batch`, TRL's `generate_on_policy_outputs`), teacher forward (kdlab's `LM.response_logits` on
the teacher, TRL's teacher module), student forward + loss (kdlab's `loss_on_batch`, TRL's
`compute_loss`, less the teacher), backward (`torch.Tensor.backward`), optimizer step
(`torch.optim.AdamW.step`), rest (clip, zero_grad, schedule, loop). The FLOP bound of a step is its
matmul FLOPs (`step_flops`) at the best rate of a 2048^3 float32 matmul measured at the start of the
run; "% of limit" = bound / median step.

    .venv/bin/python bench/vs_trl.py [--configs off_fkl_cached,on_jsd] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V, P, R, B = 512, 16, 48, 16
STEPS, WARMUP = 24, 3
NUM_PROMPTS = 512
TEMP = 0.9
THREADS = 2

CONFIGS = {
    "off_fkl_cached": dict(regime="offline", targets="full", loss="forward_kl", beta=0.0),
    "off_fkl_live": dict(regime="offline", targets="none", loss="forward_kl", beta=0.0),
    "off_jsd_cached": dict(regime="offline", targets="full", loss="generalized_jsd", beta=0.5),
    "off_jsd_live": dict(regime="offline", targets="none", loss="generalized_jsd", beta=0.5),
    "off_rkl_cached": dict(regime="offline", targets="full", loss="reverse_kl", beta=1.0),
    "off_rkl_live": dict(regime="offline", targets="none", loss="reverse_kl", beta=1.0),
    "on_jsd": dict(regime="online_student", targets="none", loss="generalized_jsd", beta=0.5),
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


def timed_steps(stamps: dict[int, float]) -> list[float]:
    """Durations of steps WARMUP+1 .. STEPS-1 from the end-of-step timestamps."""
    return [stamps[k] - stamps[k - 1] for k in range(WARMUP + 1, STEPS)]


PHASES = ("sampling", "teacher forward", "student forward + loss", "backward", "optimizer step")


class PhaseClock:
    """Wall time per phase and training step: `wrap` a callable, and every call adds its duration to
    the phase's entry for the step in progress (= steps completed so far, set by `step_done`).

    The same wrappers time both tools: `torch.Tensor.backward` (kdlab's `loss.backward()`, TRL's
    `accelerator.backward`) and `torch.optim.AdamW.step` (both optimizers). Wrappers sit outside any
    compiled region, so compiled rows are timed the same way.
    """

    def __init__(self):
        self.done = 0
        self.log = {name: {} for name in PHASES}

    def step_done(self, n: int) -> None:
        self.done = n

    def wrap(self, owner, attr: str, phase: str, static: bool = False, when=None) -> None:
        fn = getattr(owner, attr)
        clock = self

        def timed(*a, **k):
            if when is not None and not when(*a):
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                d = clock.log[phase]
                d[clock.done] = d.get(clock.done, 0.0) + time.perf_counter() - t

        setattr(owner, attr, staticmethod(timed) if static else timed)

    def medians(self, steps: list[float], inner: tuple[str, str] | None = None) -> dict:
        """Median per timed step of each phase (0 where a phase never ran); `inner` = (outer, part):
        the outer timer includes the part, which is subtracted. "rest" = step − the phases: grad clip,
        zero_grad, the LR schedule, logging, the loop itself."""
        per_step = {name: [self.log[name].get(k - 1, 0.0) for k in range(WARMUP + 1, STEPS)] for name in PHASES}
        if inner is not None:
            outer, part = inner
            per_step[outer] = [o - i for o, i in zip(per_step[outer], per_step[part])]
        out = {name: statistics.median(v) for name, v in per_step.items()}
        out["rest"] = statistics.median([s - sum(v[i] for v in per_step.values()) for i, s in enumerate(steps)])
        return out


def is_teacher(module) -> bool:
    return getattr(module, "config", None) is not None and module.config.hidden_size == TEACHER[0]


# ------------------------------------------------------------------------------------------ FLOPs
TEACHER, STUDENT = (256, 4, 8, 1024), (128, 2, 4, 512)  # hidden, layers, heads, intermediate


def forward_flops(model: tuple, positions: int, keys: float, logits: int) -> float:
    """Matmul FLOPs of a Llama forward: `positions` query positions attending to `keys` keys on
    average, the lm_head on `logits` positions (multiply-add = 2 FLOPs; element-wise work not counted)."""
    h, layers, heads, inter = model
    per_position = layers * (2 * 4 * h * h + 2 * 3 * h * inter + 2 * 2 * keys * h)
    return positions * per_position + logits * 2 * h * V


def step_flops(regime: str, targets: str) -> dict[str, float]:
    """The matmul FLOPs of one training step, by phase: B rows of P + R tokens, loss on R of them."""
    n, causal = B * (P + R), (P + R + 1) / 2
    out = {"student forward + backward": 3 * forward_flops(STUDENT, n, causal, B * R)}
    if targets == "none":
        out["teacher forward"] = forward_flops(TEACHER, n, causal, B * R)
    if regime == "online_student":  # a P-token prefill, then R single-position steps over the cache
        out["sampling"] = (forward_flops(STUDENT, B * P, (P + 1) / 2, B)
                           + sum(forward_flops(STUDENT, B, P + t + 1, B) for t in range(R - 1)))
    return out


def matmul_rate(n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """float32 FLOP/s of an n³ matmul through torch on THREADS threads (best and median of `repeats`)."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t))
    return {"best": max(rates), "median": statistics.median(rates)}


def make_models(root: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaForCausalLM

    from kdlab.models import LM, tiny_llama_config

    out = []
    for name, (h, L, nh, inter) in {"teacher": TEACHER, "student": STUDENT}.items():
        d = root / name
        if not (d / "config.json").exists():
            torch.manual_seed(0 if name == "teacher" else 1)
            cfg = tiny_llama_config(vocab_size=V, hidden_size=h, num_layers=L, num_heads=nh,
                                    intermediate_size=inter, max_position_embeddings=128)
            LM(LlamaForCausalLM(cfg).float()).save(d)
        out.append(d)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------ kdlab
def child_kdlab(name: str, root: Path, tag: str) -> dict:
    import torch

    import kdlab.pipeline.distill as D
    from kdlab.models import LM
    from kdlab.config import build_config
    from kdlab.data import sources
    from kdlab.pipeline.distill import run

    c = CONFIGS[name]
    teacher, student = root / "teacher", root / "student"
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"kd-{name}-{tag}-"))
    ov = [
        "world.oracle=none", f"models.teacher=hf:{teacher}", f"models.student=hf:{student}",
        f"world.vocab_size={V}", f"world.prompt_length={P}", f"world.response_length={R}",
        "world.pools.stage1=16", "stage1.teacher.num_samples=16", "stage1.student.num_samples=16",
        f"world.pools.stage2={NUM_PROMPTS}", "world.pools.eval=4",
        "eval.num_prompts=4", "eval.num_points=2", "eval.train_prompts=0",
        f"stage2.batch_size={B}", f"stage2.steps={STEPS}", f"stage2.regime={c['regime']}",
        f"stage2.sampling.temperature={TEMP}",
        f"stage2.offline.num_prompts={NUM_PROMPTS}", "stage2.offline.generations_per_prompt=1",
        f"stage2.offline.targets={c['targets']}",
        f"loss.name={c['loss']}", "loss.beta=0.5", f"threads={THREADS}",
        f"output_dir={work / 'run'}", f"cache_dir={work / 'cache'}",
        f"stage2.compile_teacher={str(c.get('compile', False)).lower()}",
        f"stage2.compile_student={str(c.get('compile_student', False)).lower()}",
    ]
    cfg = build_config({}, ov)
    stamps: dict[int, float] = {}
    clock = PhaseClock()

    def on_step(step, total):
        stamps[step] = time.perf_counter()
        clock.step_done(step)

    source_cls = sources.OfflineSource if c["regime"] == "offline" else sources.OnlineStudentSource
    clock.wrap(source_cls, "batch", "sampling")
    clock.wrap(D, "loss_on_batch", "student forward + loss")
    clock.wrap(LM, "response_logits", "teacher forward", when=lambda lm, *a: is_teacher(lm.hf))
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer step")
    t0 = time.perf_counter()
    run(cfg, progress=False, on_step=on_step, log=lambda m: None)
    steps = timed_steps(stamps)
    return {"steps": steps, "wall": time.perf_counter() - t0,
            "phases": clock.medians(steps, inner=("student forward + loss", "teacher forward"))}


# ------------------------------------------------------------------------------------------ TRL
def fixed_responses(root: Path):
    """512 uniform prompts and one teacher sample each (temperature 0.9), made once and cached."""
    import torch

    path = root / "fixed.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from kdlab.models import LM
    from kdlab.models.sampling import sample

    teacher = LM.load(root / "teacher")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (NUM_PROMPTS, P), generator=g)
    resp = []
    with torch.no_grad():
        for i in range(0, NUM_PROMPTS, 64):
            s = sample(teacher, prompts[i:i + 64], max_new_tokens=R, temperature=TEMP, generator=g)
            resp.append(s.response_ids_BxR)
    data = {"prompts": prompts, "responses": torch.cat(resp)}
    torch.save(data, path)
    return data


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def child_trl(name: str, root: Path, tag: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(THREADS)
    c = CONFIGS[name]
    data = fixed_responses(root)
    prompts, responses = data["prompts"], data["responses"]
    ids = torch.cat([prompts, responses], 1)
    labels = ids.clone()
    labels[:, :P] = -100
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
        output_dir=str(work), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        lmbda=1.0 if c["regime"] == "online_student" else 0.0, beta=c["beta"], seq_kd=False,
        max_new_tokens=R, temperature=TEMP, per_device_train_batch_size=B, max_steps=STEPS,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    stamps: dict[int, float] = {}
    clock = PhaseClock()

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps[state.global_step] = time.perf_counter()
            clock.step_done(state.global_step)

    clock.wrap(GKDTrainer, "generate_on_policy_outputs", "sampling", static=True)
    clock.wrap(GKDTrainer, "compute_loss", "student forward + loss")
    clock.wrap(teacher, "forward", "teacher forward")
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer step")
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                         data_collator=collate, processing_class=tiny_tokenizer(), callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    steps = timed_steps(stamps)
    return {"steps": steps, "wall": time.perf_counter() - t0,
            "phases": clock.medians(steps, inner=("student forward + loss", "teacher forward"))}


# ------------------------------------------------------------------------------------------ driver
def child_main(side: str, name: str, root: Path, tag: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    res = (child_kdlab if side == "kdlab" else child_trl)(name, root, tag)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def run_child(side: str, name: str, root: Path, tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, __file__, "--child", side, name, str(root), tag],
                       capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} {name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--root", default=None, help="directory for the models and runs (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, name, root, tag = a.child
        child_main(side, name, Path(root), tag)
        return
    root = Path(a.root or tempfile.mkdtemp(prefix="vs_trl-"))
    root.mkdir(parents=True, exist_ok=True)
    make_models(root)
    import torch
    torch.set_num_threads(THREADS)
    fixed_responses(root)  # made before any timing
    rate = matmul_rate()
    print(f"float32 2048^3 matmul on {THREADS} threads: {rate['best'] / 1e9:.0f} GFLOP/s best, "
          f"{rate['median'] / 1e9:.0f} median; FLOP bounds below use the best", flush=True)
    results = []
    print(f"{'config':18} {'rep':>3} {'kdlab ms':>9} {'TRL ms':>9} {'TRL/kdlab':>9} {'bound ms':>8} "
          f"{'kdlab %lim':>10} {'TRL %lim':>8} {'kdlab tok/s':>11} {'TRL tok/s':>9} {'kdlab MB':>8} {'TRL MB':>7}",
          flush=True)
    for rep in range(a.repeats):
        for name in a.configs.split(","):
            k = run_child("kdlab", name, root, f"r{rep}")
            t = run_child("trl", name, root, f"r{rep}")
            km, tm = statistics.median(k["steps"]), statistics.median(t["steps"])
            flops = step_flops(CONFIGS[name]["regime"], CONFIGS[name]["targets"])
            bound = sum(flops.values()) / rate["best"]
            row = {"config": name, "repeat": rep, **CONFIGS[name],
                   "kdlab_median_s": km, "trl_median_s": tm, "speedup": tm / km,
                   "flops_per_step": flops, "flop_bound_s": bound,
                   "kdlab_fraction_of_limit": bound / km, "trl_fraction_of_limit": bound / tm,
                   "kdlab_tokens_per_s": B * R / km, "trl_tokens_per_s": B * R / tm,
                   "kdlab_peak_rss_mb": k["peak_rss_mb"], "trl_peak_rss_mb": t["peak_rss_mb"],
                   "kdlab_steps_s": k["steps"], "trl_steps_s": t["steps"],
                   "kdlab_wall_s": k["wall"], "trl_wall_s": t["wall"],
                   "kdlab_phases_s": k["phases"], "trl_phases_s": t["phases"]}
            results.append(row)
            print(f"{name:18} {rep:>3} {km * 1e3:9.1f} {tm * 1e3:9.1f} {tm / km:8.2f}x {bound * 1e3:8.1f} "
                  f"{bound / km:10.0%} {bound / tm:8.0%} {B * R / km:11.0f} {B * R / tm:9.0f} "
                  f"{k['peak_rss_mb']:8.0f} {t['peak_rss_mb']:7.0f}", flush=True)
            for side, ph in (("kdlab", k["phases"]), ("TRL", t["phases"])):
                print(f"    {side:5}: " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in ph.items()) + " ms", flush=True)
            if "sampling" in flops:
                print(f"    sampling bound {flops['sampling'] / rate['best'] * 1e3:.1f} ms: kdlab "
                      f"{flops['sampling'] / rate['best'] / k['phases']['sampling']:.0%}, TRL "
                      f"{flops['sampling'] / rate['best'] / t['phases']['sampling']:.0%} of the limit", flush=True)
    if a.json:
        import platform

        import transformers
        import trl
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__, "threads": THREADS,
                "batch": B, "prompt": P, "response": R, "steps": STEPS, "warmup": WARMUP,
                "matmul_flops_per_s": rate, "cpu": platform.processor() or platform.machine()}
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
