"""Sampling backends: the built-in sampler behind the backend interface, a clear error without vLLM,
and the vLLM glue (request building, padding, log-probs, weight sync) against a stand-in that has
vLLM's documented interface (there is no GPU or vLLM in the CPU suite)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.models import LM
from kdlab.models.sampling import sample
from kdlab.models.vllm_backend import VLLMBackend, VLLMUnavailable, make_sampler, samples_from_outputs
from kdlab.pipeline.distill import make_source, run
from kdlab.pipeline.world import build_world

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_missing_vllm_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'cache'}",
                             "stage2.regime=online_student", "stage2.sampling.backend=vllm"])
    with pytest.raises(VLLMUnavailable, match=r"needs vLLM.*stage2.sampling.backend=builtin"):
        run(cfg, log=lambda m: None, progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def test_online_sources_sample_through_the_configured_backend(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'cache'}",
                             "stage2.regime=online_teacher"])
    assert make_sampler("builtin") is sample
    world = build_world(cfg, log=lambda m: None)
    calls = []

    def recording(lm, *args, **kwargs):
        calls.append(lm)
        return sample(lm, *args, **kwargs)

    plain, _ = make_source(cfg, world, tmp_path, log=lambda m: None)
    routed, _ = make_source(cfg, world, tmp_path, log=lambda m: None, sampler=recording)
    a, b = plain.batch(3), routed.batch(3)
    assert calls == [world.teacher]
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.teacher_target, b.teacher_target)


def test_samples_from_vllm_outputs_pad_and_mask_after_eos():
    Logprob = types.SimpleNamespace
    out = lambda toks, lps: types.SimpleNamespace(outputs=[types.SimpleNamespace(  # noqa: E731
        token_ids=toks, logprobs=[{t: Logprob(logprob=lp), 99: Logprob(logprob=-9.0)} for t, lp in zip(toks, lps)])])
    s = samples_from_outputs([out([5, 6, 2], [-0.1, -0.2, -0.3]), out([7, 8, 9, 4], [-1.0, -1.1, -1.2, -1.3])],
                             max_new_tokens=4, eos_token_id=2, device="cpu")
    assert s.response_ids_BxR.tolist() == [[5, 6, 2, 2], [7, 8, 9, 4]]
    assert s.response_mask_BxR.tolist() == [[True, True, True, False], [True] * 4]
    torch.testing.assert_close(s.logprobs_BxR, torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-1.0, -1.1, -1.2, -1.3]]))
    assert s.logits_BxRxV is None  # vLLM gives no full-vocabulary logits: the step runs a teacher forward
    # Several EOS ids (chat models): padding uses the first, whichever ended the row.
    s = samples_from_outputs([out([5, 3], [-0.1, -0.2])], max_new_tokens=4, eos_token_id=(2, 3), device="cpu")
    assert s.response_ids_BxR.tolist() == [[5, 3, 2, 2]]
    assert s.response_mask_BxR.tolist() == [[True, True, False, False]]


def _fake_vllm(created: list):
    """A stand-in with the surface of vLLM's offline API that kdlab uses, sampling with transformers."""

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model: str, **kw):
            self.lm, self.kwargs = LM.load(model), kw
            runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
            worker = types.SimpleNamespace(model_runner=runner)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
            created.append(self)

        def _load_weights(self, weights):
            params = dict(self.lm.hf.named_parameters())
            for name, w in weights:
                params[name].data.copy_(w)

        def reset_prefix_cache(self):
            pass

        def generate(self, prompts, params, use_tqdm=True):
            self.last_params = params
            outs = []
            for p, sp in zip(prompts, params):
                ids = torch.tensor([p["prompt_token_ids"]])
                s = sample(self.lm, ids, None, max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                           generator=torch.Generator().manual_seed(sp.seed))
                toks = s.response_ids_BxR[0].tolist()
                lps = [{t: types.SimpleNamespace(logprob=float(lp))} for t, lp in zip(toks, s.logprobs_BxR[0])]
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=toks, logprobs=lps)]))
            return outs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_glue_with_a_stand_in_engine(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    created: list = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(created))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.manual_seed(0)
    teacher = LM(LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32)))
    student = LM(LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32)))
    teacher.save(tmp_path / "teacher")
    student.save(tmp_path / "student")
    backend = make_sampler("vllm", teacher=teacher, teacher_dir=tmp_path / "teacher", student_dir=tmp_path / "student")
    assert isinstance(backend, VLLMBackend)
    prompts = torch.tensor([[0, 3, 4], [5, 6, 7]])
    mask = torch.tensor([[False, True, True], [True, True, True]])  # left-padded
    kw = dict(max_new_tokens=5, temperature=1.0)
    s1 = backend(teacher, prompts, mask, generator=torch.Generator().manual_seed(1), **kw)
    s2 = backend(teacher, prompts, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert s1.response_ids_BxR.shape == (2, 5) and bool(s1.response_mask_BxR.all())
    assert torch.equal(s1.response_ids_BxR, s2.response_ids_BxR), "samples are a function of the generator state"
    # The log-probs reported are the sampler's own: the teacher's, on its samples.
    ref = teacher.response_logprobs(prompts, mask, s1.response_ids_BxR)
    torch.testing.assert_close(s1.logprobs_BxR, ref, rtol=1e-4, atol=1e-5)
    engine = created[0]
    assert engine.kwargs["logprobs_mode"] == "processed_logprobs" and engine.kwargs["skip_tokenizer_init"]
    assert all(p.ignore_eos and p.stop_token_ids is None for p in engine.last_params)  # no EOS: full length
    backend(teacher, prompts, mask, generator=torch.Generator().manual_seed(1), eos_token_id=(4, 7), **kw)
    assert all(not p.ignore_eos and p.stop_token_ids == [4, 7] for p in engine.last_params)
    # Per-row seeds (the online regimes under several processes): each request is seeded by its row's seed,
    # so a row asked for alone samples what it samples in the whole batch.
    seeds = torch.tensor([2**40 + 3, 17])
    s3 = backend(teacher, prompts, mask, row_seeds=seeds, **kw)
    assert [p.seed for p in engine.last_params] == [(2**40 + 3) % (2**31 - 1), 17]
    alone = backend(teacher, prompts[1:], mask[1:], row_seeds=seeds[1:], **kw)
    assert torch.equal(alone.response_ids_BxR, s3.response_ids_BxR[1:])
    # On-policy: the student engine gets the training weights before sampling.
    with torch.no_grad():
        for p in student.hf.parameters():
            p.add_(0.5)
    backend(student, prompts, mask, generator=torch.Generator().manual_seed(2), **kw)
    student_engine = created[1]
    for (n, a), (_, b) in zip(student.hf.named_parameters(), student_engine.lm.hf.named_parameters()):
        assert torch.equal(a, b), n
