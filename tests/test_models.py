"""kdlab.models: padding equivalence, save/load, the synthetic oracle, vocab and checkpoint errors."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlab.models import (
    LM,
    CheckpointError,
    check_vocab_compatible,
    make_synthetic_oracle,
    mean_token_entropy,
    tiny_llama_config,
)
from kdlab.models.lm import left_pad

V = 32


def tiny_lm(vocab_size=V, seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size, hidden_size=32, num_layers=2, num_heads=4, **kw)
    hf = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than HF's 0.02 init, so outputs depend visibly on context
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LM(hf)


def ragged_batch(gen, lengths_p, lengths_r, side="left"):
    """Prompts padded on `side`, responses right-padded, pads filled with junk ids (they must not matter)."""
    B, P, R = len(lengths_p), max(lengths_p), max(lengths_r)
    pids = torch.randint(0, V, (B, P), generator=gen)
    rids = torch.randint(0, V, (B, R), generator=gen)
    pmask = torch.zeros(B, P, dtype=torch.bool)
    rmask = torch.zeros(B, R, dtype=torch.bool)
    for b, (lp, lr) in enumerate(zip(lengths_p, lengths_r)):
        if side == "left":
            pmask[b, P - lp :] = True
        else:
            pmask[b, :lp] = True
        rmask[b, :lr] = True
    return pids, pmask, rids, rmask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(side):
    lm = tiny_lm()
    g = torch.Generator().manual_seed(1)
    lp, lr = [5, 2, 7, 1], [6, 3, 1, 6]
    pids, pmask, rids, rmask = ragged_batch(g, lp, lr, side)
    logits = lm.response_logits(pids, pmask, rids, rmask)
    hidden = lm.response_hidden(pids, pmask, rids, rmask)
    logp = lm.response_logprobs(pids, pmask, rids, rmask)
    assert logits.shape == (4, 6, V) and logits.dtype == torch.float32
    assert hidden.shape == (4, 6, 32)
    for b in range(4):
        p1 = pids[b][pmask[b]][None]
        r1 = rids[b, : lr[b]][None]
        n = lr[b]
        torch.testing.assert_close(logits[b, :n], lm.response_logits(p1, None, r1)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[b, :n], lm.response_hidden(p1, None, r1)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp[b, :n], lm.response_logprobs(p1, None, r1)[0], atol=1e-5, rtol=1e-5)
        assert torch.all(logp[b, n:] == 0)


def test_response_logits_are_next_token_logits_of_the_full_sequence():
    """Position P-1+t of the plain HF forward on concat(prompt, response) predicts response token t."""
    lm = tiny_lm()
    g = torch.Generator().manual_seed(2)
    pids, rids = torch.randint(0, V, (3, 4), generator=g), torch.randint(0, V, (3, 5), generator=g)
    full = lm.hf(torch.cat([pids, rids], 1)).logits
    torch.testing.assert_close(lm.response_logits(pids, None, rids), full[:, 3:8], atol=1e-5, rtol=1e-5)
    logp = full[:, 3:8].log_softmax(-1).gather(-1, rids[..., None])[..., 0]
    torch.testing.assert_close(lm.response_logprobs(pids, None, rids), logp, atol=1e-5, rtol=1e-5)


def test_hidden_times_lm_head_is_logits():
    lm = tiny_lm()
    g = torch.Generator().manual_seed(3)
    pids, rids = torch.randint(0, V, (2, 3), generator=g), torch.randint(0, V, (2, 4), generator=g)
    h = lm.response_hidden(pids, None, rids)
    assert lm.lm_head_weight.shape == (V, 32)
    torch.testing.assert_close(h @ lm.lm_head_weight.T, lm.response_logits(pids, None, rids), atol=1e-5, rtol=1e-5)


def test_left_pad_repacks_any_padding():
    ids = torch.tensor([[1, 2, 0, 0], [0, 3, 0, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    ids2, mask2 = left_pad(ids, mask)
    assert ids2[mask2].tolist() == ids[mask].tolist()
    assert mask2.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_tiny_llama_config_defaults():
    cfg = tiny_llama_config(64, 32, 2, 4)
    assert cfg._attn_implementation == "sdpa"
    assert cfg.tie_word_embeddings is False
    assert cfg.bos_token_id is None and cfg.eos_token_id is None and cfg.pad_token_id is None
    assert cfg.intermediate_size == 128
    assert tiny_llama_config(64, 32, 2, 4, eos_token_id=3).eos_token_id == 3


def test_save_load_roundtrip_identical_logits(tmp_path):
    lm = tiny_lm()
    lm.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    lm2 = LM.load(tmp_path / "m")
    g = torch.Generator().manual_seed(4)
    pids, rids = torch.randint(0, V, (2, 3), generator=g), torch.randint(0, V, (2, 4), generator=g)
    assert torch.equal(lm.response_logits(pids, None, rids), lm2.response_logits(pids, None, rids))
    assert lm2.vocab_size == V and lm2.dtype == torch.float32 and lm2.device.type == "cpu"
    assert lm2.tokenizer is None
    lm3 = LM.load(tmp_path / "m", dtype=torch.bfloat16)
    assert lm3.dtype == torch.bfloat16
    assert lm3.response_logits(pids, None, rids).dtype == torch.float32  # upcast for losses


def test_save_load_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    lm = tiny_lm()
    lm.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    lm.save(tmp_path / "m")
    lm2 = LM.load(tmp_path / "m")
    assert lm2.tokenizer is not None
    assert lm2.tokenizer("w3 w5 w7")["input_ids"] == [3, 5, 7]


def test_truncated_checkpoint_names_the_file(tmp_path):
    lm = tiny_lm()
    lm.save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt.*re-save"):
        LM.load(tmp_path / "m")


def test_vocab_mismatch_message():
    a, b = tiny_lm(32), tiny_lm(48)
    check_vocab_compatible(a, tiny_lm(32, seed=1))
    with pytest.raises(ValueError) as e:
        check_vocab_compatible(a, b)
    msg = str(e.value)
    assert "teacher has 32" in msg and "student has 48" in msg and "cross-tokenizer" in msg
    with pytest.raises(ValueError, match="oracle has 32 .* student has 48"):
        check_vocab_compatible(a, b, names=("oracle", "student"))


def test_synthetic_oracle_is_seeded_and_a_plain_llama(tmp_path):
    kw = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, logit_scale=3.0)
    a, b, c = make_synthetic_oracle(**kw, seed=7), make_synthetic_oracle(**kw, seed=7), make_synthetic_oracle(**kw, seed=8)
    sa, sb, sc = a.hf.state_dict(), b.hf.state_dict(), c.hf.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    # The logit scale lives in the weights: a reload through plain AutoModelForCausalLM gives the same logits.
    a.save(tmp_path / "oracle")
    r = LM.load(tmp_path / "oracle")
    assert type(r.hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.hf(x).logits, r.hf(x).logits)
    # Raw logits have std ≈ logit_scale (lm_head rows ~ N(0, scale²/H) on a unit-RMS hidden state).
    assert 0.6 * 3.0 < float(a.hf(x).logits.detach().std()) < 1.4 * 3.0


def test_logit_scale_sharpens_the_oracle():
    kw = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    ent = [mean_token_entropy(make_synthetic_oracle(**kw, logit_scale=s), num_prompts=16, prompt_len=4, response_len=8)
           for s in (0.5, 2.0, 6.0)]
    assert ent[0] > ent[1] > ent[2] > 0
    assert ent[0] < math.log(64) and ent[0] > 0.9 * math.log(64)  # near-uniform at a small scale
