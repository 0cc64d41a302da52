"""Watch a TRL GKD distillation job for teacher hacking with `kdlab.integrations.TeacherHackingMonitor`.

    python examples/monitor_gkd.py --teacher PATH --student PATH --out runs/gkd [--oracle PATH]
    python examples/monitor_gkd.py --out runs/gkd-demo          # tiny random models (CPU, seconds)

With real models, `--teacher` and `--student` are `save_pretrained` directories (or hub names) that
share a tokenizer with a chat template; `--prompts` is a JSONL file of {"prompt": ..., "response": ...}
rows (the training data; a held-out slice becomes the monitor's eval prompts). Without them the script
builds tiny random Llamas and a word-level tokenizer, which is what the test suite runs.

The monitor measures proxy = KL(teacher ‖ student) (and golden = KL(oracle ‖ student) with
`--oracle`) at log-spaced steps, logs them through the trainer's loggers (`--report-to tensorboard`
puts them beside GKD's loss), writes `<out>/teacher_hacking_monitor.jsonl` (read it with
`kdlab detect`), and with `--stop-on-hacking` stops training and restores the pre-hacking weights.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(24)]
SPECIAL = ["<pad>", "<eos>", "<user>", "<assistant>"]
# One turn each: the prompt's words, then the reply's, then <eos> (WhitespaceSplit keeps tags whole).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% if m['role'] == 'assistant' %}<eos> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer with a chat template, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   model_max_length=64)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int, hidden: int, seed: int, eos_id: int, pad_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def synthetic_data(teacher, tok, n: int, seed: int, prompt_words: int = 4, response_words: int = 4):
    """Prompts of random words answered by the teacher (its own samples: the usual offline KD data)."""
    import torch

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(n)]
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits_gen = []
            cur = ids
            for _ in range(response_words):
                logits = teacher(input_ids=cur).logits[:, -1].float()
                logits[:, : len(SPECIAL)] = -1e9  # words only: replies of a fixed length
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
                logits_gen.append(int(nxt))
                cur = torch.cat([cur, nxt], 1)
        rows.append({"prompt": p, "response": tok.decode(logits_gen)})
    return rows


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Trainer output_dir (the monitor's files go there too).")
    ap.add_argument("--teacher", help="Teacher model (path or hub name); default: a tiny random Llama.")
    ap.add_argument("--student", help="Student model; default: a tiny random Llama.")
    ap.add_argument("--oracle", help="Optional ground-truth model: enables the golden metric.")
    ap.add_argument("--tiny-oracle", action="store_true", help="With the tiny models: add a tiny oracle.")
    ap.add_argument("--prompts", help="JSONL with prompt/response rows; default: teacher samples on random prompts.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lmbda", type=float, default=0.5, help="GKD: fraction of on-policy (student-sampled) batches.")
    ap.add_argument("--beta", type=float, default=0.5, help="GKD: generalized JSD interpolation.")
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--num-points", type=int, default=12, help="Log-spaced monitor measurements.")
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--stop-on-hacking", action="store_true")
    ap.add_argument("--report-to", default="none", help="Trainer loggers: none, tensorboard, wandb, ...")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as err:  # TRL < 1.x kept GKD at the top level
        raise SystemExit(f"this example needs TRL with GKDTrainer (pip install 'kdlab[trl]'): {err}")

    from kdlab.integrations import TeacherHackingMonitor

    if args.teacher:
        tok = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
        student = AutoModelForCausalLM.from_pretrained(args.student or args.teacher)
        oracle = AutoModelForCausalLM.from_pretrained(args.oracle) if args.oracle else None
    else:
        tok = tiny_tokenizer()
        V, eos, pad = len(tok), tok.eos_token_id, tok.pad_token_id
        teacher = tiny_model(V, 32, args.seed + 1, eos, pad)
        student = tiny_model(V, 16, args.seed + 2, eos, pad)
        oracle = tiny_model(V, 32, args.seed + 3, eos, pad) if args.tiny_oracle else None
    if args.prompts:
        rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        rows = synthetic_data(teacher, tok, 64 + args.eval_prompts, args.seed)
    train_rows, eval_rows = rows[args.eval_prompts:], rows[: args.eval_prompts]
    messages = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
                for r in train_rows]
    train = Dataset.from_dict({"messages": messages})
    eval_prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for r in eval_rows]

    config = GKDConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lmbda=args.lmbda, beta=args.beta, max_new_tokens=args.max_new_tokens,
        logging_steps=5, save_strategy="no", report_to=args.report_to, seed=args.seed, max_length=64,
        use_cpu=not __import__("torch").cuda.is_available(), disable_tqdm=True,
    )
    monitor = TeacherHackingMonitor(teacher, eval_prompts, oracle=oracle, tokenizer=tok,
                                    max_new_tokens=args.max_new_tokens, num_points=args.num_points,
                                    stop_on_hacking=args.stop_on_hacking, seed=args.seed)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                         processing_class=tok)
    monitor.attach(trainer)
    trainer.train()
    last = monitor.history[-1]
    print(f"monitor: {len(monitor.history)} measurements, proxy {monitor.history[0]['proxy_fkl']:.3f} -> "
          f"{last['proxy_fkl']:.3f} nats/response; hacking detected: {monitor.detected_at is not None}")
    return trainer, monitor


if __name__ == "__main__":
    main()
