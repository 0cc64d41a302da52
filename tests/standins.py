"""Tiny randomly initialised stand-ins for the paper's model chains, saved as local `hf:` directories.

Each family gets an oracle > teacher > student chain sharing one tiny word-level tokenizer
(tests/task_data.py), so the real loading code (`LM.load` -> Auto* classes, `AutoTokenizer`) runs on
files the tests create: T5 (`T5ForConditionalGeneration`, the paper's family) and decoder-only Qwen2
and Llama. The T5 stand-ins keep T5's own dropout 0.1 in their configs, as the hub checkpoints do, so
that `models.dropout` is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from task_data import DE, DEFINITIONS, EN, make_tokenizer

# Words of the templates in kdlab.data.tasks and of the decoder-only configs' templates.
TEMPLATE_WORDS = ("summarize translate English to German Definition Input Output Summarize the article in one "
                  "sentence Article Summary Translate English German Instruction Response : . , \n").split()
TEXTS = [" ".join(EN), " ".join(DE), *DEFINITIONS, " ".join(TEMPLATE_WORDS)]
SIZES = {"oracle": (48, 2), "teacher": (32, 2), "student": (16, 1)}  # (width, layers)


def family_of(hf_name: str) -> str:
    """The stand-in family for a hub name in a shipped config."""
    low = hf_name.lower()
    if "t5" in low:
        return "t5"
    if "qwen" in low:
        return "qwen2"
    if "llama" in low:
        return "llama"
    raise ValueError(f"no stand-in family for {hf_name!r}")


def _bpe_tokenizer():
    """A byte-level BPE tokenizer (pad 0, eos 1, unk 2): the kind Qwen2's and Llama's tokenizer classes
    rebuild from tokenizer.json in transformers 5 (a word-level one would be re-read as byte-level BPE
    and map every word to one id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    return fast


def _model(family: str, vocab: int, width: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if family == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers, num_decoder_layers=layers,
            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1))
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
                  initializer_range=0.2)  # peakier than HF's 0.02, so the random models' divergences are not ~0
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    raise ValueError(family)


def write_standins(root: Path, family: str) -> dict[str, str]:
    """Write oracle/teacher/student directories (weights + tokenizer) under root; return their paths."""
    root = Path(root)
    out = {}
    for i, (who, (width, layers)) in enumerate(SIZES.items()):
        d = root / family / who
        if not (d / "config.json").exists():
            tok = make_tokenizer(TEXTS) if family == "t5" else _bpe_tokenizer()
            model = _model(family, len(tok), width, layers, seed=100 + i)
            model.save_pretrained(str(d))
            tok.save_pretrained(str(d))
        out[who] = str(d)
    return out
