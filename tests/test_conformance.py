"""kdlab.conformance: the correct losses pass every case, each re-created public bug fails the case meant for it.

tests/conformance_bugs.py holds one broken copy of a correct loss per bug (TRL #2202, PR #3043, PR #5731,
#4719 / ms-swift PR #10165, Liger #769, ms-swift #10078, #10079, miles #2362, Atropos #456). The references
are the suite's own float64 formulas (kdlab/conformance/reference.py); no expected number is written here.
"""

import math
import re
import subprocess
import sys

import pytest
import torch
import typer

import conformance_bugs as cb
from kdlab.conformance import (CASES, FAIL, FAMILIES, INFO, PASS, SKIP, ConformanceInputError, check, make_adapter,
                               run_suite)
from kdlab.conformance import suite
from kdlab.conformance.adapters import detect_adapter, guess_family
from kdlab.losses.names import LOSS_NAMES


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors run fastest on one thread (see tests/test_losses_reference.py); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def statuses(report):
    return {c.name: c.status for c in report.cases}


def not_applicable(family, param, topk=None):
    """The cases that SKIP for a family: what the suite is expected to leave out, written from its rules."""
    skips = {"topk_bias"} if topk is None else set()
    if family != "gjsd":
        skips |= {"endpoints", "jsd_mixture"}
    elif param in (0.0, 1.0):
        skips.add("jsd_mixture")
    if family == "tvd":
        skips.add("stationary")
    return skips


KDLAB_CASES = [("forward_kl", "fkl", None), ("reverse_kl", "rkl", None), ("tvd", "tvd", None),
               ("generalized_jsd", "gjsd", 0.0), ("generalized_jsd", "gjsd", 0.1), ("generalized_jsd", "gjsd", 0.5),
               ("generalized_jsd", "gjsd", 0.9), ("generalized_jsd", "gjsd", 1.0), ("skew_kl", "skew_kl", 0.1),
               ("skew_reverse_kl", "skew_rkl", 0.3)]


@pytest.mark.parametrize("name, family, param", KDLAB_CASES, ids=lambda v: str(v))
def test_kdlab_losses_pass_every_case(name, family, param):
    report = check(f"kdlab.losses:{name}", family, param)
    skips = not_applicable(family, param)
    assert statuses(report) == {c: SKIP if c in skips else PASS for c in CASES}, report.failed
    assert report.exit_code == 0


@pytest.mark.parametrize("name", list(cb.CORRECT))
def test_correct_copies_pass_every_case(name):
    """The originals the broken copies are made from pass: a copy's failure is its bug's, not the harness's."""
    fn, family, param = cb.CORRECT[name]
    report = run_suite(make_adapter(fn, "kdlab", FAMILIES[family].param), family, param, target=name)
    skips = not_applicable(family, param)
    assert statuses(report) == {c: SKIP if c in skips else PASS for c in CASES}, report.failed


@pytest.mark.parametrize("name", list(cb.BUGS))
def test_each_public_bug_fails_the_case_meant_for_it(name):
    bug = cb.BUGS[name]
    made = make_adapter(bug.loss, bug.adapter, FAMILIES[bug.family].param, topk=bug.topk)
    report = run_suite(made, bug.family, bug.param, target=name, topk=bug.topk)
    for case in bug.meant:
        assert report.case(case).status == FAIL, (case, report.case(case))
    # The failing reason names the bug it re-creates.
    reasons = " ".join(report.case(case).reason for case in bug.meant)
    assert any(number in reasons for number in re.findall(r"#\d+", bug.source)), reasons
    assert report.exit_code == 1


def test_every_meant_case_and_family_is_declared_once():
    assert {case for bug in cb.BUGS.values() for case in bug.meant} <= set(CASES)
    assert {family.loss for family in FAMILIES.values()} <= set(LOSS_NAMES)


def test_normalisation_is_measured_not_assumed():
    """sum / B and the mean of per-sequence means are told apart from the token mean (and from each other); the
    value-type cases then undo the factor, so the formula itself still passes."""
    names = list(suite.NORMALISERS)
    per_batch = run_suite(make_adapter(cb.batch_size_normalised_fkl, "kdlab", None), "fkl")
    per_sequence = run_suite(make_adapter(cb.per_sequence_mean_fkl, "kdlab", None), "fkl")
    assert per_batch.case("normalisation").numbers["normaliser"] == names[2]
    assert per_sequence.case("normalisation").numbers["normaliser"] == names[5]
    for report in (per_batch, per_sequence):
        assert report.case("value").status == report.case("gradient").status == PASS


def test_normalisation_of_a_loss_that_ignores_its_mask():
    """TRL's generalized_jsd_loss without labels: sum over all positions / B. Its full-batch normalisation is
    still found (so the value passes), the ragged batch matches none, and masking fails."""

    def no_mask_batchmean(student_logits, teacher_logits, mask=None, *, reduction="mean", temperature=1.0):
        per = cb.kl_rows(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1))
        return per.sum() / per.shape[0]

    report = run_suite(make_adapter(no_mask_batchmean, "kdlab", None), "fkl")
    assert report.case("normalisation").status == FAIL
    assert report.case("normalisation").numbers["normaliser"] is None
    assert list(suite.NORMALISERS)[2] in report.case("normalisation").reason  # sum / B on full batches
    assert report.case("value").status == PASS and report.case("masking").status == FAIL


def test_topk_bias_is_disclosed_and_fails_only_a_claim_of_exactness():
    """kdlab's SparseTarget (top-3 of V=7, tail as one bucket) is a lower bound of the forward KL: reported."""
    report = check("kdlab.losses:forward_kl", "fkl", topk=3)
    got = statuses(report)
    assert got["value"] == got["gradient"] == got["topk_bias"] == INFO
    assert report.case("value").numbers["value"] < report.case("value").numbers["reference"]  # data processing
    assert FAIL not in got.values()
    assert got["stationary"] == got["accumulation"] == got["masking"] == PASS
    exact_claim = check("kdlab.losses:forward_kl", "fkl", topk=3, claims_exact=True)
    assert exact_claim.case("topk_bias").status == FAIL
    assert check("kdlab.losses:forward_kl", "fkl", topk=suite.V, claims_exact=True).exit_code == 0  # k = V: exact


def test_adapters_and_families_from_signatures():
    def trl_like(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
        ...

    class TorchtuneLike(torch.nn.Module):
        def forward(self, student_logits, teacher_logits, labels, normalize=True):
            ...

    assert detect_adapter(trl_like) == "trl"
    assert detect_adapter(TorchtuneLike()) == "torchtune"
    assert detect_adapter(cb.correct_jsd) == "kdlab"
    with pytest.raises(ConformanceInputError, match="--adapter"):
        detect_adapter(lambda x, y: x)
    assert guess_family("torchtune.modules.loss:ReverseKLLoss") == "rkl"
    assert guess_family("trl.experimental.gkd:GKDTrainer.generalized_jsd_loss") == "gjsd"
    assert guess_family("kdlab.losses:skew_reverse_kl") == "skew_rkl"
    assert guess_family("mine:SymmetricKLLoss") is None


def test_torchtune_convention_on_a_local_copy():
    """The torchtune adapter (flattened (B·T, V) logits, labels with -100, a class built with no arguments) on a
    stand-in with its signature: forward KL on float32 internals, a constant 0 (no graph) for no tokens."""

    class ForwardKL(torch.nn.Module):
        def forward(self, student_logits, teacher_logits, labels, normalize=True):
            log_q = torch.log_softmax(student_logits.float(), dim=-1)
            log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
            per = (log_p.exp() * (log_p - log_q)).sum(-1)
            mask = labels != -100
            if not mask.any():
                return torch.tensor(0.0)
            return per[mask].sum() / mask.sum()

    report = check(ForwardKL, "fkl", adapter="torchtune")
    got = statuses(report)
    assert report.dtype == "float32" and report.tolerance == suite.TOLERANCE[torch.float32]
    assert got["value"] == got["gradient"] == got["accumulation"] == PASS
    assert got["temperature"] == SKIP  # no temperature argument
    assert got["all_masked"] == INFO  # 0, but detached from the graph


# ------------------------------------------------------------------------------------------------- CLI


def conformance_in_process(*args):
    """The verb under typer's test runner: the same parsing and exit codes as `kdlab conformance`."""
    from typer.testing import CliRunner

    from kdlab.cli import conformance

    app = typer.Typer()
    app.command()(conformance.command)
    return CliRunner().invoke(app, list(args))


def test_cli_exit_codes_and_one_line_errors():
    ok = conformance_in_process("kdlab.losses:forward_kl")
    assert ok.exit_code == 0 and "normalisation" in ok.output and "FAIL" not in ok.output
    bad = conformance_in_process("conformance_bugs:clamped_beta_jsd", "--family", "gjsd", "--json")
    assert bad.exit_code == 1 and '"exit_code": 1' in bad.output
    for args, message in [(("nosuch_module_xyz:f",), "cannot import"),
                          (("kdlab.losses:nosuch",), "no attribute"),
                          (("kdlab.losses",), "not MODULE:FUNCTION"),
                          (("math:sqrt", "--family", "fkl"), "--adapter"),
                          (("math:sqrt", "--family", "fkl", "--adapter", "kdlab"), "raised TypeError"),
                          (("kdlab.losses:forward_kl", "--family", "kl"), "allowed"),
                          (("conformance_bugs:kl_rows",), "cannot tell the family"),
                          (("kdlab.losses:forward_kl", "--claims-exact"), "needs --topk")]:
        out = conformance_in_process(*args)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output and "Traceback" not in out.output
        assert len(out.output.strip().splitlines()) == 1, out.output


def test_cli_verb_is_registered():
    out = subprocess.run([sys.executable, "-m", "kdlab.cli", "conformance", "kdlab.losses:tvd"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().splitlines()[-1].startswith(f"{len(CASES)} cases:")


# ------------------------------------------------------------------------------------------------- TRL


def test_trl_generalized_jsd_loss_as_measured():
    """TRL's own GKD loss (trl 1.16: trl.experimental.gkd). Measured (docs/LOG.md, 2026-12-04): every case
    passes at β = 0, 0.5, 1 (its β is GKD's, its batchmean with labels is a token mean) except −inf logits,
    where F.kl_div(log_target=True) computes exp(t)·(t − s) = 0·(−inf − s) = NaN."""
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except Exception as err:  # pragma: no cover - an optional dependency that does not import here
        pytest.skip(f"trl.experimental.gkd does not import: {err}")
    for beta in (0.0, 0.5, 1.0):
        report = check("trl.experimental.gkd:GKDTrainer.generalized_jsd_loss", "gjsd", beta)
        got = statuses(report)
        assert report.failed == [report.case("extreme_logits")], report.failed
        numbers = report.case("extreme_logits").numbers
        assert math.isfinite(numbers.pop("±1e4 logits"))  # ±1e4 logits are handled
        assert numbers and all(math.isnan(v) for v in numbers.values())  # NaN wherever a logit is −inf
        skips = not_applicable("gjsd", beta)
        assert {c for c, s in got.items() if s == SKIP} == skips
