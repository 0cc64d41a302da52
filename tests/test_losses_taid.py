"""TAIDSchedule: the adaptive update of t (Shing et al. 2025, Algorithm 1) and resume."""

import json
import math

import pytest
import torch

import kdlab.losses as L
from test_losses_reference import one_torch_thread  # noqa: F401 (autouse fixture)


def reference_ts(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, eps=1e-15):
    """Algorithm 1 written out once more, as a loop over the recorded losses."""
    t, m, prev, out = t_start, 0.0, None, []
    for n, J in enumerate(losses, start=1):
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - J) / (prev + eps)
            linear = t_start + (t_end - t_start) * n / total
            t = min(t_end, max(linear, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = J
        out.append(t)
    return out


def loss_curve(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    trend = 3.0 * torch.exp(-torch.arange(n, dtype=torch.float64) / 30)
    return (trend + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()


@pytest.mark.parametrize("alpha", [5e-4, 0.05])
def test_update_follows_algorithm_1(alpha):
    losses = loss_curve(200)
    sched = L.TAIDSchedule(total_steps=200, alpha=alpha)
    got = [sched.update(J) for J in losses]
    assert got == pytest.approx(reference_ts(losses, 200, alpha=alpha), rel=1e-14, abs=0)


def test_t_is_monotone_above_the_linear_floor_and_reaches_t_end():
    sched = L.TAIDSchedule(total_steps=100, alpha=0.05)
    ts = [sched.update(J) for J in loss_curve(100, seed=1)]
    assert ts[0] == 0.4  # the first update has no previous loss: t stays at t_start
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert all(t >= sched.t_linear(n) - 1e-15 for n, t in enumerate(ts[1:], start=2))
    assert ts[-1] == 1.0 and max(ts) <= 1.0


def test_improving_loss_raises_t_faster_than_a_worsening_one():
    # With a large step size the adaptive term dominates the linear floor early on.
    improving = L.TAIDSchedule(total_steps=10_000, alpha=0.05)
    worsening = L.TAIDSchedule(total_steps=10_000, alpha=0.05)
    for n in range(50):
        improving.update(10.0 * 0.9**n)
        worsening.update(10.0 * 1.1**n)
    floor = improving.t_linear(50)
    assert improving.t - floor > worsening.t - floor > 0
    # Expected increments: sigmoid(m) > 1/2 while improving, < 1/2 while worsening.
    assert improving.momentum > 0 > worsening.momentum


def test_non_adaptive_is_the_linear_schedule():
    sched = L.TAIDSchedule(total_steps=20, adaptive=False, t_start=0.2, t_end=0.9)
    ts = [sched.update(J) for J in loss_curve(25)]
    expected = [0.2] + [min(0.9, 0.2 + 0.7 * n / 20) for n in range(2, 26)]
    assert ts == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_state_dict_round_trips_through_json_and_resume_continues_the_same_trajectory():
    losses = loss_curve(60, seed=2)
    straight = L.TAIDSchedule(total_steps=60, alpha=0.01)
    ts_straight = [straight.update(J) for J in losses]

    first = L.TAIDSchedule(total_steps=60, alpha=0.01)
    ts = [first.update(J) for J in losses[:25]]
    saved = json.dumps(first.state_dict())
    resumed = L.TAIDSchedule(total_steps=60, alpha=0.01)
    resumed.load_state_dict(json.loads(saved))
    ts += [resumed.update(J) for J in losses[25:]]
    assert ts == ts_straight  # bit for bit
    fresh = L.TAIDSchedule(total_steps=60)
    fresh_state = json.loads(json.dumps(fresh.state_dict()))
    assert fresh_state == {"t": 0.4, "momentum": 0.0, "prev_loss": None, "step": 0}


def test_update_accepts_a_tensor_and_feeds_taid():
    sched = L.TAIDSchedule(total_steps=10)
    z_s = torch.randn(2, 3, 5, requires_grad=True)
    z_t = torch.randn(2, 3, 5)
    loss = L.taid(z_s, z_t, t=sched.t)
    loss.backward()
    assert sched.update(loss) == 0.4 and sched.prev_loss == loss.item()


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"total_steps=0 is out of range; allowed: an integer >= 1"):
        L.TAIDSchedule(total_steps=0)
    with pytest.raises(ValueError, match=r"t_end=0.3 is out of range; allowed: t_start=0.4 <= t_end <= 1"):
        L.TAIDSchedule(total_steps=5, t_end=0.3)
    with pytest.raises(ValueError, match=r"beta=1.5 is out of range; allowed: 0 <= beta <= 1"):
        L.TAIDSchedule(total_steps=5, beta=1.5)
    sched = L.TAIDSchedule(total_steps=5)
    with pytest.raises(ValueError, match=r"loss=nan is out of range; allowed: a finite number"):
        sched.update(float("nan"))
    with pytest.raises(ValueError, match=r"missing \['momentum', 'prev_loss', 'step'\]"):
        sched.load_state_dict({"t": 0.5})
