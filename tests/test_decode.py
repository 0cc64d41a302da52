"""kdlab.models.decode: the Llama decoding loop behind `sample` computes the model's own distribution.

tests/test_sampling.py runs every sampling property (seeding, chi-square against the model, filters,
EOS, padding, returned logits) on tiny Llama models, i.e. on this loop. Here: the loop against the
model's forward on bigger and grouped-query models, against `generate` (greedy, deterministic), the
`generate` path still passing the same properties, and the dispatch rule.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import tests.test_sampling as ts
from kdlab.models import LM, decode, tiny_llama_config
from kdlab.models.sampling import sample


def llama(V=64, hidden=32, layers=2, heads=4, kv_heads=None, seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(V, hidden, layers, heads, **kw)
    if kv_heads is not None:
        cfg.num_key_value_heads = kv_heads
    return LM(AutoModelForCausalLM.from_config(cfg))


def qwen2(V=64, hidden=32, layers=2, heads=4, kv_heads=None, seed=0) -> LM:
    """Qwen2: Llama's layer with biases on q/k/v (random here, so that a dropped bias shows)."""
    from transformers import Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads, intermediate_size=4 * hidden, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    hf = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return LM(hf.eval())


FAMILIES = {"llama": llama, "qwen2": qwen2}


def padded_prompts(B=6, P=7, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, -2:] = False  # right padding (sample repacks it to the left)
    mask[3, :6] = False  # one real token
    return x, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_logprobs_and_logits_equal_the_model_forward(kv_heads, padded, family):
    lm = FAMILIES[family](kv_heads=kv_heads)
    assert decode.supports(lm.hf)
    x, mask = padded_prompts()
    mask = mask if padded else None
    s = sample(lm, x, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(0), return_logits=True)
    logp = lm.response_logprobs(x, mask, s.response_ids_BxR)
    logits = lm.response_logits(x, mask, s.response_ids_BxR)
    torch.testing.assert_close(s.logprobs_BxR, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.logits_BxRxV, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_generate(monkeypatch, family):
    lm = FAMILIES[family](V=32)
    x, mask = padded_prompts(V=32)
    fast = sample(lm, x, mask, max_new_tokens=8, temperature=0, eos_token_id=5)
    monkeypatch.setattr(decode, "supports", lambda hf: False)
    slow = sample(lm, x, mask, max_new_tokens=8, temperature=0, eos_token_id=5)
    for a, b in zip(fast, slow):
        assert (a is None and b is None) or torch.equal(a, b)


def test_seeded_and_global_rng_untouched_and_trainable():
    lm = llama()
    x, mask = padded_prompts()
    state = torch.get_rng_state()
    a = sample(lm, x, mask, max_new_tokens=5, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = sample(lm, x, mask, max_new_tokens=5, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.response_ids_BxR, b.response_ids_BxR) and torch.equal(a.logprobs_BxR, b.logprobs_BxR)
    # Outputs are normal tensors (not inference-mode ones): they may enter autograd.
    (lm.response_logits(x, mask, a.response_ids_BxR).sum() + a.logprobs_BxR.sum()).backward()


def test_dispatch_rule():
    lm = llama()
    assert decode.supports(lm.hf)
    lm.hf.train()
    assert not decode.supports(lm.hf)  # dropout would differ; generate handles training mode
    lm.hf.eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval()
    assert not decode.supports(gpt2)
    x = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(0))
    s = sample(LM(gpt2), x, max_new_tokens=3, generator=torch.Generator().manual_seed(0))  # via generate
    torch.testing.assert_close(s.logprobs_BxR, LM(gpt2).response_logprobs(x, None, s.response_ids_BxR),
                               atol=1e-5, rtol=0)


# The generate path (every non-Llama model) keeps the properties the fast loop is tested for.
@pytest.mark.parametrize("test", [
    ts.test_same_seed_same_samples_and_global_rng_untouched,
    ts.test_logprobs_equal_model_logprobs_at_temperature_one,
    ts.test_first_and_second_token_frequencies_match_the_model,
    ts.test_greedy_is_argmax_with_zero_logprobs,
    ts.test_eos_stops_and_masks,
    ts.test_any_of_several_eos_ids_ends_a_row,
    ts.test_row_seeds_draw_each_row_as_the_whole_batch_does,
    ts.test_row_seeded_draws_follow_the_model,
    ts.test_returned_logits_are_the_model_logits_along_the_samples,
], ids=lambda f: f.__name__)
def test_generate_path_keeps_sampling_properties(test, monkeypatch):
    monkeypatch.setattr(decode, "supports", lambda hf: False)
    test()


def test_compiled_step_draws_what_the_eager_loop_draws_and_follows_weight_updates():
    """`compile_step=True` (stage2.compile_student/compile_teacher in the online regimes): the same
    tokens from the same generator state, log-probs and logits equal to rounding, on padded prompts,
    grouped-query attention, top-k/top-p and EOS, and greedy; after an in-place weight update (what
    AdamW does) the compiled graph uses the new weights."""
    lm = llama(kv_heads=2, seed=3)
    x, mask = padded_prompts()

    def both(**kw):
        out = [sample(lm, x, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(7), return_logits=True,
                      compile_step=c, **kw) for c in (False, True)]
        eager, comp = out
        assert torch.equal(eager.response_ids_BxR, comp.response_ids_BxR)
        assert torch.equal(eager.response_mask_BxR, comp.response_mask_BxR)
        torch.testing.assert_close(comp.logprobs_BxR, eager.logprobs_BxR, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comp.logits_BxRxV, eager.logits_BxRxV, rtol=1e-5, atol=1e-5)
        return eager

    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    # EOS = a token that row 0 draws third, so that one row ends early and the mask path runs.
    kw["eos_token_id"] = int(sample(lm, x, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(7),
                                    **kw).response_ids_BxR[0, 2])
    before = both(**kw)
    assert not before.response_mask_BxR.all()  # some row hit EOS: the mask path ran
    with torch.no_grad():
        for p in lm.hf.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = both(**kw)
    assert not torch.equal(before.logits_BxRxV, after.logits_BxRxV)
    both(temperature=0.0)


@pytest.mark.parametrize("compile_step", [False, True])
def test_row_seeded_generate_and_loop_draw_the_same_tokens(compile_step, monkeypatch):
    """With `row_seeds` both paths (and the compiled step) draw by the same inverse-CDF rule from the same
    per-row uniforms, so a Llama model gives the same tokens through kdlab's loop and through `generate`."""
    lm = llama(kv_heads=2, seed=4)
    x, mask = padded_prompts()
    seeds = torch.randint(0, 2**62, (len(x),), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, return_logits=True, row_seeds=seeds)
    loop = sample(lm, x, mask, compile_step=compile_step, **kw)
    kw["eos_token_id"] = int(loop.response_ids_BxR[0, 2])  # row 0 ends at its third token
    loop = sample(lm, x, mask, compile_step=compile_step, **kw)
    monkeypatch.setattr(decode, "supports", lambda hf: False)
    gen = sample(lm, x, mask, **kw)
    assert not loop.response_mask_BxR[0, 3:].any() and loop.response_mask_BxR.any(1).all()
    assert torch.equal(loop.response_ids_BxR, gen.response_ids_BxR)
    assert torch.equal(loop.response_mask_BxR, gen.response_mask_BxR)
    torch.testing.assert_close(loop.logprobs_BxR, gen.logprobs_BxR, rtol=1e-5, atol=1e-5)
    kept = loop.response_mask_BxR
    torch.testing.assert_close(loop.logits_BxRxV[kept], gen.logits_BxRxV[kept], rtol=1e-5, atol=1e-5)
