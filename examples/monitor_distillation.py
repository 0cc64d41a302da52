"""TRL's DistillationTrainer (on-policy, its stable distillation API) watched by kdlab's monitor with the drift
panel: what an alarm looks like in the trainer's logs, its JSONL and TensorBoard.

    python examples/monitor_distillation.py --out runs/distil-demo                 # tiny models, CPU, ~1 min
    python examples/monitor_distillation.py --out runs/distil-demo --report-to tensorboard
    tensorboard --logdir runs/distil-demo                                           # train/teacher_hacking/...

With the tiny models the failure is built on purpose (issue 21): the teacher answers four words and then
`<eos>`; the student was first trained to end its answers with another tokenizer's end token (`<user>`), as
when teacher and student disagree on EOS. On-policy distillation samples the student with the tokenizer's EOS,
so its samples run to the length limit: the monitor's `no_eos_student` stays high and `eos_mismatch` fires
(a TeacherHackingWarning, `teacher_hacking/alarm_eos_mismatch` = 1 in the logs). `--control` pretrains the
student on the right EOS instead: no alarm. With `--oracle-like-teacher` a tiny oracle is given too, so the
golden metric and the golden detector run; whether they detect anything on tiny random models is not staged.

`--teacher/--student` take your own `save_pretrained` directories (sharing a tokenizer with a chat template)
and `--prompts` a JSONL of {"prompt": ...} rows; the pretraining step is then skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _tiny():
    """The tiny tokenizer and models of examples/monitor_gkd.py (word-level, chat template, local)."""
    spec = importlib.util.spec_from_file_location("monitor_gkd", HERE / "monitor_gkd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrain(model, tok, words, end_id: int, out: str, steps: int, seed: int, answer=None, monitor=None) -> None:
    """Supervised fine-tuning on 3-word prompts answered by `answer(rng, prompt_ids)` (default: 4 random words
    of words[8:16]) and then `end_id`, with TRL's SFTTrainer (and `monitor` attached, if given)."""
    import trl
    from datasets import Dataset

    rng = random.Random(seed)
    ids, masks = [], []
    for _ in range(256):
        p = tok.apply_chat_template([{"role": "user", "content": " ".join(rng.choice(words[:8]) for _ in range(3))}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
        r = (answer(rng, p) if answer is not None
             else [tok.convert_tokens_to_ids(w) for w in rng.choices(words[8:16], k=4)]) + [end_id]
        ids.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    cfg = trl.SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
                        logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                        bf16=False, completion_only_loss=True, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=cfg, processing_class=tok,
                             train_dataset=Dataset.from_dict({"input_ids": ids, "completion_mask": masks}))
    if monitor is not None:
        monitor.attach(trainer)
    trainer.train()


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Trainer output_dir (the monitor's JSONL goes there too).")
    ap.add_argument("--teacher", help="Teacher model directory or hub name; default: a tiny model trained here.")
    ap.add_argument("--student", help="Student model; default: a tiny model pretrained here (see --control).")
    ap.add_argument("--prompts", help="JSONL of {\"prompt\": ...} rows; default: random word prompts.")
    ap.add_argument("--control", action="store_true", help="Tiny models: pretrain the student on the right EOS.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--num-points", type=int, default=8, help="Log-spaced monitor measurements.")
    ap.add_argument("--report-to", default="none", help="Trainer loggers: none, tensorboard, wandb, ...")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlab.integrations import TeacherHackingMonitor, TeacherHackingWarning

    out = Path(args.out)
    if args.teacher:
        tok = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
        student = AutoModelForCausalLM.from_pretrained(args.student or args.teacher)
        words = None
    else:
        tiny = _tiny()
        tok, words = tiny.tiny_tokenizer(), tiny.WORDS
        eos = tok.eos_token_id
        teacher = tiny.tiny_model(len(tok), 32, 1, eos, tok.pad_token_id)
        pretrain(teacher, tok, words, eos, str(out / "pretrain-teacher"), 120, args.seed)
        student = tiny.tiny_model(len(tok), 16, 2, eos, tok.pad_token_id)
        end = eos if args.control else tok.convert_tokens_to_ids("<user>")
        pretrain(student, tok, words, end, str(out / "pretrain-student"), 200, args.seed + 1)
    if args.prompts:
        prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        rng = random.Random(args.seed)
        prompts = [" ".join(rng.choice(words[:8]) for _ in range(3)) for _ in range(96)]
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts[32:]]})
    eval_prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for p in prompts[:32]]
    import torch

    config = trl.DistillationConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=5, save_strategy="no", report_to=args.report_to, seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, bf16=False, gradient_checkpointing=False,
        max_completion_length=args.max_new_tokens)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                      processing_class=tok)
    monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=args.max_new_tokens,
                                    num_points=args.num_points, drift=True, seed=args.seed).attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TeacherHackingWarning)
        trainer.train()
    for w in caught:
        if issubclass(w.category, TeacherHackingWarning):
            print(f"TeacherHackingWarning: {w.message}")
    last = monitor.history[-1]
    print(f"monitor: {len(monitor.history)} measurements; share of student samples without EOS "
          f"{monitor.history[0]['no_eos_student']:.2f} -> {last['no_eos_student']:.2f} (teacher {last['no_eos_teacher']:.2f}); "
          f"alarms: {', '.join(f'{n} at step {v.onset_step}' for n, v in monitor.alarms.items()) or 'none'}; "
          f"JSONL: {monitor.jsonl_path} (kdlab detect reads it)")
    return trainer, monitor


if __name__ == "__main__":
    main()
