"""TRL trainer runs watched by kdlab's monitor, for the detectors' held-out set (issue 16, protocol D).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/detection/trl_runs.py RUN_DIR [RUN_DIR ...] \
        --out /tmp/kdlab-heldout/trl --schedules linear cosine

Each RUN_DIR is a finished kdlab offline run. Its world (oracle, teacher, student initialisation, from the
stage-1 cache) and its offline dataset (the teacher's samples it trained on) are loaded, and TRL's
`SFTTrainer` trains the same student initialisation on the same samples (sequence-level distillation: cross-
entropy on the teacher's responses, completion tokens only), with transformers' `linear` or `cosine` schedule,
the run's steps, batch, learning rate and 75 warm-up steps. `TeacherHackingMonitor` with the world's oracle
measures proxy and golden at the run's number of log-spaced evaluations on the world's eval prompts and writes
`<out>/<schedule>/<run name>/teacher_hacking_monitor.jsonl`, which agreement.py reads like a kdlab run. The
monitor's own proxy-only alarm (the default detector) is what a user of TRL would have seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from kdlab import record
from kdlab.config import load_config
from kdlab.data.offline import load_offline_dataset
from kdlab.integrations import TeacherHackingMonitor
from kdlab.pipeline.world import build_world

WARMUP = 75


def token_tokenizer(vocab_size: int):
    """A tokenizer whose tokens are the world's ids ("0" .. "V-1"): SFTTrainer wants one to pad with. The
    synthetic world's sequences all have the same length, so nothing is padded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", model_max_length=256)


def sft_rows(data) -> dict[str, list]:
    """Prompt + response ids of every offline sequence, and the completion mask (response tokens only)."""
    ids, masks = [], []
    for p, pm, r, rm in zip(data.prompt_ids, data.prompt_mask, data.response_ids, data.response_mask):
        prompt, response = p[pm.bool()].tolist(), r[rm.bool()].tolist()
        ids.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    return {"input_ids": ids, "completion_mask": masks}


def train_one(run_dir: Path, schedule: str, out: Path, overrides: list[str] | None = None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = load_config(run_dir / record.CONFIG, overrides)
    world = build_world(cfg, log=lambda m: None)
    data = load_offline_dataset(run_dir / record.OFFLINE_DATA)
    student = world.load_student_init()
    s2 = cfg.stage2
    if out.exists():
        shutil.rmtree(out)  # a partial log from an interrupted run is not a finished run
    config = SFTConfig(
        output_dir=str(out), max_steps=s2.steps, per_device_train_batch_size=s2.batch_size, learning_rate=s2.lr,
        lr_scheduler_type=schedule, warmup_steps=WARMUP, weight_decay=s2.weight_decay,
        max_grad_norm=s2.grad_clip or 0.0, logging_steps=50, save_strategy="no", report_to="none", seed=cfg.seed,
        use_cpu=True, disable_tqdm=True, bf16=False, completion_only_loss=True, packing=False, max_length=256,
        dataloader_drop_last=True, gradient_checkpointing=False)
    trainer = SFTTrainer(model=student.hf, args=config, train_dataset=Dataset.from_dict(sft_rows(data)),
                         processing_class=token_tokenizer(student.hf.config.vocab_size))
    monitor = TeacherHackingMonitor(world.teacher, world.prompts["eval"], oracle=world.oracle,
                                    max_new_tokens=cfg.world.response_length, num_points=cfg.eval.num_points,
                                    seed=cfg.seed).attach(trainer)
    t = time.time()
    trainer.train()
    seconds = time.time() - t
    h = monitor.history
    return {"run": str(run_dir), "schedule": schedule, "out": str(out), "seconds": round(seconds, 1),
            "measurements": len(h), "proxy_first_last": [h[0][record.PROXY], h[-1][record.PROXY]],
            "golden_first_last": [h[0][record.GOLDEN], h[-1][record.GOLDEN]],
            "monitor_alarm_step": monitor.detected_at}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished kdlab offline run directories")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--schedules", nargs="+", default=["linear", "cosine"], choices=["linear", "cosine", "constant"])
    ap.add_argument("--steps", type=int, help="override the run's steps (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for run_dir in args.runs:
        for schedule in args.schedules:
            name = "_".join(run_dir.parts[-3:])
            target = args.out / schedule / name
            if (target / record.MONITOR_METRICS).exists() and (target / "trl_run.json").exists():
                print(f"skip (done): {target}")
                continue
            smoke = [f"stage2.steps={args.steps}", "eval.num_points=4"] if args.steps else None
            result = train_one(run_dir, schedule, target, smoke)
            (target / "trl_run.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result))


if __name__ == "__main__":
    main()
