"""kdlab.models.sampling.sample: seeding, the sampled distribution, filters, EOS, padding.

Statistical tests use a fixed seed, so they are deterministic; the thresholds are chosen so that a
correct sampler would fail them with probability about 1e-3 over seeds.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

from kdlab.models import LM, tiny_llama_config
from kdlab.models.sampling import sample

V = 8
P_MIN = 1e-3  # chi-square p-value below which the sampler is rejected


def tiny_lm(vocab_size=V, seed=0, scale=0.5, **kw) -> LM:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size, 16, 2, 2, **kw))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    return LM(hf)


def chisq_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    n = tokens.numel()
    counts = np.bincount(tokens.numpy(), minlength=probs.numel()).astype(float)
    expected = probs.double().numpy() * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert len(obs) >= 2
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def repeated_prompt(n, seed=0, length=3):
    return torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(seed)).expand(n, length)


def test_same_seed_same_samples_and_global_rng_untouched():
    lm = tiny_lm()
    x = repeated_prompt(16)
    state = torch.get_rng_state()
    a = sample(lm, x, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    b = sample(lm, x, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    c = sample(lm, x, max_new_tokens=6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.response_ids_BxR, c.response_ids_BxR)
    assert a.response_ids_BxR.shape == (16, 6) and a.response_mask_BxR.all()
    # Samples are ordinary tensors: they can feed a training forward pass with autograd.
    lm.response_logits(x, None, a.response_ids_BxR).sum().backward()


def test_logprobs_equal_model_logprobs_at_temperature_one():
    lm = tiny_lm()
    x = torch.randint(0, V, (32, 4), generator=torch.Generator().manual_seed(1))
    s = sample(lm, x, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.logprobs_BxR, lm.response_logprobs(x, None, s.response_ids_BxR), atol=1e-5, rtol=1e-5)


def test_first_and_second_token_frequencies_match_the_model():
    lm = tiny_lm()
    N = 6000
    x = repeated_prompt(N)
    s = sample(lm, x, max_new_tokens=2, generator=torch.Generator().manual_seed(11))
    y0, y1 = s.response_ids_BxR[:, 0], s.response_ids_BxR[:, 1]
    with torch.no_grad():
        p0 = lm.hf(x[:1]).logits[0, -1].softmax(-1)
        assert chisq_pvalue(y0, p0) > P_MIN
        a = int(torch.mode(y0).values)  # the most frequent first token: the largest conditional sample
        p1 = lm.hf(torch.cat([x[:1], torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
    assert chisq_pvalue(y1[y0 == a], p1) > P_MIN


def test_chisquare_detects_a_wrong_distribution():
    """Power check for the test above: temperature 1.5 samples are rejected against T = 1 probabilities."""
    lm = tiny_lm(scale=1.0)
    x = repeated_prompt(6000)
    s = sample(lm, x, max_new_tokens=1, temperature=1.5, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        p0 = lm.hf(x[:1]).logits[0, -1].softmax(-1)
    assert chisq_pvalue(s.response_ids_BxR[:, 0], p0) < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 3, None), (1.3, None, 0.6), (0.8, 4, 0.7)])
def test_filters_restrict_support_and_logprobs_are_of_the_sampled_distribution(temperature, top_k, top_p):
    lm = tiny_lm(scale=1.0)
    x = repeated_prompt(4000, seed=2)
    s = sample(lm, x, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
               generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = lm.hf(x[:1]).logits[0, -1].float() / temperature
    keep = torch.ones(V, dtype=torch.bool)
    if top_k is not None:
        keep &= z >= z.topk(top_k).values[-1]
    if top_p is not None:  # smallest set of most probable tokens (after top-k) whose mass reaches top_p
        zk = z.masked_fill(~keep, float("-inf"))
        p_sorted, idx = zk.softmax(-1).sort(descending=True)
        before = p_sorted.cumsum(-1) - p_sorted
        nucleus = torch.zeros(V, dtype=torch.bool)
        nucleus[idx[before < top_p]] = True
        keep &= nucleus
    q = z.masked_fill(~keep, float("-inf")).log_softmax(-1)
    y = s.response_ids_BxR[:, 0]
    assert keep[y].all(), "sampled a token outside the top-k / top-p support"
    torch.testing.assert_close(s.logprobs_BxR[:, 0], q[y], atol=1e-5, rtol=1e-5)
    if int(keep.sum()) > 1:
        assert chisq_pvalue(y, q.exp()) > P_MIN


def test_greedy_is_argmax_with_zero_logprobs():
    lm = tiny_lm(scale=1.0)
    x = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(0))
    s = sample(lm, x, max_new_tokens=5, temperature=0)
    logits = lm.response_logits(x, None, s.response_ids_BxR)
    assert torch.equal(logits.argmax(-1), s.response_ids_BxR)
    assert torch.all(s.logprobs_BxR == 0)


def test_eos_stops_and_masks():
    eos = 1
    lm = tiny_lm(vocab_size=4, scale=1.0)
    with torch.no_grad():
        lm.hf.lm_head.weight[eos] += 0.4 * lm.hf.lm_head.weight.norm(dim=-1).mean()  # EOS fairly likely
    x = torch.randint(0, 4, (64, 3), generator=torch.Generator().manual_seed(0))
    R = 12
    s = sample(lm, x, max_new_tokens=R, eos_token_id=eos, generator=torch.Generator().manual_seed(1))
    ids, mask, logp, _ = s
    assert ids.shape == mask.shape == logp.shape == (64, R)
    first = torch.where((ids == eos).any(1), (ids == eos).float().argmax(1), torch.full((64,), R))
    assert 0.2 < (first < R).float().mean() < 1.0, "test setup: some rows, not all, should hit EOS"
    expected_mask = torch.arange(R)[None] <= first[:, None]
    assert torch.equal(mask, expected_mask)  # True through the first EOS, False after
    assert torch.all(ids[~mask] == eos) and torch.all(logp[~mask] == 0)
    assert torch.all(logp[mask] < 0)
    torch.testing.assert_close(logp, lm.response_logprobs(x, None, ids, mask), atol=1e-5, rtol=1e-5)
    # Every row stops early -> the output is still max_new_tokens wide.
    s2 = sample(lm, x[:2], max_new_tokens=R, temperature=0, eos_token_id=int(s.response_ids_BxR[0, 0]))
    assert s2.response_ids_BxR.shape == (2, R)


def test_any_of_several_eos_ids_ends_a_row():
    """Chat models (Llama 3: three ids) list several EOS ids in their generation config; each ends a row.
    Slots after the end hold the first id, masked; the model's own list is what `LM.eos_token_id` gives."""
    eos = (1, 3)
    lm = tiny_lm(scale=0.3)  # near-uniform over 8 tokens: a row ends with probability ≈ 1/4 per step
    lm.hf.generation_config.eos_token_id = list(eos)
    assert lm.eos_token_id == eos
    N, R = 128, 10
    x = torch.randint(0, V, (N, 3), generator=torch.Generator().manual_seed(0))
    ids, mask, logp, _ = sample(lm, x, max_new_tokens=R, eos_token_id=lm.eos_token_id,
                                generator=torch.Generator().manual_seed(1))
    is_end = (ids == eos[0]) | (ids == eos[1])
    first = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full((N,), R))
    ended_by = ids.gather(1, first.clamp_max(R - 1)[:, None])[:, 0][first < R]
    assert (ended_by == eos[0]).any() and (ended_by == eos[1]).any(), "test setup: both ids should end rows"
    assert (first == R).any(), "test setup: some row should run to full length"
    assert torch.equal(mask, torch.arange(R)[None] <= first[:, None])  # True through the first end, then False
    assert torch.all(ids[~mask] == eos[0]) and torch.all(logp[~mask] == 0)
    torch.testing.assert_close(logp, lm.response_logprobs(x, None, ids, mask), atol=1e-5, rtol=1e-5)
    # With one id only that id ends a row: the other stays inside kept responses. An int and a
    # one-element list are the same request.
    one = sample(lm, x, max_new_tokens=R, eos_token_id=eos[1], generator=torch.Generator().manual_seed(1))
    assert (one.response_ids_BxR[one.response_mask_BxR] == eos[0]).any()
    assert torch.equal(one.response_mask_BxR, sample(lm, x, max_new_tokens=R, eos_token_id=[eos[1]],
                       generator=torch.Generator().manual_seed(1)).response_mask_BxR)


def test_row_seeds_draw_each_row_as_the_whole_batch_does():
    """With ``row_seeds`` a row's sample depends on its prompt and seed only, not on the rows beside it:
    a rank that samples its slice of a global batch draws what one process sampling all of it draws."""
    lm = tiny_lm(scale=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, 3), generator=g)
    seeds = torch.randint(0, 2**62, (8,), generator=g)
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=5, eos_token_id=2, return_logits=True)
    state = torch.get_rng_state()
    whole = sample(lm, x, row_seeds=seeds, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG involved
    assert not whole.response_mask_BxR.all() and whole.response_mask_BxR[:, 1].any()  # EOS ended some rows
    for part in (slice(2, 6), slice(7, 8)):
        alone = sample(lm, x[part], row_seeds=seeds[part], **kw)
        assert torch.equal(alone.response_ids_BxR, whole.response_ids_BxR[part])
        assert torch.equal(alone.response_mask_BxR, whole.response_mask_BxR[part])
        torch.testing.assert_close(alone.logprobs_BxR, whole.logprobs_BxR[part], rtol=1e-5, atol=1e-6)
        kept = alone.response_mask_BxR  # after a row's end its logits depend on when the batch stopped
        torch.testing.assert_close(alone.logits_BxRxV[kept], whole.logits_BxRxV[part][kept], rtol=1e-5, atol=1e-5)
    # The seeds decide: other seeds, other samples; a generator is ignored when seeds are given.
    other = sample(lm, x, row_seeds=seeds + 1, **kw)
    assert not torch.equal(other.response_ids_BxR, whole.response_ids_BxR)
    with_gen = sample(lm, x, row_seeds=seeds, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(with_gen.response_ids_BxR, whole.response_ids_BxR)
    with pytest.raises(ValueError, match="row_seeds has 3 seeds for 8 rows"):
        sample(lm, x, row_seeds=seeds[:3], **kw)


def test_row_seeded_draws_follow_the_model():
    lm = tiny_lm()
    N = 6000
    x = repeated_prompt(N)
    s = sample(lm, x, max_new_tokens=2, row_seeds=torch.arange(N) * 7919)
    y0, y1 = s.response_ids_BxR[:, 0], s.response_ids_BxR[:, 1]
    with torch.no_grad():
        p0 = lm.hf(x[:1]).logits[0, -1].softmax(-1)
        assert chisq_pvalue(y0, p0) > P_MIN
        a = int(torch.mode(y0).values)
        p1 = lm.hf(torch.cat([x[:1], torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
    assert chisq_pvalue(y1[y0 == a], p1) > P_MIN
    torch.testing.assert_close(s.logprobs_BxR, lm.response_logprobs(x, None, s.response_ids_BxR),
                               atol=1e-5, rtol=1e-5)


def padded_prompts(side: str, g: torch.Generator, lengths=(2, 5, 3, 1)):
    """Prompts of the given real lengths padded on the `side` ('left', 'right'; 'none': full rows, mask None)."""
    P = max(lengths)
    ids = torch.randint(0, V, (len(lengths), P), generator=g)
    if side == "none":
        return ids, None
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, P - n:] = True
        else:
            mask[b, :n] = True
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_sample_the_unpadded_distribution(side):
    lm = tiny_lm(scale=1.0)
    g = torch.Generator().manual_seed(0)
    ids, mask = padded_prompts(side, g)
    s = sample(lm, ids, mask, max_new_tokens=6, temperature=0)
    for b in range(4):
        single = sample(lm, ids[b][mask[b]][None], max_new_tokens=6, temperature=0)
        assert torch.equal(s.response_ids_BxR[b], single.response_ids_BxR[0])
    s = sample(lm, ids, mask, max_new_tokens=6, generator=g)
    torch.testing.assert_close(s.logprobs_BxR, lm.response_logprobs(ids, mask, s.response_ids_BxR), atol=1e-5, rtol=1e-5)


def test_checkpoint_generation_config_does_not_change_the_distribution():
    """A hub checkpoint's generation_config (top_k=50 default, repetition penalty) must not leak in."""
    lm = tiny_lm(scale=1.0)
    lm.hf.generation_config.top_k = 2
    lm.hf.generation_config.repetition_penalty = 3.0
    lm.hf.generation_config.suppress_tokens = [0, 1]
    lm.hf.generation_config.eos_token_id = 2  # eos_token_id=None below means: no EOS at all
    lm.hf.generation_config.pad_token_id = 3
    x = torch.randint(0, V, (64, 3), generator=torch.Generator().manual_seed(0))
    s = sample(lm, x, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    # Weights at scale 1.0: cached decoding and the full forward differ by ~2e-5 in the logits in float32
    # (generate and kdlab's loop alike), so 5e-5 here; the point of this test is the support, below.
    torch.testing.assert_close(s.logprobs_BxR, lm.response_logprobs(x, None, s.response_ids_BxR), atol=5e-5, rtol=1e-5)
    ids = s.response_ids_BxR
    assert s.response_mask_BxR.all()
    assert bool(((ids[:, :-1] == 2) & (ids[:, 1:] != 2) & (ids[:, 1:] != 3)).any()), "stopped at the checkpoint's EOS"


def test_argument_checks():
    lm = tiny_lm()
    x = repeated_prompt(2)
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=2, temperature=-1), dict(max_new_tokens=2, top_k=0),
               dict(max_new_tokens=2, top_p=0.0), dict(max_new_tokens=2, top_p=1.5)):
        with pytest.raises(ValueError):
            sample(lm, x, **kw)


def test_returned_logits_are_the_model_logits_along_the_samples():
    """return_logits=True: the sampling pass's raw (T = 1, unfiltered) logits == a forward pass."""
    lm = tiny_lm(scale=1.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (6, 4), generator=g)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[0, :2] = mask[3, :1] = False  # left padding
    s = sample(lm, ids, mask, max_new_tokens=5, temperature=0.7, top_k=3, eos_token_id=2, generator=g,
               return_logits=True)
    assert sample(lm, ids, mask, max_new_tokens=5, generator=g).logits_BxRxV is None
    live = lm.response_logits(ids, mask, s.response_ids_BxR, s.response_mask_BxR)
    m = s.response_mask_BxR
    torch.testing.assert_close(s.logits_BxRxV[m], live[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_next_token_logits_with_a_kv_cache_equal_full_forwards(side):
    """`NextTokenLogits` (the teacher-mixed sampler's step) against `LM.response_logits` on the whole sequence
    so far: the same logits at every step, with padded prompts and with none; a step that skips a token is
    refused."""
    from kdlab.models.sampling import NextTokenLogits

    lm = tiny_lm(scale=1.0)
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_prompts(side, g)
    P = ids.shape[1]
    step = NextTokenLogits(lm, ids, mask)
    seq = ids
    with torch.no_grad():
        for t in range(6):
            got = step(seq)
            r = torch.cat([seq[:, P:], seq.new_zeros(4, 1)], 1)  # a placeholder for the next token
            want = lm.response_logits(ids, mask, r)[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            seq = torch.cat([seq, torch.randint(0, V, (4, 1), generator=g)], 1)
        with pytest.raises(ValueError, match="exactly one token"):
            step(torch.cat([seq, seq[:, -1:]], 1))
