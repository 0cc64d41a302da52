"""MiniLLM's sequence-level reverse-KL estimator (kdlab.losses.minillm) against exact enumeration: with V = 3 and
responses of 2 tokens every response can be listed, so the exact gradient of KL_seq(q ‖ p) is known; the
estimator averaged over all responses, weighted by the probability of drawing each, must equal it."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdlab.losses.minillm import minillm_surrogate, sample_teacher_mixed, sequence_reverse_kl_estimate

V, T = 3, 2
PREFIXES = [()] + [(a,) for a in range(V)]


def tables(seed):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)


def logits_of(theta, y):
    """Logits B=1 × T × V of the per-prefix table `theta` along response y."""
    return torch.stack([theta[PREFIXES.index(tuple(y[:t]))] for t in range(T)]).unsqueeze(0)


def seq_logprob(theta, y):
    return sum(torch.log_softmax(theta[PREFIXES.index(tuple(y[:t]))], -1)[y[t]] for t in range(T))


def exact_grad(theta_q, theta_p):
    theta = theta_q.clone().requires_grad_()
    kl = sum(seq_logprob(theta, y).exp() * (seq_logprob(theta, y) - seq_logprob(theta_p, y))
             for y in itertools.product(range(V), repeat=T))
    return torch.autograd.grad(kl, theta)[0], float(kl)


def mixed_logprob(theta_q, theta_p, y, alpha):
    """Per-token log p̃(y_t) of the teacher-mixed sampling distribution."""
    out = []
    for t in range(T):
        row = PREFIXES.index(tuple(y[:t]))
        mix = alpha * torch.softmax(theta_p[row], -1) + (1 - alpha) * torch.softmax(theta_q[row], -1)
        out.append(mix[y[t]].log())
    return torch.stack(out).unsqueeze(0)


def expected_estimate(theta_q, theta_p, alpha=0.0, **kw):
    """Σ_y s(y) ĝ(y): the estimator's expectation when responses are drawn from s (q, or p̃ for alpha > 0)."""
    total = torch.zeros_like(theta_q)
    for y in itertools.product(range(V), repeat=T):
        theta = theta_q.clone().requires_grad_()
        ids = torch.tensor([y])
        behaviour = mixed_logprob(theta_q, theta_p, y, alpha) if alpha > 0 else None
        s = float(behaviour.sum().exp()) if alpha > 0 else float(seq_logprob(theta_q, y).exp())
        loss = minillm_surrogate(logits_of(theta, y), logits_of(theta_p, y), ids, behaviour_logprobs_BxT=behaviour,
                                 **kw).sum()
        total += s * torch.autograd.grad(loss, theta)[0]
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_student_samples_the_estimate_is_unbiased(seed):
    theta_q, theta_p = tables(seed), tables(100 + seed)
    want, _ = exact_grad(theta_q, theta_p)
    torch.testing.assert_close(expected_estimate(theta_q, theta_p), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_teacher_mixed_samples_with_sequence_weights_are_unbiased_and_token_weights_are_not(alpha):
    theta_q, theta_p = tables(3), tables(103)
    want, _ = exact_grad(theta_q, theta_p)
    got = expected_estimate(theta_q, theta_p, alpha=alpha, weights="sequence")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    token = expected_estimate(theta_q, theta_p, alpha=alpha, weights="token", clip=1e9)
    assert (token - want).abs().max() > 1e-3  # the paper's per-token weights: an approximation (biased)


def test_length_normalisation_averages_the_future_rewards():
    """Eq. 5: R_{t+1} averaged over the tokens after t. Against a loop over one 4-token response with a padded
    end: the surrogate's long-term part, recovered as surrogate − single-step KL, is −mean(r_{t'>t}) · log q(y_t)."""
    g = torch.Generator().manual_seed(8)
    zs, zp = torch.randn(1, 4, 5, generator=g, dtype=torch.float64), torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    y, mask = torch.tensor([[1, 3, 0, 2]]), torch.tensor([[True, True, True, False]])
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zp, -1)
    r = [float(lp[0, t, y[0, t]] - lq[0, t, y[0, t]]) for t in range(3)]
    single = (lq.exp() * (lq - lp)).sum(-1)[0]
    got = minillm_surrogate(zs, zp, y, mask, length_norm=True)[0]
    for t in range(3):
        future = r[t + 1:3]
        mean = sum(future) / len(future) if future else 0.0
        assert float(got[t]) == pytest.approx(float(single[t]) - mean * float(lq[0, t, y[0, t]]), rel=1e-12)
    assert float(got[3]) == 0.0


def test_the_value_estimate_is_the_sequence_kl_on_average():
    theta_q, theta_p = tables(5), tables(105)
    _, kl = exact_grad(theta_q, theta_p)
    est = sum(float(seq_logprob(theta_q, y).exp()) *
              float(sequence_reverse_kl_estimate(logits_of(theta_q, y), logits_of(theta_p, y), torch.tensor([y])))
              for y in itertools.product(range(V), repeat=T))
    assert est == pytest.approx(kl, rel=1e-10)


def test_masked_positions_add_nothing():
    theta_q, theta_p = tables(6), tables(106)
    y = (1, 2)
    s = logits_of(theta_q, y).requires_grad_()
    full = minillm_surrogate(s, logits_of(theta_p, y), torch.tensor([y]))
    part = minillm_surrogate(s, logits_of(theta_p, y), torch.tensor([y]), torch.tensor([[True, False]]))
    assert part[0, 1] == 0 and torch.isfinite(part).all()
    assert not torch.equal(full[0, 0], part[0, 0])  # R_2 no longer counts the masked token


def test_teacher_mixed_sampler_draws_from_the_mixture_and_reports_its_log_probs():
    theta_q, theta_p = tables(7), tables(107)
    alpha = 0.3

    def step(theta):
        return lambda ids: torch.stack([theta[PREFIXES.index(tuple(row[1:].tolist()))] for row in ids])

    prompts = torch.zeros(4000, 1, dtype=torch.long)  # a one-token prompt, dropped by `step`
    ys, logps = sample_teacher_mixed(step(theta_q), step(theta_p), prompts, T, alpha,
                                     generator=torch.Generator().manual_seed(0))
    for y, lp in zip(ys[:50].tolist(), logps[:50]):
        torch.testing.assert_close(lp.unsqueeze(0), mixed_logprob(theta_q, theta_p, y, alpha), rtol=1e-12, atol=0)
    # frequencies of the 9 responses against p̃(y), within 4 standard errors
    for y in itertools.product(range(V), repeat=T):
        prob = float(mixed_logprob(theta_q, theta_p, y, alpha).sum().exp())
        freq = float((ys == torch.tensor(y)).all(-1).double().mean())
        assert abs(freq - prob) < 4 * (prob * (1 - prob) / len(ys)) ** 0.5 + 1e-3, (y, freq, prob)


def test_minillm_runs_in_the_stage2_loop_with_teacher_mixed_samples(tmp_path):
    """stage2.regime=teacher_mixed + loss.name=minillm in a real (tiny) run. The batches' behaviour log-probs are
    those of α·teacher + (1 − α)·student recomputed here from the two models; the training loss is finite, and
    a run on student samples (online_student) works as well."""
    from pathlib import Path

    from kdlab.config import load_config
    from kdlab.pipeline.distill import make_source, run
    from kdlab.pipeline.world import build_world

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    common = [f"cache_dir={tmp_path / 'cache'}", "loss.name=minillm", "stage2.steps=3", "eval.num_points=2",
              "stage2.batch_size=8"]
    cfg = load_config(tiny, [f"output_dir={tmp_path / 'mixed'}", "stage2.regime=teacher_mixed", *common])
    world = build_world(cfg, log=lambda m: None)
    source, _ = make_source(cfg, world, tmp_path / "mixed", log=lambda m: None)
    student = world.load_student_init()
    batch = source.batch(0, student)
    with torch.no_grad():
        args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        q = torch.softmax(student.response_logits(*args).double(), -1)
        p = torch.softmax(world.teacher.response_logits(*args).double(), -1)
        mix = cfg.stage2.mixed.teacher_alpha * p + (1 - cfg.stage2.mixed.teacher_alpha) * q
        want = mix.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1).log()
    torch.testing.assert_close(batch.behaviour_logprobs.double(), want, rtol=1e-4, atol=1e-5)
    # the targets are the teacher's logits along the response, taken from the sampling loop
    torch.testing.assert_close(batch.teacher_target.double(), world.teacher.response_logits(*args).double(),
                               rtol=1e-4, atol=1e-5)
    for regime in ("teacher_mixed", "online_student"):
        out = run(load_config(tiny, [f"output_dir={tmp_path / regime}", f"stage2.regime={regime}", *common]),
                  log=lambda m: None, progress=False)
        from kdlab import record
        from kdlab.pipeline.rundir import read_metrics

        rows = read_metrics(out / record.METRICS)
        assert all(r[record.TRAIN_LOSS] is None or abs(r[record.TRAIN_LOSS]) < 1e6 for r in rows)


def test_minillm_is_refused_off_policy():
    from kdlab.config import ConfigError, load_config
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="online_student"):
        load_config(tiny, ["loss.name=minillm", "stage2.regime=offline"])
    with pytest.raises(ConfigError, match="minillm"):
        load_config(tiny, ["stage2.regime=teacher_mixed"])
