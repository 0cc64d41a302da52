"""kdlab.metrics against exact enumeration (STYLE practice 4), the reference cache, and the SE arithmetic.

Two tiny random Llamas with a 4-token vocabulary and prompts of 2 tokens: every response of length
R = 4 (4^4 = 256 per prompt) can be listed, so the sequence KL in both directions, and the variance
of the per-sequence sum, are known exactly.
"""

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlab.losses import SparseTarget
from kdlab.metrics import DivergenceEstimate, ReferenceCache, sequence_fkl, sequence_kl_sums, sequence_rkl
from kdlab.models import LM, CheckpointError, tiny_llama_config

V, P, R = 4, 2, 4


def tiny_lm(seed, vocab_size=V, scale=0.25) -> LM:
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size, 16, 2, 2))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    return LM(hf)


@pytest.fixture(scope="module")
def pair():
    return tiny_lm(0), tiny_lm(1)  # reference A, student S


ALL_PROMPTS = torch.tensor(list(itertools.product(range(V), repeat=P)))  # (16, 2)


def all_responses(eos=None):
    """Every distinct response: all V^R sequences, or with EOS only the canonical ones (EOS-padded)."""
    ys = torch.tensor(list(itertools.product(range(V), repeat=R)))
    if eos is None:
        return ys, torch.ones_like(ys, dtype=torch.bool)
    is_eos = (ys == eos).long()
    mask = (is_eos.cumsum(-1) - is_eos) == 0
    canonical = torch.all(mask | (ys == eos), dim=-1)
    return ys[canonical], mask[canonical]


@torch.no_grad()
def exact(A, S, x_1xP, eos=None):
    """Exact fkl, rkl for one prompt by enumeration, in float64 straight from the formula, plus the
    mean/variance/kurtosis of the fkl per-sequence sum and the expected length under A and S."""
    ys, mask = all_responses(eos)
    X = x_1xP.expand(ys.shape[0], P)
    la = A.response_logits(X, None, ys, mask).double().log_softmax(-1)
    ls = S.response_logits(X, None, ys, mask).double().log_softmax(-1)
    m = mask.double()
    s_f = ((la.exp() * (la - ls)).sum(-1) * m).sum(-1)
    s_r = ((ls.exp() * (ls - la)).sum(-1) * m).sum(-1)
    pa = ((la.gather(-1, ys[..., None])[..., 0]) * m).sum(-1).exp()
    ps = ((ls.gather(-1, ys[..., None])[..., 0]) * m).sum(-1).exp()
    assert abs(float(pa.sum()) - 1) < 1e-9 and abs(float(ps.sum()) - 1) < 1e-9
    fkl, rkl = float((pa * s_f).sum()), float((ps * s_r).sum())
    var_f = float((pa * (s_f - fkl) ** 2).sum())
    kurt_f = float((pa * (s_f - fkl) ** 4).sum()) / var_f**2
    return dict(fkl=fkl, rkl=rkl, var_f=var_f, kurt_f=kurt_f, len_a=float((pa * m.sum(-1)).sum()),
                len_s=float((ps * m.sum(-1)).sum()))


def within(est: DivergenceEstimate, truth: float, k=4.0):
    assert abs(est.mean - truth) < k * est.se, f"estimate {est.mean:.5f} ± {est.se:.5f} vs exact {truth:.5f}"


def test_fkl_single_prompt_unbiased_and_se_shrinks_as_one_over_sqrt_n(pair):
    A, S = pair
    x = ALL_PROMPTS[5:6]
    ex = exact(A, S, x)
    assert ex["fkl"] > 0.05  # the pair is far enough apart for the test to mean something
    ses = {}
    for n, seed in ((500, 1), (2000, 2)):
        cache = ReferenceCache.build(A, x, samples_per_prompt=n, max_new_tokens=R,
                                     generator=torch.Generator().manual_seed(seed), batch_size=1000)
        est = sequence_fkl(S, cache, batch_size=1000)
        assert est.n == n
        within(est, ex["fkl"])
        # The SE estimates sd/√n; the sample sd has relative sd ≈ √((κ−1)/(4n)); allow 5 of those.
        rel = math.sqrt((ex["kurt_f"] - 1) / (4 * n))
        assert abs(est.se / math.sqrt(ex["var_f"] / n) - 1) < 5 * rel
        ses[n] = est.se
    rel_ratio = math.sqrt((ex["kurt_f"] - 1) / (4 * 500) + (ex["kurt_f"] - 1) / (4 * 2000))
    assert abs(ses[500] / ses[2000] / 2 - 1) < 5 * rel_ratio


@pytest.mark.parametrize("eos", [None, 0])
def test_fkl_and_rkl_over_all_prompts_match_enumeration(pair, eos):
    A, S = pair
    exs = [exact(A, S, ALL_PROMPTS[i : i + 1], eos) for i in range(len(ALL_PROMPTS))]
    m = 48
    cache = ReferenceCache.build(A, ALL_PROMPTS, samples_per_prompt=m, max_new_tokens=R, eos_token_id=eos,
                                 generator=torch.Generator().manual_seed(3), batch_size=512)
    f = sequence_fkl(S, cache, batch_size=512)
    r = sequence_rkl(S, A, ALL_PROMPTS, samples_per_prompt=m, max_new_tokens=R, eos_token_id=eos,
                     generator=torch.Generator().manual_seed(4), batch_size=512)
    assert f.n == r.n == 16 * m
    within(f, sum(e["fkl"] for e in exs) / 16)
    within(r, sum(e["rkl"] for e in exs) / 16)
    # per token: Σ_x E[Σ_t KL] / Σ_x E[length]
    pt_f = sum(e["fkl"] for e in exs) / sum(e["len_a"] for e in exs)
    pt_r = sum(e["rkl"] for e in exs) / sum(e["len_s"] for e in exs)
    assert abs(f.per_token - pt_f) < 4 * f.per_token_se
    assert abs(r.per_token - pt_r) < 4 * r.per_token_se
    if eos is None:  # fixed length: per-token is exactly the sequence value / R
        assert f.per_token == pytest.approx(f.mean / R) and f.per_token_se == pytest.approx(f.se / R)


def test_identical_models_give_zero(pair):
    A, _ = pair
    cache = ReferenceCache.build(A, ALL_PROMPTS[:4], samples_per_prompt=4, max_new_tokens=R,
                                 generator=torch.Generator().manual_seed(0))
    assert abs(sequence_fkl(A, cache).mean) < 1e-6
    assert abs(sequence_rkl(A, A, ALL_PROMPTS[:4], samples_per_prompt=2, max_new_tokens=R).mean) < 1e-6


def build_small(A, storage, topk=None, eos=None):
    return ReferenceCache.build(A, ALL_PROMPTS[:6], samples_per_prompt=3, max_new_tokens=R, eos_token_id=eos,
                                generator=torch.Generator().manual_seed(7), storage=storage, topk=topk)


def test_cached_equals_live_reference(pair):
    A, S = pair
    full = build_small(A, "full", eos=1)
    none = build_small(A, "none", eos=1)
    assert none.storage == "none" and none.targets is None
    assert torch.equal(full.response_ids_MxR, none.response_ids_MxR)  # same generator seed, same samples
    S.hf.train()  # a student mid-training: evaluated in eval mode, left in train mode
    cached, live = sequence_fkl(S, full), sequence_fkl(S, none, reference_lm=A)
    assert S.hf.training and not A.hf.training
    S.hf.eval()
    assert cached.mean == pytest.approx(live.mean, rel=1e-6, abs=1e-9)
    assert cached.se == pytest.approx(live.se, rel=1e-5)
    with pytest.raises(ValueError, match="reference_lm"):
        sequence_fkl(S, none)


def test_topk_with_k_equal_vocab_equals_full_and_smaller_k_underestimates(pair):
    A, S = pair
    full = build_small(A, "full")
    kv = build_small(A, "topk", topk=V)
    k2 = build_small(A, "topk", topk=2)
    assert kv.storage == "topk" and kv.targets.indices.shape[-1] == V
    f, fk = sequence_fkl(S, full), sequence_fkl(S, kv)
    assert fk.mean == pytest.approx(f.mean, rel=1e-5)
    # Bucketing the tail is a coarsening of both distributions: KL can only go down (data processing).
    sums_full, _ = sequence_kl_sums(S, full.targets, *full.prompts_for_sequences(), full.response_ids_MxR)
    t = SparseTarget(k2.targets.indices.long(), k2.targets.logprobs)
    sums_k2, _ = sequence_kl_sums(S, t, *k2.prompts_for_sequences(), k2.response_ids_MxR)
    assert torch.all(sums_k2 <= sums_full + 1e-6)


def test_memory_budget_picks_an_exact_storage(pair):
    """Full log-probs when they fit, else the live reference here (H = 16 > V = 4: hidden states would be
    larger than the log-probs); top-k, a lower bound, is never picked by the budget (issue 18)."""
    A, _ = pair
    M = 6 * 3
    full_bytes = M * R * V * 4

    def storage(budget, topk):
        return ReferenceCache.build(A, ALL_PROMPTS[:6], samples_per_prompt=3, max_new_tokens=R,
                                    memory_budget_bytes=budget, topk=topk).storage

    assert storage(full_bytes, 1) == "full"
    assert storage(full_bytes - 1, 1) == "none"
    assert storage(full_bytes - 1, None) == "none"
    assert storage(0, 1) == "none"


@pytest.mark.parametrize("storage,topk", [("full", None), ("topk", 3), ("none", None)])
def test_cache_save_load_roundtrip(pair, tmp_path, storage, topk):
    A, S = pair
    c = build_small(A, storage, topk=topk, eos=2)
    c.save(tmp_path / "c")
    d = ReferenceCache.load(tmp_path / "c")
    assert d.storage == storage and d.samples_per_prompt == 3 and d.vocab_size == V
    assert d.meta["eos_token_id"] == 2 and d.meta["max_new_tokens"] == R
    for a, b in ((c.prompt_ids_NxP, d.prompt_ids_NxP), (c.prompt_mask_NxP, d.prompt_mask_NxP),
                 (c.response_ids_MxR, d.response_ids_MxR), (c.response_mask_MxR, d.response_mask_MxR)):
        assert torch.equal(a, b)
    if storage != "none":
        ta = c.targets if storage == "full" else torch.cat(list(c.targets), -1).float()
        tb = d.targets if storage == "full" else torch.cat(list(d.targets), -1).float()
        assert torch.equal(ta, tb)
        assert sequence_fkl(S, c) == sequence_fkl(S, d)


def test_corrupt_or_missing_cache_files(pair, tmp_path):
    A, _ = pair
    build_small(A, "full").save(tmp_path / "c")
    f = tmp_path / "c" / "reference_cache.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"reference_cache\.safetensors.*rebuild"):
        ReferenceCache.load(tmp_path / "c")
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"reference_cache\.safetensors"):
        ReferenceCache.load(tmp_path / "c")


def test_vocab_mismatch_is_refused(pair):
    A, _ = pair
    cache = build_small(A, "full")
    with pytest.raises(ValueError, match="reference has 4 .* student has 6"):
        sequence_fkl(tiny_lm(2, vocab_size=6), cache)


def test_estimate_arithmetic():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c = torch.tensor([2, 2, 2, 2])
    e = DivergenceEstimate.from_sums(s, c)
    sd = float(s.std())
    assert (e.mean, e.n) == (2.5, 4) and e.se == pytest.approx(sd / 2)
    assert e.per_token == pytest.approx(1.25) and e.per_token_se == pytest.approx(sd / 4)
    # Two samples per prompt: the per-prompt means [1.5, 3.5] are the independent units.
    e2 = DivergenceEstimate.from_sums(s, c, samples_per_prompt=2)
    assert e2.mean == 2.5 and e2.se == pytest.approx(1.0)
    # One prompt: its samples are the units.
    assert DivergenceEstimate.from_sums(s, c, samples_per_prompt=4).se == pytest.approx(sd / 2)
    # Ratio SE (delta method) with unequal lengths: Var(s − r·n)/(k·n̄²).
    c3 = torch.tensor([1, 2, 3, 6])
    e3 = DivergenceEstimate.from_sums(s, c3)
    r = 10 / 12
    assert e3.per_token == pytest.approx(r)
    assert e3.per_token_se == pytest.approx(float((s - r * c3).std()) / (2 * 3))
    assert e.to_dict("proxy_fkl") == {"proxy_fkl": 2.5, "proxy_fkl_se": e.se, "proxy_fkl_per_token": 1.25,
                                      "proxy_fkl_per_token_se": e.per_token_se, "proxy_fkl_n": 4}
    with pytest.raises(ValueError):
        DivergenceEstimate.from_sums(s, c, samples_per_prompt=3)
