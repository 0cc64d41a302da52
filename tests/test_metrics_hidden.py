"""Exact metrics at any vocabulary size (issue 18): a reference cache that keeps the reference's final hidden
states and head gives the same fkl as full cached log-probs (the ground truth: the reference's own logits), for
causal LMs and T5, tied and untied heads; the default storage is always exact; top-k says it is a lower bound."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlab.metrics import ReferenceCache, sequence_fkl, sequence_fkl_sums, sequence_rkl
from kdlab.models import LM, tiny_llama_config
from test_seq2seq import prompts as t5_prompts
from test_seq2seq import tiny_t5

V, R = 300, 5


def llama(seed, tie, hidden=16, vocab=V) -> LM:
    torch.manual_seed(seed)
    return LM(AutoModelForCausalLM.from_config(tiny_llama_config(vocab, hidden, 1, 2, tie_word_embeddings=tie)))


def causal_prompts(n=6, P=3, vocab=V):
    return torch.randint(0, vocab, (n, P), generator=torch.Generator().manual_seed(3)), None


def models(kind):
    if kind.startswith("llama"):
        tie = kind.endswith("tied")
        return llama(0, tie, hidden=24), llama(1, tie), causal_prompts()
    tie = kind.endswith("tied")
    return tiny_t5(10, tie), tiny_t5(11, tie, d_model=16), t5_prompts()


def build(A, ids, mask, storage, **kw):
    return ReferenceCache.build(A, ids, mask, samples_per_prompt=2, max_new_tokens=R, storage=storage,
                                generator=torch.Generator().manual_seed(5), **kw)


@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied", "t5-tied", "t5-untied"])
def test_hidden_storage_equals_full_log_probs(kind):
    A, S, (ids, mask) = models(kind)
    full, hidden = build(A, ids, mask, "full"), build(A, ids, mask, "hidden")
    assert hidden.storage == "hidden" and hidden.label == "hidden"
    assert torch.equal(full.response_ids_MxR, hidden.response_ids_MxR)
    H = hidden.targets.hidden.shape[-1]
    assert hidden.targets.hidden.shape[:2] == full.response_ids_MxR.shape and hidden.targets.weight.shape == (A.vocab_size, H)
    sums_full, counts = sequence_fkl_sums(S, full)
    for chunk in (3, 1024):  # a chunk smaller than one sequence, and one larger than the batch
        sums_hidden, counts_h = _sums_with_chunk(S, hidden, chunk)
        torch.testing.assert_close(sums_hidden, sums_full, rtol=1e-5, atol=1e-6)
        assert torch.equal(counts_h, counts)
    a, b = sequence_fkl(S, full), sequence_fkl(S, hidden)
    # The metric within 1e-5 relative (the target); its SE, a spread of small sums, within 1e-3.
    assert b.mean == pytest.approx(a.mean, rel=1e-5) and b.se == pytest.approx(a.se, rel=1e-3)
    # A live reference on the lean path (storage none) is the same number again.
    live = build(A, ids, mask, "none")
    assert sequence_fkl_sums(S, live, reference_lm=A)[0] == pytest.approx(sums_full, rel=1e-5, abs=1e-6)


def _sums_with_chunk(S, cache, chunk):
    from kdlab.metrics import sequence_kl_sums

    ids, mask = cache.prompts_for_sequences()
    return sequence_kl_sums(S, cache.targets, ids, mask, cache.response_ids_MxR, cache.response_mask_MxR,
                            chunk_size=chunk, batch_size=5)


def test_reverse_kl_on_the_lean_path_equals_the_dense_one():
    A, S, (ids, _) = models("llama-untied")
    dense = sequence_rkl(S, A, ids, max_new_tokens=R, generator=torch.Generator().manual_seed(1))
    lean = sequence_rkl(S, A, ids, max_new_tokens=R, generator=torch.Generator().manual_seed(1), lean=True)
    assert lean.mean == pytest.approx(dense.mean, rel=1e-5) and lean.se == pytest.approx(dense.se, rel=1e-3)


def test_the_default_storage_is_exact_and_top_k_says_it_is_a_lower_bound():
    A, S, (ids, mask) = models("llama-untied")
    M, H = ids.shape[0] * 2, 24
    full_bytes, hidden_bytes = M * R * V * 4, M * R * H * 4 + V * H * 4
    assert hidden_bytes < full_bytes

    def storage(budget):
        return build(A, ids, mask, "auto", memory_budget_bytes=budget, topk=8).storage

    assert storage(full_bytes) == "full"
    assert storage(full_bytes - 1) == "hidden"
    assert storage(hidden_bytes) == "hidden"
    assert storage(hidden_bytes - 1) == "none"  # the reference then runs live: still exact, never top-k
    topk = build(A, ids, mask, "topk", topk=8)
    assert topk.label == "top-8 lower bound"
    assert build(A, ids, mask, "none").label == "live"
    assert sequence_fkl(S, topk).mean < sequence_fkl(S, build(A, ids, mask, "hidden")).mean


def test_hidden_cache_save_load_roundtrip(tmp_path):
    A, S, (ids, mask) = models("llama-tied")
    c = build(A, ids, mask, "hidden")
    c.save(tmp_path / "c")
    d = ReferenceCache.load(tmp_path / "c")
    assert d.storage == "hidden" and d.meta["storage"] == "hidden"
    assert torch.equal(c.targets.hidden, d.targets.hidden) and torch.equal(c.targets.weight, d.targets.weight)
    assert sequence_fkl(S, c) == sequence_fkl(S, d)
