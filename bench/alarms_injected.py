"""Each drift-panel alarm against a failure built on purpose (issue 21, item 4), in TRL's SFTTrainer.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/alarms_injected.py

A tiny teacher is trained to answer 3-word prompts with 4 random words of eight and `<eos>` (per-token entropy
about log 8 on the answer). A student is first trained the same way (a pretrained student that behaves like the
teacher), then distilled for 120 steps, watched by the monitor with `drift=True`, on data that differs from the
teacher in one controlled way:

    control      the teacher's own kind of answers (nothing injected)
    longer       8 words instead of 4                     -> length_inflation
    wrong_eos    ends with <user>, another tokenizer's EOS -> eos_mismatch
    greedy       the teacher's greedy answer to each prompt (temperature 0: one answer per prompt)
                                                          -> entropy_collapse
    repeats      one word repeated 4 times                 -> repetition_collapse

Printed: the alarms that fired, with their onset steps, for each; the table goes into docs/LOG.md.

`--controls N` instead runs the control case N times, each with its own seeds (teacher and student weights and
data: seed base 100 + i), for the alarms' false-alarm rate on healthy trainer runs (protocol H, docs/LOG.md).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup():
    """What both modes share: one thread, the examples' tiny tokenizer and models, and 32 evaluation prompts."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tiny, ex = _example("monitor_gkd"), _example("monitor_distillation")
    tok, words = tiny.tiny_tokenizer(), tiny.WORDS
    eval_prompts = [tok.apply_chat_template([{"role": "user", "content": f"{a} {b} {c}"}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
                    for a, b, c in zip(words[:8] * 4, words[1:8] * 5, words[2:8] * 6)][:32]
    return tiny, ex, tok, words, tok.eos_token_id, eval_prompts


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controls", type=int, default=0, help="run only the control case, N times with fresh seeds")
    args = ap.parse_args()
    if args.controls:
        return controls(args.controls)
    from kdlab.integrations import TeacherHackingMonitor

    tiny, ex, tok, words, eos, eval_prompts = _setup()
    word_ids = [tok.convert_tokens_to_ids(w) for w in words[8:16]]
    tmp = Path(tempfile.mkdtemp(prefix="kdlab-alarms-"))
    teacher = tiny.tiny_model(len(tok), 32, 1, eos, tok.pad_token_id)
    ex.pretrain(teacher, tok, words, eos, str(tmp / "teacher"), 120, 0)

    @torch.no_grad()
    def greedy(rng, prompt):
        ids = torch.tensor([prompt])
        out = []
        for _ in range(4):
            logits = teacher(input_ids=ids).logits[0, -1]
            nxt = word_ids[int(logits[word_ids].argmax())]
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        return out

    cases = {
        "control": (eos, None),
        "longer": (eos, lambda rng, p: rng.choices(word_ids, k=8)),
        "wrong_eos": (tok.convert_tokens_to_ids("<user>"), None),
        "greedy": (eos, greedy),
        "repeats": (eos, lambda rng, p: [rng.choice(word_ids)] * 4),
    }
    print("| distilled on | alarms fired (onset step) | last: length s/t, no-EOS s/t, entropy s/t, repetition s/t, exposure gap |")
    print("|---|---|---|")
    for name, (end, answer) in cases.items():
        student = tiny.tiny_model(len(tok), 16, 2, eos, tok.pad_token_id)
        ex.pretrain(student, tok, words, eos, str(tmp / f"pre-{name}"), 200, 1)
        monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=12, num_points=6,
                                        drift=True)
        ex.pretrain(student, tok, words, end, str(tmp / name), 120, 2, answer=answer, monitor=monitor)
        h = monitor.history[-1]
        fired = ", ".join(f"{n} ({v.onset_step})" for n, v in monitor.alarms.items()) or "none"
        print(f"| {name} | {fired} | {h['length_student']:.1f}/{h['length_teacher']:.1f}, "
              f"{h['no_eos_student']:.2f}/{h['no_eos_teacher']:.2f}, {h['entropy_student']:.2f}/{h['entropy_teacher']:.2f}, "
              f"{h['repetition_student']:.2f}/{h['repetition_teacher']:.2f}, {h['exposure_gap']:+.2f} |")
        sys.stdout.flush()


def controls(n: int) -> None:
    """The control case n times (seeds 100 + i for the teacher, the student and their data): healthy runs."""
    from kdlab.analysis.alarms import ALARMS
    from kdlab.integrations import TeacherHackingMonitor

    tiny, ex, tok, words, eos, eval_prompts = _setup()
    tmp = Path(tempfile.mkdtemp(prefix="kdlab-alarms-controls-"))
    counts = {name: 0 for name in ALARMS}
    for i in range(n):
        seed = 100 + i
        torch.manual_seed(seed)
        teacher = tiny.tiny_model(len(tok), 32, 1, eos, tok.pad_token_id)
        ex.pretrain(teacher, tok, words, eos, str(tmp / f"teacher-{i}"), 120, seed)
        torch.manual_seed(seed + 1000)
        student = tiny.tiny_model(len(tok), 16, 2, eos, tok.pad_token_id)
        ex.pretrain(student, tok, words, eos, str(tmp / f"pre-{i}"), 200, seed + 1)
        monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=12, num_points=6,
                                        drift=True)
        ex.pretrain(student, tok, words, eos, str(tmp / f"control-{i}"), 120, seed + 2, monitor=monitor)
        for name in monitor.alarms:
            counts[name] += 1
        h = monitor.history[-1]
        fired = ", ".join(f"{k} ({v.onset_step})" for k, v in monitor.alarms.items()) or "none"
        print(f"control seed {seed}: {fired}; last length s/t {h['length_student']:.1f}/{h['length_teacher']:.1f}, "
              f"no-EOS s/t {h['no_eos_student']:.2f}/{h['no_eos_teacher']:.2f}", flush=True)
    print("false alarms on healthy control runs: " + ", ".join(f"{k} {v}/{n}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
