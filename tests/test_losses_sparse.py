"""Sparse (top-k) teacher targets: k = V equals dense; k < V is the bucketed formula."""

import math

import pytest
import torch

import kdlab.losses as L
from test_losses_reference import STOP_GRADIENT, CASES, case_id, logits, loss_fn, ragged_mask, one_torch_thread  # noqa: F401 (autouse fixture)


def permuted_full_target(z_t, temperature=1.0, seed=0):
    """All V log-probs at the temperature in use, in a random order per position (as a cache may store)."""
    logprobs = torch.log_softmax(z_t.double() / temperature, -1).to(z_t.dtype)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(z_t.shape, generator=g), dim=-1)
    return L.SparseTarget(order, logprobs.gather(-1, order))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sparse_with_k_equal_v_equals_dense(case, dtype, tol):
    name, params = case
    fn = loss_fn(name, params)
    B, T, V = 3, 4, 12
    mask = ragged_mask(B, T, seed=50)
    z_s, z_t = logits(B, T, V, seed=51, dtype=dtype), logits(B, T, V, seed=52, dtype=dtype)
    temperature = 1.5
    target = permuted_full_target(z_t, temperature, seed=53)

    a = z_s.clone().requires_grad_()
    dense = fn(a, z_t, mask, reduction="none", temperature=temperature)
    dense.sum().backward()
    b = z_s.clone().requires_grad_()
    sparse = fn(b, target, mask, reduction="none", temperature=temperature)
    sparse.sum().backward()
    torch.testing.assert_close(sparse, dense, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sparse_topk_is_finite_non_negative_and_below_dense_for_f_divergences(case):
    name, params = case
    fn = loss_fn(name, params)
    z_s, z_t = logits(4, 6, 20, seed=54), logits(4, 6, 20, seed=55)
    for k in (1, 3, 19):
        s = z_s.clone().requires_grad_()
        v = fn(s, L.SparseTarget.from_logits(z_t, k), reduction="none")
        v.sum().backward()
        assert torch.isfinite(v).all() and (v >= 0).all() and torch.isfinite(s.grad).all()
        # merging atoms lowers any f-divergence (data processing); TAID's target and AKL's weights are not one
        if name not in ("taid", "adaptive_kl"):
            dense = fn(z_s, z_t, reduction="none")
            # k = V − 1 is the dense value up to rounding; the teacher's tail mass 1 − Σ p_i of a
            # tiny tail has relative error ~1e-16 / tail (here ~1e-11 of the value).
            assert (v <= dense * (1 + 1e-9)).all()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in STOP_GRADIENT], ids=case_id)
def test_gradcheck_sparse(case):
    name, params = case
    fn = loss_fn(name, params)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    target = L.SparseTarget.from_logits(logits(2, 3, 6, seed=56), k=3)
    s = logits(2, 3, 6, seed=57).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: fn(a, target, mask, temperature=0.8), (s,))


def test_teacher_top_k_holding_all_mass_keeps_gradients_finite():
    # The teacher's tail rounds to exactly 0: log 0 = −inf in the rest bucket.
    z_t = torch.full((1, 2, 8), -1000.0, dtype=torch.float64)
    z_t[..., :2] = 0.0
    target = L.SparseTarget.from_logits(z_t, k=2)
    s = logits(1, 2, 8, seed=58).requires_grad_()
    v = L.forward_kl(s, target)
    v.backward()
    P = torch.softmax(z_t, -1)[..., :2]
    Q = torch.softmax(s.detach(), -1)[..., :2]
    torch.testing.assert_close(v, (P * (P / Q).log()).sum(-1).mean(), rtol=1e-12, atol=0)
    assert torch.isfinite(s.grad).all()


def test_student_tail_all_minus_inf_keeps_gradients_finite():
    # The student gives every token outside the top-k −inf, so its rest bucket is empty.
    z_t = logits(1, 2, 8, seed=59)
    target = L.SparseTarget(torch.tensor([[[0, 1, 2], [3, 4, 5]]]), torch.log_softmax(z_t, -1)[..., :3])
    s0 = logits(1, 2, 8, seed=60)
    keep = torch.zeros(1, 2, 8, dtype=torch.bool)
    keep[0, 0, :3], keep[0, 1, 3:6] = True, True
    s = torch.where(keep, s0, torch.full_like(s0, -math.inf)).requires_grad_()
    # Forward KL is +inf: the teacher has tail mass where the student has none.
    assert math.isinf(L.forward_kl(s.detach(), target).item())
    # Reverse KL is finite (Q(rest) = 0 contributes nothing), and so are its gradients.
    v = L.reverse_kl(s, target)
    v.backward()
    Q = torch.softmax(s.detach(), -1).gather(-1, target.indices)
    P = target.logprobs.exp()
    torch.testing.assert_close(v, (Q * (Q / P).log()).sum(-1).mean(), rtol=1e-12, atol=0)
    assert torch.isfinite(s.grad).all()


def test_sparse_target_validation():
    z = logits(2, 3, 6, seed=61)
    good = L.SparseTarget.from_logits(z, 3)
    cases = [
        (L.SparseTarget(good.indices.float(), good.logprobs), ["indices dtype=torch.float32", "an integer dtype"]),
        (L.SparseTarget(good.indices, good.logprobs[..., :2]), ["shapes", "(B, T, K)"]),
        (L.SparseTarget(good.indices.clamp(max=0), good.logprobs), ["repeat an index"]),
        (L.SparseTarget(good.indices + 6, good.logprobs), ["range", "[0, 5]"]),
    ]
    for target, pieces in cases:
        with pytest.raises(ValueError) as err:
            L.forward_kl(z, target)
        for piece in pieces:
            assert piece in str(err.value), (piece, str(err.value))
    with pytest.raises(ValueError, match="k=7 is out of range"):
        L.SparseTarget.from_logits(z, 7)
    # Caches store indices as int32: accepted, same result.
    narrow = L.SparseTarget(good.indices.int(), good.logprobs)
    assert torch.equal(L.forward_kl(z * 0.5, narrow), L.forward_kl(z * 0.5, good))


def test_masked_positions_may_hold_garbage_indices():
    z_s, z_t = logits(2, 3, 6, seed=62), logits(2, 3, 6, seed=63)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    target = L.SparseTarget.from_logits(z_t, 2)
    bad = L.SparseTarget(torch.where(mask[..., None], target.indices, -7), torch.where(mask[..., None], target.logprobs, math.nan))
    assert torch.equal(L.generalized_jsd(z_s, bad, mask), L.generalized_jsd(z_s, target, mask))


def test_a_confident_teachers_top_k_reverse_kl_is_finite():
    """A teacher with one token 25 logits above the rest, top-8 of V = 50, float32: its tail mass (~6e-10) once
    rounded to exactly 0 and the top-k reverse KL was +inf at every position (found by `kdlab conformance
    --topk 3` on ±1e4 logits). The rest bucket's mass now survives, and the value stays below the full one."""
    z_t = torch.zeros(2, 3, 50)
    z_t[..., 7] = 25.0
    z_s = logits(2, 3, 50, seed=70, dtype=torch.float32)
    target = L.SparseTarget.from_logits(z_t, 8)
    assert target.logprobs.dtype == torch.float32 and (target.logprobs[..., 0] < 0).all()
    v = L.reverse_kl(z_s, target, reduction="none")
    assert torch.isfinite(v).all()
    assert (v <= L.reverse_kl(z_s, z_t, reduction="none") * (1 + 1e-4)).all()
