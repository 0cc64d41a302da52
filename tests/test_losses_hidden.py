"""A HiddenTarget (the teacher's final hidden states and head) equals the dense teacher logits it stands for,
for every loss, on the dense and the lean path, in values and gradients (issue 18). The ground truth is the
dense loss on ``F.linear(hidden, weight, bias)``, computed outside the code under test."""

import pytest
import torch
import torch.nn.functional as F

import kdlab.losses as L
from test_losses_lean import run
from test_losses_reference import CASES, case_id, logits, loss_fn, ragged_mask, one_torch_thread  # noqa: F401 (autouse fixture)

B, T, H, HT, V = 3, 7, 16, 24, 4000  # the teacher is wider than the student (HT != H)


def teacher_parts(seed=80, bias=True):
    hidden = logits(B, T, HT, scale=1.0, seed=seed, dtype=torch.float32)
    weight = logits(V, HT, scale=0.3, seed=seed + 1, dtype=torch.float32)
    b = logits(V, scale=0.5, seed=seed + 2, dtype=torch.float32) if bias else None
    return hidden, weight, b


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_hidden_target_equals_the_dense_teacher_logits_on_both_paths(case, bias):
    name, params = case
    fn = loss_fn(name, params)
    s_hidden = logits(B, T, H, scale=1.0, seed=90, dtype=torch.float32)
    s_weight = logits(V, H, scale=0.3, seed=91, dtype=torch.float32)
    t_hidden, t_weight, t_bias = teacher_parts(bias=bias)
    dense_teacher = F.linear(t_hidden, t_weight, t_bias)
    target = L.HiddenTarget(t_hidden, t_weight, t_bias)
    mask = ragged_mask(B, T, seed=84)
    for reduction, chunk_size in (("mean", 4), ("none", 3), ("sum", 1000)):
        truth = run("dense", fn, s_hidden, s_weight, None, dense_teacher, mask, reduction, 1.3)
        for path in ("dense", "lean"):
            got = run(path, fn, s_hidden, s_weight, None, target, mask, reduction, 1.3, chunk_size)
            for a, b in zip(got, truth):
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hidden_target_refuses_a_head_of_another_vocabulary():
    t_hidden, t_weight, _ = teacher_parts(bias=False)
    student = logits(B, T, V + 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="V=4000 rows but the student has V=4001"):
        L.forward_kl(student, L.HiddenTarget(t_hidden, t_weight))
    with pytest.raises(ValueError, match="hidden shape"):
        L.forward_kl(logits(B, T + 1, V, dtype=torch.float32), L.HiddenTarget(t_hidden, t_weight))
