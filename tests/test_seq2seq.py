"""Encoder-decoder (T5) models behind the same LM interface: logits, sampling, save/load, losses, metrics."""

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from kdlab import losses
from kdlab.metrics import ReferenceCache, sequence_fkl, sequence_fkl_sums
from kdlab.models import LM
from kdlab.models.sampling import sample
from kdlab.pipeline.stage1 import sft
from kdlab.config import SFTConfig

V, EOS = 40, 1


def tiny_t5(seed: int, tie: bool = True, d_model: int = 32) -> LM:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=V, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS, dropout_rate=0.0,
                   tie_word_embeddings=tie)
    return LM(T5ForConditionalGeneration(cfg))


def prompts(n=5, P=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, P), generator=g)
    mask = torch.ones(n, P, dtype=torch.bool)
    for b in range(n):  # left padding of varying length
        mask[b, : b % 4] = False
        ids[b, : b % 4] = 0
    return ids, mask


def test_is_encoder_decoder_and_eos():
    lm = tiny_t5(0)
    assert lm.is_encoder_decoder
    assert lm.eos_token_id == EOS
    assert lm.vocab_size == V


@pytest.mark.parametrize("tie", [True, False])
def test_padded_batch_equals_single_examples(tie):
    lm = tiny_t5(1, tie)
    ids, mask = prompts()
    r = torch.randint(2, V, (5, 6))
    r_mask = torch.ones(5, 6, dtype=torch.bool)
    r_mask[2, 4:] = False
    batch = lm.response_logits(ids, mask, r, r_mask)
    for b in range(5):
        one = lm.response_logits(ids[b:b + 1, mask[b]], None, r[b:b + 1], r_mask[b:b + 1])
        keep = r_mask[b]
        torch.testing.assert_close(batch[b, keep], one[0, keep], atol=1e-5, rtol=1e-5)


def test_right_padded_prompts_are_repacked():
    lm = tiny_t5(2)
    ids, mask = prompts()
    r = torch.randint(2, V, (5, 4))
    # the same prompts, right-padded instead of left-padded
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    ids_r, mask_r = ids.gather(-1, order), mask.gather(-1, order)
    assert not torch.equal(mask_r, mask)
    torch.testing.assert_close(lm.response_logits(ids, mask, r), lm.response_logits(ids_r, mask_r, r))


def test_decoder_input_is_shifted_response():
    """Position t of response_logits must be p(y_t | x, y_<t): changing y_t changes only positions > t."""
    lm = tiny_t5(3)
    ids, mask = prompts(2)
    r = torch.randint(2, V, (2, 6))
    base = lm.response_logits(ids, mask, r)
    r2 = r.clone()
    r2[:, 3] = (r2[:, 3] + 1) % V
    other = lm.response_logits(ids, mask, r2)
    torch.testing.assert_close(base[:, :4], other[:, :4])
    assert (base[:, 4:] - other[:, 4:]).abs().max() > 1e-4


def test_forward_matches_hf_labels_loss():
    """The logprobs equal what T5 itself computes from labels (its own _shift_right)."""
    lm = tiny_t5(4)
    ids = torch.randint(2, V, (3, 5))
    r = torch.randint(2, V, (3, 6))
    ours = -lm.response_logprobs(ids, None, r).mean()
    theirs = lm.hf(input_ids=ids, labels=r).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_times_lm_head_is_logits(tie):
    lm = tiny_t5(5, tie)
    ids, mask = prompts(3)
    r = torch.randint(2, V, (3, 5))
    h = lm.response_hidden(ids, mask, r)
    torch.testing.assert_close(h @ lm.lm_head_weight.T, lm.response_logits(ids, mask, r), atol=1e-5, rtol=1e-5)


def test_sampling_logprobs_and_eos_mask():
    lm = tiny_t5(6)
    ids, mask = prompts(8)
    s = sample(lm, ids, mask, max_new_tokens=10, eos_token_id=EOS, generator=torch.Generator().manual_seed(0),
               return_logits=True)
    assert s.response_ids_BxR.shape == (8, 10)
    # at T=1 the sampled tokens' log q equal the model's own log-probs of them
    lp = lm.response_logprobs(ids, mask, s.response_ids_BxR, s.response_mask_BxR)
    torch.testing.assert_close(lp, s.logprobs_BxR, atol=1e-5, rtol=1e-5)
    # the sampling pass's logits are the model's logits on its own samples
    full = lm.response_logits(ids, mask, s.response_ids_BxR, s.response_mask_BxR)
    m = s.response_mask_BxR
    torch.testing.assert_close(s.logits_BxRxV[m], full[m], atol=1e-4, rtol=1e-4)
    # mask is True up to and including the first EOS, False after
    for row, keep in zip(s.response_ids_BxR, m):
        hits = (row == EOS).nonzero()
        if len(hits):
            first = int(hits[0])
            assert keep[: first + 1].all() and not keep[first + 1:].any()
        else:
            assert keep.all()
    # same generator state, same samples
    s2 = sample(lm, ids, mask, max_new_tokens=10, eos_token_id=EOS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.response_ids_BxR, s2.response_ids_BxR)


def test_row_seeded_sampling_on_t5():
    """The online regimes sample with one seed per row (each rank its own rows): on T5's generate path a
    row alone draws what it draws in the batch, with the model's own log-probs and logits."""
    lm = tiny_t5(6)
    ids, mask = prompts(8)
    seeds = torch.randint(0, 2**62, (8,), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, eos_token_id=EOS, return_logits=True, row_seeds=seeds)
    s = sample(lm, ids, mask, **kw)
    m = s.response_mask_BxR
    assert not m.all() and m.sum() > 16  # some rows ended at EOS, and the rows are not all empty
    torch.testing.assert_close(s.logprobs_BxR, lm.response_logprobs(ids, mask, s.response_ids_BxR, m),
                               atol=1e-5, rtol=1e-5)
    full = lm.response_logits(ids, mask, s.response_ids_BxR, m)
    torch.testing.assert_close(s.logits_BxRxV[m], full[m], atol=1e-4, rtol=1e-4)
    alone = sample(lm, ids[3:5], mask[3:5], **{**kw, "row_seeds": seeds[3:5]})
    assert torch.equal(alone.response_ids_BxR, s.response_ids_BxR[3:5])
    assert torch.equal(alone.response_mask_BxR, m[3:5])


def test_eos_stops_rows():
    """Greedy decoding with EOS set to the token row 0 emits first: row 0 stops after one token, the
    other rows at their own first occurrence of it, and the tokens before are the EOS-free decode's."""
    lm = tiny_t5(7)
    ids, mask = prompts(4)
    free = sample(lm, ids, mask, max_new_tokens=6, temperature=0.0)
    eos = int(free.response_ids_BxR[0, 0])
    s = sample(lm, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=eos)
    assert s.response_mask_BxR[0].tolist() == [True] + [False] * 5
    for b in range(4):
        row = free.response_ids_BxR[b]
        hits = (row == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 6
        assert int(s.response_mask_BxR[b].sum()) == n
        assert torch.equal(s.response_ids_BxR[b, :n], row[:n])


def test_save_load_roundtrip(tmp_path):
    lm = tiny_t5(8)
    lm.save(tmp_path / "t5")
    back = LM.load(tmp_path / "t5")
    assert back.is_encoder_decoder and type(back.hf).__name__ == "T5ForConditionalGeneration"
    ids, mask = prompts(3)
    r = torch.randint(2, V, (3, 4))
    torch.testing.assert_close(back.response_logits(ids, mask, r), lm.response_logits(ids, mask, r))


def test_truncated_checkpoint_is_named(tmp_path):
    from kdlab.models.lm import CheckpointError

    tiny_t5(9).save(tmp_path / "t5")
    f = tmp_path / "t5" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LM.load(tmp_path / "t5")


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_losses_train_a_t5_student_towards_a_t5_teacher(name):
    """Losses are unchanged: dense and lean paths agree on T5 logits, and training lowers the loss."""
    teacher, student = tiny_t5(10), tiny_t5(11)
    ids, mask = prompts(6)
    r = sample(teacher, ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    target = teacher.response_logits(ids, mask, r.response_ids_BxR).detach()
    fn = losses.get(name)
    dense = fn(student.response_logits(ids, mask, r.response_ids_BxR), target, r.response_mask_BxR, reduction="sum")
    lean = losses.lean_loss(fn, student.response_hidden(ids, mask, r.response_ids_BxR), student.lm_head_weight,
                            target, r.response_mask_BxR, chunk_size=7, reduction="sum")
    torch.testing.assert_close(dense, lean, atol=1e-4, rtol=1e-4)
    opt = torch.optim.Adam(student.hf.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = fn(student.response_logits(ids, mask, r.response_ids_BxR), target, r.response_mask_BxR)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_sequence_metrics_on_t5():
    """sequence_fkl on a T5 pair equals Σ_t KL(A_t ‖ S_t) along the cached reference samples, computed
    here from the two models' full distributions."""
    teacher, student = tiny_t5(12), tiny_t5(13)
    ids, mask = prompts(6)
    cache = ReferenceCache.build(teacher, ids, mask, samples_per_prompt=2, max_new_tokens=5, eos_token_id=EOS,
                                 generator=torch.Generator().manual_seed(2))
    est = sequence_fkl(student, cache)
    sums, _ = sequence_fkl_sums(student, cache, reference_lm=teacher)
    p_ids, p_mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    r_ids, r_mask = cache.response_ids_MxR, cache.response_mask_MxR
    with torch.no_grad():
        la = teacher.response_logits(p_ids, p_mask, r_ids, r_mask).double().log_softmax(-1)
        ls = student.response_logits(p_ids, p_mask, r_ids, r_mask).double().log_softmax(-1)
    manual = ((la.exp() * (la - ls)).sum(-1) * r_mask).sum(1)
    torch.testing.assert_close(sums.double(), manual, atol=1e-4, rtol=1e-4)
    assert abs(est.mean - manual.mean().item()) < 1e-4


def test_stage1_sft_on_t5_lowers_the_loss():
    teacher, student = tiny_t5(14), tiny_t5(15)
    ids, mask = prompts(32, seed=3)
    s = sample(teacher, ids, mask, max_new_tokens=5, generator=torch.Generator().manual_seed(3))
    losses_ = sft(student, ids, mask, s.response_ids_BxR, s.response_mask_BxR,
                  SFTConfig(num_samples=32, steps=40, batch_size=16, lr=3e-3), seed=0, desc="student")
    assert sum(losses_[-5:]) / 5 < 0.8 * sum(losses_[:5]) / 5


def test_vllm_backend_refuses_encoder_decoder_models():
    from kdlab.models.vllm_backend import make_sampler

    with pytest.raises(ValueError, match="encoder-decoder .*sampling.backend='builtin'"):
        make_sampler("vllm", teacher=tiny_t5(16))


def test_missing_models_are_named(tmp_path):
    from kdlab.models.lm import CheckpointError

    with pytest.raises(CheckpointError, match="no model directory at .*nowhere"):
        LM.load(tmp_path / "nowhere")
