"""kdlab.losses: properties, masking, reductions, accumulation, gradcheck, dtypes and errors."""

import json
import math

import pytest
import torch

import kdlab.losses as L
from test_losses_reference import STOP_GRADIENT, softmax64, CASES, case_id, logits, loss_fn, ragged_mask, reference_dense, one_torch_thread  # noqa: F401 (autouse fixture)

ALL_NAMES = sorted(L.LOSSES)


def test_cases_cover_every_loss():
    assert {name for name, _ in CASES} == set(L.LOSSES) == {
        "forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_kl", "skew_reverse_kl", "taid",
        "ab_divergence", "adaptive_kl",
    }


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_on_identical_inputs_and_shift_invariance(case):
    name, params = case
    z = logits(2, 3, 17, seed=10)
    fn = loss_fn(name, params)
    # The teacher is the same distribution with per-position shifted logits.
    shifted = z + logits(2, 3, 1, seed=11) * 10
    per_token = fn(z, shifted, reduction="none")
    torch.testing.assert_close(per_token, torch.zeros_like(per_token), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_negative(case):
    name, params = case
    for seed in range(5):
        z_s, z_t = logits(4, 6, 9, scale=5.0, seed=seed), logits(4, 6, 9, scale=5.0, seed=100 + seed)
        assert (loss_fn(name, params)(z_s, z_t, reduction="none") > 0).all()


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    z_s, z_t = logits(2, 3, 8, seed=12), logits(2, 3, 8, seed=13)
    assert torch.equal(L.generalized_jsd(z_s, z_t, beta=0.0, reduction="none"), L.forward_kl(z_s, z_t, reduction="none"))
    assert torch.equal(L.generalized_jsd(z_s, z_t, beta=1.0, reduction="none"), L.reverse_kl(z_s, z_t, reduction="none"))


def test_jsd_endpoints_are_the_limits_of_scaled_jsd():
    # GKD's endpoint convention is the limit of JSD_β / β (β → 0) and JSD_β / (1 − β) (β → 1).
    z_s, z_t = logits(2, 3, 8, seed=14), logits(2, 3, 8, seed=15)
    eps = 1e-8  # the gap is O(eps · Σ P²/Q): small but not tiny for peaked logits
    near0 = L.generalized_jsd(z_s, z_t, beta=eps, reduction="none") / eps
    near1 = L.generalized_jsd(z_s, z_t, beta=1 - eps, reduction="none") / eps
    torch.testing.assert_close(near0, L.forward_kl(z_s, z_t, reduction="none"), rtol=1e-5, atol=0)
    torch.testing.assert_close(near1, L.reverse_kl(z_s, z_t, reduction="none"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_swapping_teacher_and_student_mirrors_beta(beta):
    z_s, z_t = logits(3, 2, 10, seed=16), logits(3, 2, 10, seed=17)
    a = L.generalized_jsd(z_s, z_t, beta=beta, reduction="none")
    b = L.generalized_jsd(z_t, z_s, beta=1 - beta, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # β = 0.5: symmetric


def test_tvd_in_unit_interval_symmetric_and_reaches_one_on_disjoint_supports():
    z_s, z_t = logits(4, 5, 7, scale=8.0, seed=18), logits(4, 5, 7, scale=8.0, seed=19)
    d = L.tvd(z_s, z_t, reduction="none")
    assert (d >= 0).all() and (d <= 1).all()
    torch.testing.assert_close(d, L.tvd(z_t, z_s, reduction="none"), rtol=1e-12, atol=0)
    # Nearly disjoint supports: the student puts its mass on token 0, the teacher on token 1.
    s = torch.full((1, 1, 4), -200.0, dtype=torch.float64)
    t = s.clone()
    s[..., 0], t[..., 1] = 0.0, 0.0
    torch.testing.assert_close(L.tvd(s, t), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_skew_at_alpha_zero_is_exactly_kl_and_at_one_is_zero():
    z_s, z_t = logits(2, 3, 8, seed=20), logits(2, 3, 8, seed=21)
    assert torch.equal(L.skew_kl(z_s, z_t, alpha=0.0, reduction="none"), L.forward_kl(z_s, z_t, reduction="none"))
    assert torch.equal(L.skew_reverse_kl(z_s, z_t, alpha=0.0, reduction="none"), L.reverse_kl(z_s, z_t, reduction="none"))
    for fn in (L.skew_kl, L.skew_reverse_kl):
        assert torch.equal(fn(z_s, z_t, alpha=1.0, reduction="none"), torch.zeros(2, 3, dtype=torch.float64))


def test_skew_kl_is_bounded_by_log_one_over_alpha():
    # KL(P ‖ αP + (1−α)Q) ≤ log(1/α): the point of skewing (DistiLLM).
    s = torch.full((1, 1, 5), -60.0, dtype=torch.float64)
    t = s.clone()
    s[..., 0], t[..., 1] = 0.0, 0.0
    alpha = 0.1
    v = L.skew_kl(s, t, alpha=alpha)
    assert v.item() <= math.log(1 / alpha) + 1e-12
    torch.testing.assert_close(v, torch.tensor(math.log(1 / alpha), dtype=torch.float64), rtol=1e-9, atol=0)


def test_taid_endpoints():
    z_s, z_t = logits(2, 3, 8, seed=22), logits(2, 3, 8, seed=23)
    assert torch.equal(L.taid(z_s, z_t, t=1.0, reduction="none"), L.forward_kl(z_s, z_t, reduction="none"))
    assert torch.equal(L.taid(z_s, z_t, t=0.0, reduction="none"), torch.zeros(2, 3, dtype=torch.float64))


def test_taid_gradient_stops_at_the_student_side_of_the_target():
    # TAID's gradient w.r.t. the student at z0 is that of KL(P_t ‖ Q(z)) with P_t frozen at z0.
    z0, z_t = logits(2, 3, 8, seed=24), logits(2, 3, 8, seed=25)
    t = 0.3
    z = z0.clone().requires_grad_()
    (g_taid,) = torch.autograd.grad(L.taid(z, z_t, t=t), z)
    z2 = z0.clone().requires_grad_()
    frozen_target = (1 - t) * z0 + t * z_t
    (g_ref,) = torch.autograd.grad(L.forward_kl(z2, frozen_target), z2)
    torch.testing.assert_close(g_taid, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_minus_inf_vocabulary_entries_are_probability_zero(case):
    # Entries masked to −inf on both sides (e.g. a padded vocabulary) must behave as if absent,
    # in the value and in finite gradients.
    name, params = case
    z_s, z_t = logits(2, 3, 9, seed=26), logits(2, 3, 9, seed=27)
    dead = torch.tensor([1, 4, 8])
    live = torch.tensor([0, 2, 3, 5, 6, 7])
    s = z_s.clone()
    s[..., dead] = -math.inf
    t = z_t.clone()
    t[..., dead] = -math.inf
    s.requires_grad_()
    fn = loss_fn(name, params)
    v = fn(s, t, reduction="none")
    torch.testing.assert_close(v, fn(z_s[..., live], z_t[..., live], reduction="none"), rtol=1e-12, atol=1e-14)
    v.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[..., dead] == 0).all()


def test_teacher_minus_inf_entries_keep_forward_kl_finite():
    z_s, z_t = logits(2, 3, 9, seed=28), logits(2, 3, 9, seed=29)
    t = z_t.clone()
    t[..., :3] = -math.inf
    s = z_s.clone().requires_grad_()
    v = L.forward_kl(s, t, reduction="none")
    P = torch.softmax(t, -1)
    expected = (P[..., 3:] * (P[..., 3:].log() - torch.log_softmax(z_s, -1)[..., 3:])).sum(-1)
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-14)
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- masking and reductions


def _garbage_at(mask, x, values=(math.inf, -math.inf, math.nan, 1e30)):
    g = x.detach().clone()
    bad = ~mask
    fill = torch.tensor(values, dtype=x.dtype).repeat(bad.sum().item() * x.shape[-1])[: bad.sum().item() * x.shape[-1]]
    g[bad] = fill.reshape(-1, x.shape[-1])
    return g


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_positions_change_nothing(case, reduction):
    name, params = case
    B, T, V = 3, 5, 7
    mask = ragged_mask(B, T, seed=30)
    z_s, z_t = logits(B, T, V, seed=31), logits(B, T, V, seed=32)
    fn = loss_fn(name, params)

    clean = z_s.clone().requires_grad_()
    out_clean = fn(clean, z_t, mask, reduction=reduction)
    out_clean.sum().backward()

    dirty = _garbage_at(mask, z_s).requires_grad_()
    out_dirty = fn(dirty, _garbage_at(mask, z_t), mask, reduction=reduction)
    out_dirty.sum().backward()

    assert torch.equal(out_clean, out_dirty)
    assert torch.equal(clean.grad, dirty.grad)
    assert (dirty.grad[~mask] == 0).all()
    if reduction == "none":
        assert (out_dirty[~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_all_masked_batch_gives_zero_with_finite_zero_gradients(case):
    name, params = case
    fn = loss_fn(name, params)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        s = torch.full((2, 3, 5), math.nan, dtype=torch.float32).requires_grad_()
        out = fn(s, torch.full((2, 3, 5), math.inf), mask, reduction=reduction)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_reduction_semantics():
    B, T, V = 3, 4, 6
    mask = ragged_mask(B, T, seed=33)
    z_s, z_t = logits(B, T, V, seed=34), logits(B, T, V, seed=35)
    per_token = L.forward_kl(z_s, z_t, mask, reduction="none")
    assert per_token.shape == (B, T)
    ref = reference_dense("forward_kl", z_s, z_t, {})
    torch.testing.assert_close(per_token, ref * mask, rtol=1e-10, atol=0)
    assert torch.equal(L.forward_kl(z_s, z_t, mask, reduction="sum"), per_token.sum())
    # "mean" is over the counted tokens of the whole batch, not a mean of per-sequence means.
    torch.testing.assert_close(L.forward_kl(z_s, z_t, mask), per_token.sum() / mask.sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(L.forward_kl(z_s, z_t), ref.mean(), rtol=1e-12, atol=0)
    assert L.token_count(mask, (B, T)) == int(mask.sum()) and L.token_count(None, (B, T)) == B * T


def test_reduce_tokens_uses_where_not_multiplication():
    per_token = torch.tensor([[1.0, math.inf], [math.nan, 2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert L.reduce_tokens(per_token, mask, "sum").item() == 3.0
    assert L.reduce_tokens(per_token, mask, "mean").item() == 1.5
    assert torch.equal(L.reduce_tokens(per_token, mask, "none"), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_micro_batch_accumulation_equals_one_batch(case):
    # sum over micro-batches / global token count == the big batch's mean, values and gradients:
    # what gradient accumulation and data-parallel ranks rely on.
    name, params = case
    fn = loss_fn(name, params)
    B, T, V = 6, 5, 8
    mask = ragged_mask(B, T, seed=36)
    z_s, z_t = logits(B, T, V, seed=37), logits(B, T, V, seed=38)

    full = z_s.clone().requires_grad_()
    big = fn(full, z_t, mask)
    big.backward()

    acc = z_s.clone().requires_grad_()
    global_count = sum(L.token_count(mask[i : i + 2], (2, T)) for i in range(0, B, 2))
    total = 0.0
    for i in range(0, B, 2):
        part = fn(acc[i : i + 2], z_t[i : i + 2], mask[i : i + 2], reduction="sum") / global_count
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, big.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.grad, full.grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in STOP_GRADIENT], ids=case_id)
def test_gradcheck_student_and_teacher(case):
    name, params = case
    fn = loss_fn(name, params)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s = logits(2, 3, 5, seed=39).requires_grad_()
    t = logits(2, 3, 5, seed=40).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, temperature=1.7), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, reduction="none"), (s, t))


def test_gradcheck_taid():
    # w.r.t. the teacher the TAID value is differentiable as written; w.r.t. the student the
    # gradient is the stop-gradient one (checked in test_taid_gradient_stops_...), so gradcheck
    # the equivalent frozen-target loss there.
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s0 = logits(2, 3, 5, seed=41)
    t = logits(2, 3, 5, seed=42).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: L.taid(s0, b, mask, t=0.6, temperature=1.3), (t,))
    s = s0.clone().requires_grad_()
    frozen = (0.4 * s0 + 0.6 * t.detach()) / 1.3
    assert torch.autograd.gradcheck(lambda a: L.forward_kl(a / 1.3, frozen, mask), (s,))
    g_taid = torch.autograd.grad(L.taid(s, t.detach(), mask, t=0.6, temperature=1.3), s)[0]
    g_frozen = torch.autograd.grad(L.forward_kl(s / 1.3, frozen, mask), s)[0]
    torch.testing.assert_close(g_taid, g_frozen, rtol=1e-10, atol=1e-14)


def test_adaptive_kl_gradient_is_the_frozen_weight_mixture():
    """AKL's weights carry no gradient (Wu et al. 2025's code detaches them): its gradient is that of
    g·FKL + (1 − g)·RKL with g computed from the float64 reference's head and tail, held constant."""
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s = logits(2, 3, 6, seed=47).requires_grad_()
    t = logits(2, 3, 6, seed=48)
    P, Q = softmax64(t), softmax64(s.detach())
    fkl, rkl = (P * torch.log(P / Q)).sum(-1), (Q * torch.log(Q / P)).sum(-1)
    akl = reference_dense("adaptive_kl", s.detach(), t, {"mu": 0.5})
    g = (akl - rkl) / (fkl - rkl)  # the reference's head weight, recovered position by position
    frozen = lambda a: (g * L.forward_kl(a, t, reduction="none") + (1 - g) * L.reverse_kl(a, t, reduction="none"))  # noqa: E731
    want = torch.autograd.grad((frozen(s) * mask).sum() / mask.sum(), s)[0]
    got = torch.autograd.grad(L.adaptive_kl(s, t, mask, mu=0.5), s)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_ab_divergence_endpoints_and_hellinger():
    """α = 1, β = 0 is forward KL; α = 0, β = 1 reverse KL (exactly, through the limits); α = β = ½ is
    4 (1 − Σ √(PQ)); the general formula approaches its β → 0 limit continuously."""
    z_s, z_t = logits(2, 3, 8, seed=49), logits(2, 3, 8, seed=50)
    ab = lambda a, b: L.ab_divergence(z_s, z_t, reduction="none", alpha=a, beta=b)  # noqa: E731
    torch.testing.assert_close(ab(1.0, 0.0), L.forward_kl(z_s, z_t, reduction="none"), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ab(0.0, 1.0), L.reverse_kl(z_s, z_t, reduction="none"), rtol=1e-12, atol=1e-14)
    P, Q = softmax64(z_t), softmax64(z_s)
    torch.testing.assert_close(ab(0.5, 0.5), 4 * (1 - (P * Q).sqrt().sum(-1)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ab(0.6, 1e-6), ab(0.6, 0.0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ab(1e-6, 0.4), ab(0.0, 0.4), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_inputs_are_computed_in_float32_and_float64_stays(case):
    name, params = case
    fn = loss_fn(name, params)
    z_s, z_t = logits(2, 3, 50, seed=43, dtype=torch.bfloat16), logits(2, 3, 50, seed=44, dtype=torch.bfloat16)
    out = fn(z_s, z_t, reduction="none")
    assert out.dtype == torch.float32
    # bf16 -> float32 is exact, so the float32 result on the upcast inputs is the same computation.
    torch.testing.assert_close(out, fn(z_s.float(), z_t.float(), reduction="none"), rtol=1e-6, atol=1e-7)
    ref = reference_dense(name, z_s.double(), z_t.double(), params)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6)
    assert fn(z_s.double(), z_t.double()).dtype == torch.float64


# ---------------------------------------------------------------- get() and errors


def test_get_returns_the_named_loss_with_bound_params():
    z_s, z_t = logits(2, 3, 6, seed=45), logits(2, 3, 6, seed=46)
    assert L.get("forward_kl") is L.forward_kl
    assert torch.equal(L.get("generalized_jsd", beta=0.3)(z_s, z_t), L.generalized_jsd(z_s, z_t, beta=0.3))
    assert torch.equal(L.get("taid")(z_s, z_t, t=0.2), L.taid(z_s, z_t, t=0.2))
    # The bound parameters are plain floats, so a config can be saved as JSON.
    assert json.loads(json.dumps(L.get("skew_kl", alpha=0.25).keywords)) == {"alpha": 0.25}


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("kl", {}, ["name='kl'", "forward_kl", "taid", "generalized_jsd"]),
        ("generalized_jsd", {"beta": 1.5}, ["beta=1.5", "0 <= beta <= 1"]),
        ("generalized_jsd", {"beta": -0.1}, ["beta=-0.1", "0 <= beta <= 1"]),
        ("skew_kl", {"alpha": float("nan")}, ["alpha=nan", "0 <= alpha <= 1"]),
        ("skew_reverse_kl", {"alpha": "big"}, ["alpha='big'", "0 <= alpha <= 1"]),
        ("taid", {"t": 2}, ["t=2", "0 <= t <= 1"]),
        ("tvd", {"beta": 0.5}, ["beta=0.5", "'tvd'", "allowed parameters: []"]),
        ("forward_kl", {"alpha": 0.1}, ["alpha=0.1", "allowed parameters: []"]),
        ("skew_kl", {"beta": 0.1}, ["beta=0.1", "allowed parameters: ['alpha']"]),
    ],
)
def test_get_errors_name_the_parameter_value_and_allowed_range(name, params, expected):
    with pytest.raises(ValueError) as err:
        L.get(name, **params)
    for piece in expected:
        assert piece in str(err.value)


def test_call_time_errors():
    z = logits(2, 3, 6, seed=47)
    cases = [
        (lambda: L.forward_kl(z, z, reduction="avg"), ["reduction='avg'", "'mean'", "'sum'", "'none'"]),
        (lambda: L.forward_kl(z, z, temperature=0.0), ["temperature=0.0", "0 < temperature"]),
        (lambda: L.generalized_jsd(z, z, beta=3), ["beta=3", "0 <= beta <= 1"]),
        (lambda: L.taid(z, z, t=-1), ["t=-1", "0 <= t <= 1"]),
        (lambda: L.forward_kl(z, z, torch.ones(2, 3)), ["mask dtype", "torch.bool"]),
        (lambda: L.forward_kl(z, z, torch.ones(3, 2, dtype=torch.bool)), ["mask shape=(3, 2)", "(2, 3)"]),
        (lambda: L.forward_kl(z, z[..., :5]), ["teacher logits shape=(2, 3, 5)", "(2, 3, 6)"]),
        (lambda: L.forward_kl(z, z.numpy()), ["teacher of type ndarray"]),
    ]
    for call, pieces in cases:
        with pytest.raises(ValueError) as err:
            call()
        for piece in pieces:
            assert piece in str(err.value), (piece, str(err.value))
