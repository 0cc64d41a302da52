"""stage1.teacher_error: the teacher's SFT samples on a known prompt subset come from the oracle at
another temperature; everything else (other prompts, the student's initialisation) is untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config import ConfigError, load_config
from kdlab.models import make_synthetic_oracle
from kdlab.models.sampling import sample
from kdlab.pipeline.stage1 import _with_teacher_error, error_subset
from kdlab.pipeline.world import build_world

QUICK = "src/kdlab/pipeline/demo_configs/quick.yaml"


def test_subset_is_named_by_the_first_prompt_token():
    cfg = load_config(QUICK, ["stage1.teacher_error.fraction=0.25", "stage1.teacher_error.temperature=0.5"])
    ids = torch.tensor([[0, 9, 9], [3, 0, 0], [4, 1, 2], [15, 0, 0]])
    assert error_subset(ids, 16, cfg).tolist() == [True, True, False, False]  # first token < 0.25 * 16


def test_near_zero_temperature_gives_the_oracles_greedy_answer_on_the_subset_only():
    cfg = load_config(QUICK, ["stage1.teacher_error.fraction=0.5", "stage1.teacher_error.temperature=0.001"])
    oracle = make_synthetic_oracle(16, 32, 1, 2, seed=3, logit_scale=4.0, init_std=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (64, 4), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    clean = sample(oracle, ids, mask, max_new_tokens=6, generator=g)
    r_ids, r_mask = _with_teacher_error(oracle, ids, mask, clean.response_ids_BxR, clean.response_mask_BxR, cfg)
    greedy = sample(oracle, ids, mask, max_new_tokens=6, temperature=0).response_ids_BxR  # independent path
    in_s = ids[:, 0] < 8
    assert 0 < in_s.sum() < len(ids)
    assert torch.equal(r_ids[in_s], greedy[in_s])
    assert torch.equal(r_ids[~in_s], clean.response_ids_BxR[~in_s])
    assert not torch.equal(clean.response_ids_BxR[in_s], greedy[in_s])  # the clean samples were not greedy


def test_the_lever_changes_the_teacher_and_nothing_else(tmp_path):
    base = [f"cache_dir={tmp_path / 'cache'}", "stage1.teacher.steps=10", "stage1.student.steps=5"]
    plain = build_world(load_config(QUICK, base), log=lambda m: None)
    cfg = load_config(QUICK, base + ["stage1.teacher_error.fraction=0.5", "stage1.teacher_error.temperature=0.3"])
    err = build_world(cfg, log=lambda m: None)
    assert plain.directory != err.directory  # its own stage-1 cache entry
    assert load_config(QUICK, base).stage1_key() == load_config(QUICK, base + [
        "stage1.teacher_error.temperature=0.3"]).stage1_key()  # fraction 0: the lever is off, same key
    s_plain = load_file(str(plain.directory / "student_init" / "model.safetensors"))
    s_err = load_file(str(err.directory / "student_init" / "model.safetensors"))
    assert all(torch.equal(s_plain[k], s_err[k]) for k in s_plain)
    t_plain = load_file(str(plain.directory / "teacher" / "model.safetensors"))
    t_err = load_file(str(err.directory / "teacher" / "model.safetensors"))
    assert any(not torch.equal(t_plain[k], t_err[k]) for k in t_plain)
    info = json.loads((err.directory / "world.json").read_text())["teacher_error"]
    assert info["subset_first_tokens"] == 8 and 0.3 < info["subset_share_of_sft"] < 0.7


def test_the_lever_needs_the_synthetic_world(tmp_path):
    with pytest.raises(ConfigError, match="teacher_error"):
        load_config(None, ["world.oracle=hf:/nowhere", "models.teacher=hf:/t", "models.student=hf:/s",
                           "stage1.teacher_error.fraction=0.2"])
