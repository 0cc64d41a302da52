"""The drift panel (issue 21, kdlab.metrics.drift) against values known from outside the code: a uniform model's
entropy (log V), a student equal to the teacher (no exposure gap, full top-k overlap), a student that cannot
emit EOS (never ends), hand-counted n-gram repetition."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from kdlab import record
from kdlab.metrics.drift import DriftPanel, repetition_rate
from kdlab.models import LM, tiny_llama_config

V, EOS = 12, 3


def _lm(seed: int, eos_logit: float | None = None, uniform: bool = False) -> LM:
    """A tiny random Llama, peaked enough that its samples differ from uniform ones; `uniform`: zero head (every
    next-token distribution uniform); `eos_logit`: the EOS logit forced to a constant (-1e4: never ends)."""
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(tiny_llama_config(V, 16, 1, 2, eos_token_id=EOS))
    with torch.no_grad():
        hf.lm_head.weight.mul_(0.0 if uniform else 20.0)
    if eos_logit is not None:
        def force_eos(module, inputs, output):
            output[..., EOS] = eos_logit
            return output
        hf.lm_head.register_forward_hook(force_eos)
    return LM(hf.eval())


def _prompts(n=40, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (n, p), generator=g)
    return ids, torch.ones_like(ids)


def _panel(teacher, oracle=None, max_new_tokens=6, eos=EOS):
    ids, mask = _prompts()
    return DriftPanel(teacher, ids, mask, max_new_tokens, oracle=oracle, eos_token_id=eos, batch_size=16, topk=4)


def test_a_student_equal_to_the_teacher_has_no_exposure_gap_and_full_overlap():
    t = _lm(1)
    row = _panel(t)(t)
    assert row[record.EXPOSURE_GAP] == pytest.approx(0.0, abs=1e-12)
    assert row[record.TOPK_OVERLAP] == pytest.approx(1.0)
    assert row[record.ENTROPY_STUDENT] == pytest.approx(row[record.ENTROPY_TEACHER], abs=1e-12)
    assert row[record.EOS_MASS_STUDENT] == pytest.approx(row[record.EOS_MASS_TEACHER], abs=1e-12)


def test_uniform_models_have_entropy_log_v_and_a_student_apart_has_a_gap():
    u = _lm(2, uniform=True)
    row = _panel(_lm(1), oracle=u)(u)
    assert row[record.ENTROPY_STUDENT] == pytest.approx(math.log(V), rel=1e-9)
    assert row[record.ENTROPY_ORACLE] == pytest.approx(math.log(V), rel=1e-9)
    assert row[record.ENTROPY_TEACHER] < math.log(V) - 0.1
    assert row[record.TOPK_OVERLAP] < 1.0


def test_a_student_that_cannot_emit_eos_never_ends():
    teacher = _lm(1, eos_logit=5.0)     # ends early and often
    student = _lm(1, eos_logit=-1e4)    # the EOS row unreachable (another tokenizer's EOS id)
    row = _panel(teacher, max_new_tokens=6)(student)
    assert row[record.NO_EOS_STUDENT] == 1.0 and row[record.LENGTH_STUDENT] == 6.0
    assert row[record.EOS_MASS_STUDENT] < 1e-6
    assert row[record.NO_EOS_TEACHER] < 0.5 and row[record.LENGTH_TEACHER] < 4.0
    assert row[record.EOS_MASS_GAP_MAX] > 0.5


def test_without_eos_the_eos_columns_are_left_out():
    t = _lm(1)
    row = _panel(t, eos=None)(t)
    assert record.NO_EOS_STUDENT not in row and record.EOS_MASS_GAP_MAX not in row
    assert row[record.LENGTH_STUDENT] == row[record.LENGTH_TEACHER] == 6.0


def test_repetition_rate_counts_repeated_ngrams():
    ids = torch.tensor([[1, 2, 1, 2, 1], [1, 2, 3, 4, 5], [7, 7, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # (1,2),(2,1),(1,2),(2,1): 2 distinct of 4; all distinct; (7,7),(7,7): 1 of 2 (padding left out)
    assert repetition_rate(ids, mask, 2).tolist() == [0.5, 0.0, 0.5]
    assert repetition_rate(ids, mask, 1).tolist() == [pytest.approx(0.6), 0.0, pytest.approx(2 / 3)]


def test_the_teacher_samples_are_drawn_once_and_the_student_ones_repeat():
    t, s = _lm(1), _lm(5)
    panel = _panel(t)
    first = panel(s)
    drawn = panel._teacher_samples
    assert panel(s) == first and panel._teacher_samples is drawn  # the same draw, not a redraw


def test_a_small_memory_budget_splits_the_rows_and_changes_nothing():
    """memory_mb bounds the B×R×V float64 block per forward (real vocabularies); one row at a time gives the
    same panel as whole batches."""
    t, s = _lm(1, eos_logit=2.0), _lm(5)
    whole = _panel(t)(s)
    tiny = _panel(t)
    tiny.memory_mb = 0  # -> one row per forward
    # float32 forwards of 1 row and of whole batches may round differently (BLAS blocking depends on the shape and
    # the thread count: about 1e-9 relative seen here); a wrong slice of rows would differ at order 1
    assert tiny(s) == pytest.approx(whole, rel=1e-6, abs=1e-9)


def test_a_kdlab_run_logs_the_panel_and_its_trajectory_is_unchanged(tmp_path):
    """eval.drift: the panel's columns at every evaluation of a real stage-2 run; the proxy and golden values
    are those of the same run without it (the panel draws from its own random streams)."""
    from pathlib import Path

    from kdlab.config import load_config
    from kdlab.pipeline.distill import run
    from kdlab.pipeline.rundir import read_metrics

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    common = [f"cache_dir={tmp_path / 'cache'}", "stage2.steps=6", "eval.num_points=3", "threads=1"]
    plain = run(load_config(tiny, [f"output_dir={tmp_path / 'plain'}", *common]), log=lambda m: None, progress=False)
    drift = run(load_config(tiny, [f"output_dir={tmp_path / 'drift'}", "eval.drift=true", *common]),
                log=lambda m: None, progress=False)
    a, b = read_metrics(plain / record.METRICS), read_metrics(drift / record.METRICS)
    assert [r[record.PROXY] for r in a] == [r[record.PROXY] for r in b]
    assert [r.get(record.GOLDEN) for r in a] == [r.get(record.GOLDEN) for r in b]
    for r in b:
        for col in (record.LENGTH_STUDENT, record.ENTROPY_STUDENT, record.ENTROPY_TEACHER, record.TOPK_OVERLAP,
                    record.EXPOSURE_GAP, record.REPETITION_STUDENT):
            assert r[col] is not None and r[record.se_column(col)] is not None, col
        assert record.LENGTH_STUDENT not in a[0]


def test_a_synthetic_world_with_an_eos_ends_responses_and_the_panel_sees_it(tmp_path):
    """world.synthetic.eos_token_id: the oracle's samples stop at that token (some rows shorter than the limit, masked
    after it), the world, the teacher, the student and its saved checkpoint carry it, and a run with the drift
    panel logs lengths below the limit and no-EOS rates below 1 on both sides. The stage-1 key of a world without
    an EOS is the key it had before the field existed (a literal: caches stay valid)."""
    from pathlib import Path

    from kdlab import record
    from kdlab.config import load_config
    from kdlab.models.sampling import sample
    from kdlab.pipeline.distill import run
    from kdlab.pipeline.rundir import read_metrics
    from kdlab.pipeline.world import build_world

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert load_config(tiny, []).stage1_key() == "eace7ebe8dcaa163"
    cfg = load_config(tiny, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                             "world.synthetic.eos_token_id=0", "eval.drift=true", "stage2.steps=4", "eval.num_points=2"])
    world = build_world(cfg, log=lambda m: None)
    assert world.eos_token_id == 0 and world.teacher.eos_token_id == 0
    ids, mask = world.prompts["eval"]
    s = sample(world.oracle, ids[:64], mask[:64], max_new_tokens=cfg.world.response_length, eos_token_id=0,
               generator=torch.Generator().manual_seed(0))
    lengths = s.response_mask_BxR.sum(-1)
    assert (lengths < cfg.world.response_length).any()  # some responses end early, at the EOS
    ended = lengths < cfg.world.response_length
    assert (s.response_ids_BxR[ended, lengths[ended] - 1] == 0).all()  # ... exactly at the EOS
    out = run(cfg, log=lambda m: None, progress=False)
    last = read_metrics(out / record.METRICS)[-1]
    assert last[record.LENGTH_TEACHER] < cfg.world.response_length and last[record.NO_EOS_TEACHER] < 1
    assert 0 <= last[record.NO_EOS_STUDENT] <= 1
    import json
    saved = json.loads(next((out / record.CHECKPOINTS).rglob("config.json")).read_text())
    assert saved["eos_token_id"] == 0
