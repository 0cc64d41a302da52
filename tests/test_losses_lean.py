"""The memory-lean (chunked) path equals the dense path for every loss, and stays lean."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kdlab.losses as L
from test_losses_reference import STOP_GRADIENT, CASES, case_id, logits, loss_fn, ragged_mask, one_torch_thread  # noqa: F401 (autouse fixture)

B, T, H, V = 3, 7, 6, 11


def inputs(dtype=torch.float32, seed=70, bias=True):
    hidden = logits(B, T, H, scale=1.0, seed=seed, dtype=dtype)
    weight = logits(V, H, scale=1.0, seed=seed + 1, dtype=dtype)
    b = logits(V, scale=0.5, seed=seed + 2, dtype=dtype) if bias else None
    teacher = logits(B, T, V, seed=seed + 3, dtype=dtype)
    return hidden, weight, b, teacher


def run(path, fn, hidden, weight, bias, teacher, mask, reduction, temperature, chunk_size=None):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    if path == "dense":
        out = fn(F.linear(h, w, b), teacher, mask, reduction=reduction, temperature=temperature)
    else:
        out = L.lean_loss(fn, h, w, teacher, mask, chunk_size=chunk_size, reduction=reduction,
                          temperature=temperature, lm_head_bias_V=b)
    # A non-uniform upstream gradient for "none", so per-token grads are checked individually.
    upstream = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_teacher", "sparse_teacher"])
def test_lean_equals_dense_values_and_grads(case, sparse):
    name, params = case
    fn = loss_fn(name, params)
    hidden, weight, bias, teacher = inputs()
    if sparse:
        teacher = L.SparseTarget.from_logits(teacher, k=4, temperature=1.3)
    mask = ragged_mask(B, T, seed=74)
    for reduction, chunk_size in (("mean", 4), ("none", 1), ("sum", 5), ("mean", 1000)):
        dense = run("dense", fn, hidden, weight, bias, teacher, mask, reduction, 1.3)
        lean = run("lean", fn, hidden, weight, bias, teacher, mask, reduction, 1.3, chunk_size)
        for a, b in zip(lean, dense):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lean_accepts_a_name_and_params_without_mask_or_bias():
    hidden, weight, _, teacher = inputs(bias=False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    dense = L.generalized_jsd(h @ w.T, teacher, beta=0.3)
    dense.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lean = L.lean_loss("generalized_jsd", h2, w2, teacher, chunk_size=3, beta=0.3)
    lean.backward()
    for a, b in zip((lean, h2.grad, w2.grad), (dense, h.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# TAID's stop-gradient makes its student gradient differ from d(value); lean == dense covers it.
@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in STOP_GRADIENT], ids=case_id)
def test_gradcheck_lean(case):
    name, params = case
    fn = loss_fn(name, params)
    hidden, weight, bias, teacher = (x[:1, :3] if x.dim() == 3 else x for x in inputs(torch.float64))
    mask = torch.tensor([[True, False, True]])
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    for reduction in ("mean", "none"):  # gradients computed in forward / recomputed in backward
        assert torch.autograd.gradcheck(
            lambda h, w, b: L.lean_loss(fn, h, w, teacher, mask, chunk_size=1, lm_head_bias_V=b, reduction=reduction),
            (h, w, b),
        )


def test_lean_micro_batch_accumulation_equals_one_batch():
    hidden, weight, bias, teacher = inputs(torch.float64)
    mask = ragged_mask(B, T, seed=76)
    w_big = weight.clone().requires_grad_()
    L.lean_loss("skew_reverse_kl", hidden, w_big, teacher, mask, chunk_size=4).backward()
    w_acc = weight.clone().requires_grad_()
    global_count = L.token_count(mask, (B, T))
    for i in range(B):
        part = L.lean_loss("skew_reverse_kl", hidden[i : i + 1], w_acc, teacher[i : i + 1], mask[i : i + 1],
                           chunk_size=4, reduction="sum")
        (part / global_count).backward()
    torch.testing.assert_close(w_acc.grad, w_big.grad, rtol=1e-12, atol=1e-15)


def test_lean_without_grad_gives_the_same_value():
    hidden, weight, bias, teacher = inputs()
    mask = ragged_mask(B, T, seed=75)
    with_grad = L.lean_loss("tvd", hidden.requires_grad_(), weight, teacher, mask, chunk_size=5, lm_head_bias_V=bias)
    with torch.no_grad():
        without = L.lean_loss("tvd", hidden, weight, teacher, mask, chunk_size=5, lm_head_bias_V=bias)
    assert without.grad_fn is None and torch.equal(with_grad.detach(), without)


def test_lean_all_masked_gives_zero_with_zero_gradients():
    hidden, weight, bias, teacher = inputs()
    mask = torch.zeros(B, T, dtype=torch.bool)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    out = L.lean_loss("forward_kl", h, w, teacher, mask, lm_head_bias_V=b)
    out.backward()
    assert out.item() == 0.0
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


def test_lean_bf16_upcasts_like_dense():
    hidden, weight, bias, teacher = inputs(torch.bfloat16)
    fn = L.get("skew_kl", alpha=0.1)
    dense = run("dense", fn, hidden, weight, bias, teacher, None, "mean", 1.0)
    lean = run("lean", fn, hidden, weight, bias, teacher, None, "mean", 1.0, 4)
    assert lean[0].dtype == torch.float32 and lean[1].dtype == torch.bfloat16
    torch.testing.assert_close(lean[0], dense[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(lean[1:], dense[1:]):  # bf16 gradients: one bf16 rounding apart at most
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op produces (views of the
    op's inputs, such as a reshape of the teacher logits, allocate nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {a.untyped_storage().data_ptr() for a in flat_in if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd"])
def test_lean_never_materialises_all_logits_forward_or_backward(name):
    n_tokens, vocab, hidden_size, chunk = 64, 300, 8, 8
    hidden = torch.randn(4, 16, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    teacher = torch.randn(4, 16, vocab)
    with LargestTensor() as lean:
        L.lean_loss(name, hidden, weight, teacher, chunk_size=chunk).backward()
    with LargestTensor() as dense:
        L.get(name)(hidden @ weight.T, teacher).backward()
    assert dense.largest >= n_tokens * vocab
    # Nothing larger than one chunk of logits (the V x H weight gradient is smaller here).
    assert lean.largest <= chunk * vocab
