"""The generalised-JSD row kernel (an autograd.Function with the analytic gradient) against the taped
implementation it replaced: same values and same gradients, for the student and the teacher, with
−inf atoms on either side, masks, temperature and sparse targets."""

import math

import pytest
import torch

import kdlab.losses as L
from kdlab.losses.divergences import generalized_jsd_rows, token_divergence
from test_losses_reference import logits, ragged_mask, one_torch_thread  # noqa: F401 (autouse fixture)

BETAS = [0.1, 0.5, 0.9]
NEG_INF = -math.inf


# ---------------------------------------------------------------- the previous kernel, taped by autograd


def taped_kl_rows(log_a, log_b):
    """KL(a ‖ b) per row; atoms with a = 0 zeroed before the product (value and gradient)."""
    diff = torch.where(log_a == NEG_INF, torch.zeros_like(log_a), log_a - log_b)
    return (log_a.exp() * diff).sum(dim=-1)


def taped_log_mixture(log_a, log_b, w):
    """log(w·a + (1 − w)·b); atoms where both are −inf stay −inf with a zero gradient."""
    x_a, x_b = log_a + math.log(w), log_b + math.log1p(-w)
    both = (x_a == NEG_INF) & (x_b == NEG_INF)
    zero = torch.zeros_like(x_a)
    log_m = torch.logaddexp(torch.where(both, zero, x_a), torch.where(both, zero, x_b))
    return torch.where(both, torch.full_like(log_m, NEG_INF), log_m)


def taped_jsd_rows(log_q, log_p, beta):
    """JSD_β = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = β·P + (1 − β)·Q, 0 < β < 1."""
    log_m = taped_log_mixture(log_p, log_q, beta)
    return beta * taped_kl_rows(log_p, log_m) + (1 - beta) * taped_kl_rows(log_q, log_m)


def taped_jsd(z_s, teacher, mask=None, *, beta, reduction="mean", temperature=1.0):
    return token_divergence(lambda q, p: taped_jsd_rows(q, p, beta), z_s, teacher, mask, reduction, temperature)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=1e-5, atol=1e-7)}


def with_dead_atoms(z_s, z_t, where, seed):
    """Set logits to −inf on the teacher only, the student only, both at the same atoms, or a mix."""
    g = torch.Generator().manual_seed(seed)
    dead_s = torch.rand(z_s.shape, generator=g) < 0.3
    dead_t = dead_s.clone() if where == "both" else torch.rand(z_t.shape, generator=g) < 0.3
    dead_s[..., 0] = dead_t[..., 0] = False  # every row keeps some mass on both sides
    z_s, z_t = z_s.clone(), z_t.clone()
    if where in ("student", "both", "mixed"):
        z_s[dead_s] = NEG_INF
    if where in ("teacher", "both", "mixed"):
        z_t[dead_t] = NEG_INF
    return z_s, z_t


def values_and_grads(fn, z_s, z_t, upstream=None):
    s, t = z_s.clone().requires_grad_(), z_t.clone().requires_grad_()
    out = fn(s, t)
    (out if upstream is None else out * upstream).sum().backward()
    return out.detach(), s.grad, t.grad


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dead", ["none", "teacher", "student", "both", "mixed"])
def test_kernel_equals_taped_kernel_values_and_grads(beta, dtype, dead):
    z_s, z_t = logits(6, 13, seed=80, dtype=dtype), logits(6, 13, seed=81, dtype=dtype)
    z_s, z_t = with_dead_atoms(z_s, z_t, dead, seed=82)
    upstream = torch.linspace(-1.0, 2.0, 6, dtype=dtype)  # per-row weights, some negative

    def rows(kernel):
        return lambda s, t: kernel(torch.log_softmax(s, -1), torch.log_softmax(t, -1), beta)

    new = values_and_grads(rows(generalized_jsd_rows), z_s, z_t, upstream)
    old = values_and_grads(rows(taped_jsd_rows), z_s, z_t, upstream)
    for a, b in zip(new, old):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[dtype])
    dead_s, dead_t = z_s == NEG_INF, z_t == NEG_INF
    assert (new[1][dead_s] == 0).all() and (new[2][dead_t] == 0).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_equals_taped_loss_with_mask_and_temperature(beta, dtype, reduction):
    B, T, V = 3, 5, 9
    mask = ragged_mask(B, T, seed=83)
    z_s, z_t = logits(B, T, V, seed=84, dtype=dtype), logits(B, T, V, seed=85, dtype=dtype)
    z_s, z_t = with_dead_atoms(z_s, z_t, "mixed", seed=86)
    upstream = None if reduction != "none" else torch.linspace(0.5, 2.0, B * T, dtype=dtype).reshape(B, T)
    kw = dict(beta=beta, reduction=reduction, temperature=1.7)
    new = values_and_grads(lambda s, t: L.generalized_jsd(s, t, mask, **kw), z_s, z_t, upstream)
    old = values_and_grads(lambda s, t: taped_jsd(s, t, mask, **kw), z_s, z_t, upstream)
    for a, b in zip(new, old):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [4, 9], ids=["k4_bucket", "k=V"])
@pytest.mark.parametrize("dead", ["none", "teacher", "student"])
def test_sparse_target_equals_taped_loss(beta, k, dead):
    # dead="teacher": the teacher's tail beyond its top atoms is −inf, so for k = 4 the rest bucket
    # can have P = 0; dead="student": student atoms of probability 0, inside the top-k or not.
    B, T, V = 2, 4, 9
    mask = ragged_mask(B, T, seed=87)
    z_s, z_t = with_dead_atoms(logits(B, T, V, seed=88), logits(B, T, V, seed=89), dead, seed=90)
    target = L.SparseTarget.from_logits(z_t, k=k)
    s_new, s_old = z_s.clone().requires_grad_(), z_s.clone().requires_grad_()
    new = L.generalized_jsd(s_new, target, mask, beta=beta, reduction="none")
    old = taped_jsd(s_old, target, mask, beta=beta, reduction="none")
    new.sum().backward()
    old.sum().backward()
    torch.testing.assert_close(new, old, **TOL[torch.float64])
    torch.testing.assert_close(s_new.grad, s_old.grad, **TOL[torch.float64])
    assert torch.isfinite(s_new.grad).all()


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_kernel_and_loss(beta):
    # The kernel on free log-probs (−inf atoms included: their gradient is 0 both ways) and the
    # public loss with a mask and temperature, w.r.t. student and teacher logits.
    log_q = torch.log_softmax(logits(3, 6, seed=91), -1)
    log_p = torch.log_softmax(logits(3, 6, seed=92), -1)
    log_q[0, 1] = log_p[0, 1] = log_q[1, 2] = log_p[2, 3] = NEG_INF
    assert torch.autograd.gradcheck(
        lambda q, p: generalized_jsd_rows(q, p, beta), (log_q.requires_grad_(), log_p.requires_grad_())
    )
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s, t = logits(2, 3, 5, seed=93).requires_grad_(), logits(2, 3, 5, seed=94).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: L.generalized_jsd(a, b, mask, beta=beta, temperature=1.3), (s, t))


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_backward_keeps_one_tensor_per_input_that_needs_a_gradient(teacher_grad):
    log_q = torch.log_softmax(logits(4, 7, seed=95), -1).requires_grad_()
    log_p = torch.log_softmax(logits(4, 7, seed=96), -1).requires_grad_(teacher_grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        out = generalized_jsd_rows(log_q, log_p, 0.3)
    assert saved == [(4, 7)] * (1 + teacher_grad)
    out.sum().backward()
    assert log_q.grad is not None and (log_p.grad is not None) == teacher_grad


def test_double_backward_is_refused():
    log_q = torch.log_softmax(logits(2, 5, seed=97), -1).requires_grad_()
    log_p = torch.log_softmax(logits(2, 5, seed=98), -1)
    upstream = torch.ones(2, dtype=torch.float64, requires_grad=True)  # so the gradient has a graph at all
    (grad,) = torch.autograd.grad(generalized_jsd_rows(log_q, log_p, 0.5), log_q, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
