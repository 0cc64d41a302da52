"""kdlab.models.prefix: the prompt-cached teacher gives `LM.response_logits` (the model's own HF forward).

Ground truth: transformers' forward over prompt + response, through `LM.response_logits`. The cached path
shares no code with it beyond the module weights (its layer wiring is kdlab.models.decode's).
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdlab.data.sources import OnlineStudentSource
from kdlab.models import LM
from kdlab.models.prefix import PromptCachedTeacher, prompt_bytes
from tests.test_decode import FAMILIES, llama, padded_prompts


def responses(B, R=5, V=64, seed=1):
    return torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(seed))


def check(teacher: PromptCachedTeacher, lm: LM, x, mask, r, r_mask=None):
    with torch.no_grad():
        want = lm.response_logits(x, mask, r, r_mask)
        got = teacher.response_logits(x, mask, r, r_mask)
    keep = (torch.ones_like(r, dtype=torch.bool) if r_mask is None else r_mask.bool())[..., None].expand_as(want)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_logits_equal_the_model_forward(kv_heads, padded, family):
    lm = FAMILIES[family](kv_heads=kv_heads, layers=3)
    x, mask = padded_prompts()
    mask = mask if padded else None
    teacher = PromptCachedTeacher(lm)
    assert teacher.warm(x, mask) == len(x)
    r = responses(len(x))
    check(teacher, lm, x, mask, r)
    assert teacher.stats["hits"] == len(x) and teacher.stats["misses"] == 0
    # the same prompts in another order, repeated, with other responses: still the cache, still the forward
    order = torch.tensor([3, 3, 0, 5, 1, 2, 4, 0])
    check(teacher, lm, x[order], None if mask is None else mask[order], responses(len(order), seed=2))
    assert teacher.stats["hits"] == len(x) + len(order) and teacher.stats["prompts"] == len(x)


def test_prompts_enter_on_first_use_and_padding_does_not_split_them():
    lm = llama()
    x, mask = padded_prompts()
    teacher = PromptCachedTeacher(lm)
    check(teacher, lm, x, mask, responses(len(x)))  # nothing warmed: added on first sight
    assert teacher.stats["prompts"] == len(x)
    # row 2 right-padded, now given left-padded: the same real tokens, the same entry
    row = x[2][mask[2]]
    moved = torch.zeros_like(x[2:3])
    moved[0, -len(row):] = row
    moved_mask = torch.zeros_like(mask[2:3])
    moved_mask[0, -len(row):] = True
    check(teacher, lm, moved, moved_mask, responses(1, seed=3))
    assert teacher.stats["prompts"] == len(x)


def test_response_padding_and_gaps():
    lm = llama()
    x, mask = padded_prompts()
    teacher = PromptCachedTeacher(lm)
    r = responses(len(x), R=6)
    trailing = torch.ones_like(r, dtype=torch.bool)
    trailing[0, 3:] = False  # an early end: trailing padding, the cached path
    check(teacher, lm, x, mask, r, trailing)
    assert teacher.stats["misses"] == 0
    gap = trailing.clone()
    gap[1, 2] = False  # a hole before the end: the full forward answers
    check(teacher, lm, x, mask, r, gap)
    assert teacher.stats["misses"] == len(x)
    check(teacher, lm, x, mask, r[:, :1])  # one response token: its logits come from the prompt alone


def test_budget_refuses_prompts_that_do_not_fit():
    lm = llama()
    x, _ = padded_prompts()
    one = prompt_bytes(lm.hf, x.shape[1])
    # ground truth of the size: the stored tensors' bytes
    teacher = PromptCachedTeacher(lm, budget_bytes=2 * one)
    assert teacher.warm(x) == 2
    entry = next(iter(teacher._s["entries"].values()))
    assert sum(t.numel() * t.element_size() for t in entry) == one
    assert teacher.stats == {"prompts": 2, "bytes": 2 * one, "hits": 0, "misses": 0, "refused": len(x) - 2}
    check(teacher, lm, x, None, responses(len(x)))  # rows past the budget: the full forward, the same numbers
    assert teacher.stats["misses"] == len(x) and teacher.stats["prompts"] == 2


def test_compiled_response_pass_equals_the_forward():
    lm = llama(layers=2)
    x, mask = padded_prompts()
    eager = PromptCachedTeacher(lm)
    eager.warm(x, mask)
    compiled = eager.with_compile(True)
    check(compiled, lm, x, mask, responses(len(x)))
    assert compiled.stats["prompts"] == len(x) and compiled.stats["hits"] == eager.stats["hits"] == len(x)


def test_other_architectures_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval()
    with pytest.raises(ValueError, match="Llama and Qwen2 decoders"):
        PromptCachedTeacher(LM(gpt2))


def kdlab_run(out, *sets):
    cmd = [sys.executable, "-m", "kdlab.cli", "run", "configs/tiny.yaml", "--set", f"output_dir={out}",
           "--set", f"cache_dir={out.parent / 'kd-cache'}", "--set", "stage2.steps=12", *sum((["--set", s] for s in sets), [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("regime", ["online_student", "offline"])
def test_a_run_trains_the_same_with_and_without_the_cache(tmp_path, regime):
    sets = [f"stage2.regime={regime}", "stage2.offline.targets=none", "stage2.compile_teacher=false",
            "stage2.compile_student=false"]
    rows = {}
    for setting in ("true", "false"):
        out = kdlab_run(tmp_path / setting, *sets, f"stage2.teacher_prompt_cache={setting}")
        assert out.returncode == 0, out.stderr
        assert ("teacher prompt cache:" in out.stderr + out.stdout) == (setting == "true")
        rows[setting] = [json.loads(line) for line in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["true"]] == [r["step"] for r in rows["false"]]
    for a, b in zip(rows["true"], rows["false"]):
        for key in ("train_loss", "proxy_fkl", "golden_fkl"):
            if b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_the_setting_where_the_teacher_or_the_regime_cannot_use_it(tmp_path):
    from kdlab.config import load_config
    from kdlab.data.sources import OnlineTeacherSource, SamplingParams
    from kdlab.pipeline.distill import make_prompt_cache
    from kdlab.pipeline.distributed import Distributed

    gpt2 = LM(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval())
    x, mask = padded_prompts()
    on_policy = OnlineStudentSource(x, mask, 2, 0, SamplingParams(max_new_tokens=3))
    logs = []

    def cache(setting, teacher, source):
        cfg = load_config("configs/tiny.yaml", [f"stage2.teacher_prompt_cache={setting}"])
        return make_prompt_cache(cfg, teacher, source, Distributed(None), logs.append)

    with pytest.raises(ValueError, match="stage2.teacher_prompt_cache=true covers Llama and Qwen2 teachers"):
        cache("true", gpt2, on_policy)
    assert cache("auto", gpt2, on_policy) is None and cache("false", llama(), on_policy) is None
    made = cache("auto", llama(), on_policy)  # 24 steps x 16 rows over 6 prompts: 64 uses each
    assert made.stats["prompts"] == len(x) and "teacher prompt cache: 6 prompts" in logs[-1]
    # a run that uses each prompt less than twice: 'auto' leaves it off (the pool pass would not pay), true does not
    short = ["stage2.steps=1", "stage2.batch_size=8"]
    cfg = load_config("configs/tiny.yaml", ["stage2.teacher_prompt_cache=auto", *short])
    assert make_prompt_cache(cfg, llama(), on_policy, Distributed(None), logs.append) is None
    assert "off (1 steps x 8 use each of 6 prompts 1.33 times" in logs[-1]
    cfg = load_config("configs/tiny.yaml", ["stage2.teacher_prompt_cache=true", *short])
    assert make_prompt_cache(cfg, llama(), on_policy, Distributed(None), logs.append) is not None
    # online_teacher: its targets come out of the teacher's own sampling pass; nothing to cache
    teacher_samples = OnlineTeacherSource(llama(), x, mask, 2, 0, SamplingParams(max_new_tokens=3))
    assert cache("true", llama(), teacher_samples) is None and "not used" in logs[-1]
    # ... except from vLLM, which returns no logits: those batches run the teacher forward, and the cache serves them
    cfg = load_config("configs/tiny.yaml", ["stage2.teacher_prompt_cache=true", "stage2.sampling.backend=vllm"])
    assert make_prompt_cache(cfg, llama(), teacher_samples, Distributed(None), logs.append).stats["prompts"] == len(x)


def test_under_bf16_autocast_the_cached_logits_follow_the_forward():
    """The 124m preset runs bf16 autocast on the CPU: the cached path under it stays at the forward's bf16 rounding
    (both round their matmuls to bf16; the cached one keeps the prompts' keys in float32)."""
    from kdlab.models import bf16_autocast

    lm = llama(layers=3, initializer_range=0.3)  # peaked attention: a wrong position or key moves logits by O(1)
    x, mask = padded_prompts()
    r = responses(len(x))
    with bf16_autocast(torch.device("cpu"), True), torch.no_grad():
        teacher = PromptCachedTeacher(lm)
        teacher.warm(x, mask)
        got, want = teacher.response_logits(x, mask, r), lm.response_logits(x, mask, r)
    assert teacher.stats["hits"] == len(x) and got.dtype == torch.float32
    with torch.no_grad():
        exact = lm.response_logits(x, mask, r)  # float32: how far bf16 itself moves the logits
    bf16_error = (want - exact).abs().max()
    assert bf16_error > 0  # autocast did round
    assert (got - want).abs().max() <= 2 * bf16_error
