"""The conformance cases: a user's token-level distillation loss against float64 references and properties.

Each case is a pure function of (the adapted loss, the setting) returning a :class:`CaseResult`: a status
(PASS, FAIL, INFO: reported, not a failure; SKIP: does not apply) and one line saying why, with the
numbers. Inputs are tiny and fixed (B=3, T=5, V=7, float64 where the loss allows, seeded generators), so
the whole suite runs in well under a second for a plain loss.

The references are the formulas in reference.py. The loss's normalisation is measured, not assumed
(case ``normalisation``); the value-type cases then compare the loss's value converted to a token mean,
so that one normalisation finding does not fail every case. The cases that re-create a public bug cite it;
tests/conformance_bugs.py holds one deliberately broken loss per bug and tests/test_conformance.py checks
that the case meant for it fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from kdlab.conformance import reference as ref
from kdlab.conformance.adapters import Adapter, ConformanceInputError

PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"
STATUSES = (PASS, FAIL, INFO, SKIP)

# Test batch: B rows of T positions over V tokens; RAGGED rows have unequal counted tokens (11 of 15).
B, T, V = 3, 5, 7
RAGGED = (5, 2, 4)
WITH_EMPTY_ROW = (4, 0, 3)  # the masking case: a fully padded row as well
MICRO_BATCHES = ((0, 1), (2,))  # consecutive rows: 7 and 4 tokens (gradient accumulation)
RANKS = ((0, 2), (1,))  # interleaved rows: 9 and 2 tokens (data-parallel ranks)
TEMPERATURE = 2.0
NEAR_END = 1e-3  # β this close to 0 or 1 for the endpoint limits
EXPECTED_GRADIENT_DRAWS = 256
MIN_COSINE = 0.5  # the mean gradient must point within 60 degrees of the reference's
NOOP_FRACTION = 1e-3  # a gradient below this fraction of the reference's norm counts as none
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# name -> what the case checks (and the public bug it re-creates). The report lists cases in this order.
CASES: dict[str, str] = {
    "normalisation": "the batch value is the mean over counted tokens (per-token values inferred from single-token "
                     "calls; TRL #4719)",
    "value": "equals the family's float64 reference",
    "identical": "zero when student == teacher",
    "stationary": "zero gradient when student == teacher (biased truncated reverse KL: ms-swift #10079)",
    "endpoints": "GJSD: β=0 is KL(P‖Q), β=1 is KL(Q‖P), and JSD_β/β, JSD_β/(1−β) approach them "
                 "(ms-swift #10078; β's meaning: TRL PR #3043)",
    "jsd_mixture": "GJSD: the mixture M = β·P + (1−β)·Q taken in probability space, not log space (TRL #2202)",
    "masking": "masked positions change neither value nor gradient; their gradient is 0",
    "all_masked": "an all-masked batch gives 0 (or a stated value), never NaN (Liger #769)",
    "accumulation": "one batch == token-weighted micro-batches, value and gradient (TRL #4719, ms-swift PR #10165)",
    "ranks": "one batch == token-weighted data-parallel ranks with unequal tokens (ms-swift PR #10165)",
    "temperature": "at τ=2 equals the reference on logits/τ (TRL PR #5731: sampling τ used, 0.5·CE added)",
    "extreme_logits": "±1e4 and −inf logits: finite value equal to the reference, finite gradient (Liger #769)",
    "gradient": "gradient w.r.t. the student logits equals the reference's (float64 autograd)",
    "noop": "a nonzero gradient when student != teacher (Atropos #456: distillation as a no-op)",
    "expected_gradient": "the mean gradient (over reseeded calls if the loss draws random numbers) points along "
                         "the reference's (miles #2362: a detached top-k signal with zero expected gradient)",
    "topk_bias": "with a top-k target: its bias against the full reference, disclosed",
}


@dataclass
class CaseResult:
    name: str
    status: str
    reason: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Report:
    target: str
    adapter: str
    family: str
    param: dict
    dtype: str
    tolerance: float
    assumptions: list[str]
    cases: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == FAIL]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def case(self, name: str) -> CaseResult:
        return next(c for c in self.cases if c.name == name)

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.cases) for s in STATUSES}

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts(), "exit_code": self.exit_code}


# ---------------------------------------------------------------------------------------------------------
# Inputs and calls.


def logits(seed: int, scale: float = 2.0, shape: tuple[int, ...] = (B, T, V)) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def mask_of(lengths: tuple[int, ...]) -> Tensor:
    """Right-padded rows with these numbers of counted tokens."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


FULL = (T,) * B


@dataclass
class Outcome:
    """One call: the value (float64), the gradient w.r.t. the student logits (zeros when the output has no
    autograd path to them: ``detached``), or the error it raised."""

    value: Tensor | None = None
    grad: Tensor | None = None
    detached: bool = False
    error: str | None = None
    dtype: torch.dtype | None = None  # the dtype the loss returned

    @property
    def ok(self) -> bool:
        return self.error is None


class Setting:
    """The loss under test with everything a case needs: the adapter, the family and its parameter, the
    input dtype the loss accepts, the tolerance of its output dtype and the measured normalisation."""

    def __init__(self, adapter: Adapter, family: str, param: float | None, topk: int | None, claims_exact: bool):
        self.adapter, self.family, self.param = adapter, family, param
        self.topk, self.claims_exact = topk, claims_exact
        self.input_dtype = torch.float64
        self.tol = TOLERANCE[torch.float64]
        self.to_token_mean = 1.0  # the factor that turns the loss's value on a full mask into a token mean
        self.normaliser = "token mean"
        self.stochastic = False  # the loss draws random numbers: another seed gives another value or gradient
        self.value_ok = True  # the value case passed: later cases may compare values, not only their finiteness

    def call(self, z_s: Tensor, z_t: Tensor, mask: Tensor, *, temperature: float | None = None,
             param: float | None = None, seed: int = 0) -> Outcome:
        """The loss on (z_s, z_t, mask), its float64 value and gradient w.r.t. z_s. The global RNG is seeded
        with ``seed`` for the call and restored after it, so a loss that draws random numbers is repeatable."""
        student = z_s.detach().to(self.input_dtype).requires_grad_(True)
        teacher = z_t.detach().to(self.input_dtype)
        if param is None:
            param = self.param
        if temperature is None and self.adapter.takes_temperature:
            temperature = 1.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                out = self.adapter(student, teacher, mask, temperature=temperature, param=param)
            except Exception as err:
                return Outcome(error=f"raised {type(err).__name__}: {_one_line(err)}")
            if not isinstance(out, Tensor) or out.numel() != 1:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                return Outcome(error=f"returned {shape}, not a scalar tensor")
            value = out.detach().reshape(()).to(torch.float64)
            if not out.requires_grad:
                return Outcome(value, torch.zeros_like(z_s), detached=True, dtype=out.dtype)
            try:
                (grad,) = torch.autograd.grad(out.reshape(()), student, allow_unused=True)
            except RuntimeError as err:
                return Outcome(error=f"backward raised RuntimeError: {_one_line(err)}")
        if grad is None:
            return Outcome(value, torch.zeros_like(z_s), detached=True, dtype=out.dtype)
        return Outcome(value, grad.to(torch.float64), dtype=out.dtype)

    def reference(self, z_s: Tensor, z_t: Tensor, mask: Tensor, temperature: float = 1.0,
                  param: float | None = None) -> tuple[Tensor, Tensor]:
        """(token mean of the family's reference, its gradient w.r.t. z_s), both float64."""
        student = z_s.detach().double().requires_grad_(True)
        value = ref.token_mean(ref.per_token(self.family, student, z_t, self.param if param is None else param,
                                             temperature), mask)
        if not value.requires_grad:  # e.g. TVD of identical inputs can still be differentiated; a constant cannot
            return value.detach(), torch.zeros_like(student)
        (grad,) = torch.autograd.grad(value, student)
        return value.detach(), grad

    @property
    def approximate(self) -> bool:
        """A top-k loss that does not claim exactness: its value and gradient biases are reported, not failed."""
        return bool(self.topk) and not self.claims_exact


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def close(x: Tensor | float, target: Tensor | float, tol: float, scale: float = 1e-3) -> bool:
    """|x − target| <= tol · max(|target|, scale); never true for NaN."""
    x, target = float(x), float(target)
    return abs(x - target) <= tol * max(abs(target), scale)


def rel(x: Tensor | float, target: Tensor | float) -> float:
    x, target = float(x), float(target)
    return abs(x - target) / max(abs(target), 1e-300)


def cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else 0.0


def fmt(x: float | Tensor) -> str:
    return f"{float(x):.6g}"


def grads_close(g: Tensor, g_ref: Tensor, tol: float) -> bool:
    return float((g - g_ref).norm()) <= tol * max(float(g_ref.norm()), 1e-3)


def result(name: str, status: str, reason: str, **numbers) -> CaseResult:
    return CaseResult(name, status, reason, {k: (float(v) if isinstance(v, Tensor) else v) for k, v in numbers.items()})


def failed_call(name: str, what: str, outcome: Outcome) -> CaseResult:
    return result(name, FAIL, f"{what} {outcome.error}")


# ---------------------------------------------------------------------------------------------------------
# Diagnosis: what a wrong value is, when it is a known wrong formula.


def diagnose(s: Setting, value: Tensor, z_s: Tensor, z_t: Tensor, temperature: float = 1.0) -> str:
    """A phrase naming the known mistake that ``value`` (a token mean on a full mask) matches, or ''."""
    tol = max(s.tol, 1e-6)
    mask = mask_of(FULL)
    candidates: list[tuple[str, Tensor]] = []
    if s.family == ref.FKL:
        entropy = ref.token_mean(ref.teacher_entropy(z_t, temperature), mask)
        fkl = ref.token_mean(ref.per_token(ref.FKL, z_s, z_t, None, temperature), mask)
        candidates.append(("the cross-entropy H(P, Q) = KL(P‖Q) + H(P): the same gradient, the value offset by "
                           "the teacher's entropy", fkl + entropy))
    if s.family in (ref.FKL, ref.RKL):
        other = ref.RKL if s.family == ref.FKL else ref.FKL
        candidates.append((f"the other direction ({other}): check F.kl_div's argument order",
                           ref.token_mean(ref.per_token(other, z_s, z_t, None, temperature), mask)))
    if s.family == ref.GJSD and s.param is not None and 0 < s.param < 1 and temperature == 1.0:
        candidates.append(("the mixture taken in log space, log M = β·log P + (1−β)·log Q (TRL #2202)",
                           ref.token_mean(ref.log_space_mixture_jsd(z_s, z_t, s.param), mask)))
        candidates.append(("the mixture M = β·Q + (1−β)·P, β reversed (TRL before PR #3043)",
                           ref.token_mean(ref.reversed_beta_jsd(z_s, z_t, s.param), mask)))
    for phrase, candidate in candidates:
        if close(value, candidate, tol):
            return phrase
    return ""


# ---------------------------------------------------------------------------------------------------------
# Normalisation, measured: the loss's own per-token values from single-token calls, then the batch value.

# name -> (denominator of a batch: mask -> float, or None for the mean of per-sequence means)
NORMALISERS: dict[str, Callable[[Tensor], float] | None] = {
    "token mean": lambda m: float(m.sum()),
    "sum over tokens": lambda m: 1.0,
    "sum / batch size B (TRL's batchmean without labels)": lambda m: float(m.shape[0]),
    "mean over all B·T positions, padding counted": lambda m: float(m.numel()),
    "mean over (token, vocabulary) elements": lambda m: float(m.sum()) * V,
    "mean of per-sequence token means": None,
}


def predicted(name: str, own_BxT: Tensor, mask: Tensor) -> float:
    denominator = NORMALISERS[name]
    if denominator is None:
        rows = [own_BxT[b][mask[b]].mean() for b in range(mask.shape[0]) if mask[b].any()]
        return float(torch.stack(rows).mean())
    return float(torch.where(mask, own_BxT, torch.zeros_like(own_BxT)).sum()) / denominator(mask)


def case_normalisation(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """The loss's own per-token values u come from calls on single positions (1×1 batches, no mask needed).
    The full batch's value gives the factor to a token mean, Σu / (B·T) over the loss's value, whatever the
    normalisation; the normalisations in NORMALISERS that predict it are then told apart on the ragged batch
    (rows of 5, 2 and 4 counted tokens), which needs the loss to honour its mask (see masking)."""
    one = torch.ones(1, 1, dtype=torch.bool)
    own = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            out = s.call(z_s[b:b + 1, t:t + 1], z_t[b:b + 1, t:t + 1], one)
            if not out.ok:
                return failed_call("normalisation", f"on the single position ({b}, {t}) the loss", out)
            own[b, t] = out.value
    full, ragged = mask_of(FULL), mask_of(RAGGED)
    whole, part = s.call(z_s, z_t, full), s.call(z_s, z_t, ragged)
    for out, what in ((whole, "on a full batch"), (part, "on a ragged batch")):
        if not out.ok:
            return failed_call("normalisation", f"{what} the loss", out)

    def scaled(name):  # the per-token values under a normalisation: a 1×1 batch divides by its denominator
        denominator = NORMALISERS[name]
        return own * (denominator(one) if denominator is not None else 1.0)

    on_full = [name for name in NORMALISERS if close(whole.value, predicted(name, scaled(name), full), s.tol)]
    if not on_full:
        return result("normalisation", FAIL, f"the full batch's value {fmt(whole.value)} is no normalisation of the "
                      f"loss's values at its single positions (their mean: {fmt(own.mean())}): not a sum of "
                      "per-token terms; the other cases take it as a token mean", value=whole.value)
    token_mean = predicted("token mean", scaled(on_full[0]), full)  # Σu / (B·T): what kdlab's contract returns
    s.to_token_mean = token_mean / float(whole.value) if float(whole.value) else 1.0
    n = int(ragged.sum())
    on_ragged = [name for name in on_full if close(part.value, predicted(name, scaled(name), ragged), s.tol)]
    if not on_ragged:
        s.normaliser = on_full[0]
        return result("normalisation", FAIL, f"on full batches the {on_full[0]}, but with a ragged mask ({n} counted "
                      f"tokens) the value {fmt(part.value)} is no normalisation of the counted tokens' values: does the "
                      "loss ignore its mask? (see masking)", value=part.value, normaliser=None)
    s.normaliser = on_ragged[0]
    if s.normaliser == "token mean":
        return result("normalisation", PASS, f"the batch value is the mean over its {n} counted tokens (rows of "
                      f"{', '.join(map(str, RAGGED))})", value=part.value, normaliser=s.normaliser)
    return result("normalisation", FAIL, f"the batch value is the {s.normaliser}, not the mean over its {n} counted "
                  f"tokens: tokens are weighted by their row or batch, not equally (TRL #4719); the value-type cases "
                  f"undo it (×{s.to_token_mean:.4g} on a full batch)", value=part.value, normaliser=s.normaliser)


# ---------------------------------------------------------------------------------------------------------
# The cases on a full mask (value-type: the loss's value times s.to_token_mean).


def case_value(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    mask = mask_of(FULL)
    out = s.call(z_s, z_t, mask)
    if not out.ok:
        return failed_call("value", "the loss", out)
    value = out.value * s.to_token_mean
    target, _ = s.reference(z_s, z_t, mask)
    what = f"{ref.FAMILIES[s.family].formula}" + (f" at {ref.FAMILIES[s.family].param}={s.param}" if s.param is not None else "")
    if close(value, target, s.tol):
        return result("value", PASS, f"{fmt(value)} == reference {fmt(target)} (|Δ|/ref {rel(value, target):.1e}); "
                      f"{what}", value=value, reference=target)
    if s.approximate:
        return result("value", INFO, f"{fmt(value)} vs full reference {fmt(target)} ({_percent(value, target)}): "
                      f"a top-{s.topk} approximation (see topk_bias)", value=value, reference=target)
    why = diagnose(s, value, z_s, z_t)
    s.value_ok = False
    return result("value", FAIL, f"{fmt(value)} != reference {fmt(target)} ({_percent(value, target)})"
                  + (f": it is {why}" if why else f"; reference: {what}"), value=value, reference=target)


def _percent(x, target) -> str:
    return f"{100 * (float(x) - float(target)) / max(abs(float(target)), 1e-300):+.3g}%"


def case_identical(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    out = s.call(z_t.clone(), z_t, mask_of(FULL))
    if not out.ok:
        return failed_call("identical", "with student == teacher the loss", out)
    value = out.value * s.to_token_mean
    scale, _ = s.reference(z_s, z_t, mask_of(FULL))
    if abs(float(value)) <= s.tol * max(abs(float(scale)), 1e-3):
        return result("identical", PASS, f"{fmt(value)} with student == teacher", value=value)
    entropy = ref.token_mean(ref.teacher_entropy(z_t), mask_of(FULL))
    why = " = the teacher's entropy H(P): a cross-entropy, not a divergence" if close(value, entropy, 1e-6) else ""
    return result("identical", FAIL, f"{fmt(value)} with student == teacher, not 0{why}", value=value)


def case_stationary(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Every divergence is minimised where the student equals the teacher, so its gradient vanishes there.
    A reverse KL summed over the teacher's top-k tokens only, Σ_{v∈S} q_v·(log q_v − log p_v), is not: its
    gradient there is q_j·(1[j ∈ S] − Q(S)), pushing mass out of the kept support (ms-swift #10079)."""
    if s.family == ref.TVD:
        return result("stationary", SKIP, "TVD has a kink at P = Q: any subgradient is valid there (rounding picks "
                      "the sign of P − Q)")
    out = s.call(z_t.clone(), z_t, mask_of(FULL))
    if not out.ok:
        return failed_call("stationary", "with student == teacher the loss", out)
    _, g_ref = s.reference(z_s, z_t, mask_of(FULL))
    norm, scale = float(out.grad.norm()) * s.to_token_mean, float(g_ref.norm())
    if norm <= s.tol * max(scale, 1e-3):
        return result("stationary", PASS, f"gradient norm {norm:.2g} at student == teacher (reference gradient norm "
                      f"at the test point: {scale:.3g})", grad_norm=norm)
    return result("stationary", FAIL, f"gradient norm {norm:.3g} at student == teacher (the reference's norm at the "
                  f"test point is {scale:.3g}): the loss is not minimised at the teacher (a truncated KL? ms-swift "
                  "#10079)", grad_norm=norm, reference_grad_norm=scale)


def case_endpoints(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """GKD (arXiv 2306.13649) defines JSD_β for 0 < β < 1, where it vanishes at both ends (JSD_β ≈ β·KL(P‖Q) as
    β → 0, ≈ (1−β)·KL(Q‖P) as β → 1), and sets β = 0 to KL(P‖Q) and β = 1 to KL(Q‖P): kdlab's convention and
    TRL's since PR #3043 (before it TRL mixed M = β·Q + (1−β)·P, so β meant the opposite). The value jumps at
    the ends by design. Failures caught: β clamped inside (0, 1) so that β = 1 gives ≈ 0 (ms-swift #10078), β
    reversed (TRL PR #3043), an interior that does not vanish at the ends (not GKD's JSD_β)."""
    if s.family != ref.GJSD:
        return result("endpoints", SKIP, "only for the gjsd family")
    if not s.adapter.takes_param:
        return result("endpoints", SKIP, f"the loss takes no {s.adapter.param_name!r} argument")
    mask = mask_of(FULL)
    fkl, _ = s.reference(z_s, z_t, mask, param=0.0)
    rkl, _ = s.reference(z_s, z_t, mask, param=1.0)
    problems, numbers = [], {}
    for beta, target, name, other, other_name in ((0.0, fkl, "KL(P‖Q)", rkl, "KL(Q‖P)"),
                                                  (1.0, rkl, "KL(Q‖P)", fkl, "KL(P‖Q)")):
        out = s.call(z_s, z_t, mask, param=beta)
        if not out.ok:
            return failed_call("endpoints", f"at β={beta:g} the loss", out)
        value = out.value * s.to_token_mean
        numbers[f"beta={beta:g}"] = float(value)
        if not close(value, target, s.tol):
            if close(value, other, s.tol):
                problems.append(f"β={beta:g} gives {fmt(value)} = {other_name}, not {name} {fmt(target)}: β means the "
                                "opposite (TRL before PR #3043)")
            elif abs(float(value)) < 0.1 * abs(float(target)):
                problems.append(f"β={beta:g} gives {fmt(value)} ≈ 0, not {name} {fmt(target)} (β clamped inside (0, 1)? "
                                "ms-swift #10078)")
            else:
                problems.append(f"β={beta:g} gives {fmt(value)}, not {name} {fmt(target)}")
    # Near the ends, the loss divided by its vanishing weight against the float64 reference divided the same
    # way (the reference's own ratio carries the O(β) term; float32 loses ~3 digits to the small value).
    near_tol = max(s.tol * 1e3, 1e-6)
    for beta, weight, limit, name in ((NEAR_END, NEAR_END, fkl, "KL(P‖Q)"), (1 - NEAR_END, NEAR_END, rkl, "KL(Q‖P)")):
        out = s.call(z_s, z_t, mask, param=beta)
        if not out.ok:
            return failed_call("endpoints", f"at β={beta:g} the loss", out)
        ratio = out.value * s.to_token_mean / weight
        target = s.reference(z_s, z_t, mask, param=beta)[0] / weight
        numbers[f"ratio beta={beta:g}"] = float(ratio)
        if not close(ratio, target, near_tol):
            problems.append(f"at β={beta:g} the loss / {weight:g} is {fmt(ratio)}, the reference's {fmt(target)} "
                            f"(→ {name} {fmt(limit)})")
    if problems and s.approximate:
        return result("endpoints", INFO, f"a top-{s.topk} approximation, against the full references: "
                      + "; ".join(problems), **numbers)
    if problems:
        return result("endpoints", FAIL, "; ".join(problems), **numbers)
    return result("endpoints", PASS, f"β=0: {fmt(fkl)} = KL(P‖Q), β=1: {fmt(rkl)} = KL(Q‖P); "
                  f"JSD/β at β={NEAR_END:g}: {fmt(numbers[f'ratio beta={NEAR_END:g}'])}, JSD/(1−β) at "
                  f"β={1 - NEAR_END:g}: {fmt(numbers[f'ratio beta={1 - NEAR_END:g}'])} (the ends jump by "
                  "definition)", **numbers)


def case_jsd_mixture(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Where the teacher is nearly sure of a token the student nearly rules out, a mixture of probabilities
    keeps M ≈ β there, while a "mixture" of log-probabilities is dominated by the student's tiny value:
    TRL #2202 (fixed by PR #2204) computed β·log Q + (1−β)·log P."""
    if s.family != ref.GJSD or s.param is None or not 0 < s.param < 1:
        return result("jsd_mixture", SKIP, "only for gjsd with 0 < β < 1 (no mixture at the ends)")
    sharp_s, sharp_t = 0.5 * logits(31), 0.5 * logits(32)
    sharp_t[..., 0] += 6.0  # teacher: token 0 nearly certain
    sharp_s[..., 0] -= 6.0  # student: token 0 nearly ruled out
    mask = mask_of(FULL)
    out = s.call(sharp_s, sharp_t, mask)
    if not out.ok:
        return failed_call("jsd_mixture", "the loss", out)
    value = out.value * s.to_token_mean
    target, _ = s.reference(sharp_s, sharp_t, mask)
    log_space = ref.token_mean(ref.log_space_mixture_jsd(sharp_s, sharp_t, s.param), mask)
    numbers = dict(value=value, probability_space=target, log_space=log_space)
    if close(value, target, s.tol):
        return result("jsd_mixture", PASS, f"{fmt(value)}: the probability-space mixture's {fmt(target)} (a log-space "
                      f"mixture would give {fmt(log_space)})", **numbers)
    if s.approximate and not close(value, log_space, max(s.tol, 1e-6)):
        return result("jsd_mixture", INFO, f"{fmt(value)} (a top-{s.topk} approximation) vs the probability-space "
                      f"mixture's {fmt(target)} and the log-space one's {fmt(log_space)}", **numbers)
    if close(value, log_space, max(s.tol, 1e-6)):
        return result("jsd_mixture", FAIL, f"{fmt(value)} = the log-space mixture β·log P + (1−β)·log Q's value; the "
                      f"mixture of probabilities gives {fmt(target)} (TRL #2202)", **numbers)
    return result("jsd_mixture", FAIL, f"{fmt(value)} matches neither the probability-space mixture {fmt(target)} "
                  f"nor the log-space one {fmt(log_space)}", **numbers)


# ---------------------------------------------------------------------------------------------------------
# Masks and reductions (the loss's own outputs, no conversion).


def case_masking(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    mask = mask_of(WITH_EMPTY_ROW)
    garbage_s = torch.where(mask[..., None], z_s, 5.0 * logits(41))
    garbage_t = torch.where(mask[..., None], z_t, 5.0 * logits(42))
    clean, dirty = s.call(z_s, z_t, mask), s.call(garbage_s, garbage_t, mask)
    for out in (clean, dirty):
        if not out.ok:
            return failed_call("masking", "with a ragged mask the loss", out)
    problems = []
    if not close(clean.value, dirty.value, s.tol):
        problems.append(f"the value moved from {fmt(clean.value)} to {fmt(dirty.value)}")
    if not grads_close(dirty.grad[mask], clean.grad[mask], s.tol):
        problems.append("the gradient at counted positions moved")
    leak = float(dirty.grad[~mask].abs().max())
    if leak > s.tol * max(float(clean.grad.abs().max()), 1e-3):
        problems.append(f"masked positions get gradient (max |g| {leak:.3g})")
    if problems:
        return result("masking", FAIL, "new logits at masked positions: " + "; ".join(problems),
                      clean=clean.value, dirty=dirty.value)
    return result("masking", PASS, f"new logits at the {int((~mask).sum())} masked positions (a whole row among "
                  "them) change nothing; their gradient is 0", value=clean.value)


def case_all_masked(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Liger #769 (a NaN loss from LigerFusedLinearJSDLoss) and the 0/0 of a mean over no tokens: an
    all-masked micro-batch (a fully truncated completion) must not poison training."""
    out = s.call(z_s, z_t, torch.zeros(B, T, dtype=torch.bool))
    if not out.ok:
        return failed_call("all_masked", "on an all-masked batch the loss", out)
    if not math.isfinite(float(out.value)) or not bool(torch.isfinite(out.grad).all()):
        return result("all_masked", FAIL, f"an all-masked batch gives {fmt(out.value)}"
                      + ("" if bool(torch.isfinite(out.grad).all()) else " and a non-finite gradient")
                      + " (0/0 or log 0 × 0: Liger #769)", value=out.value)
    if out.detached:
        return result("all_masked", INFO, f"{fmt(out.value)}, a constant with no autograd graph: loss.backward() "
                      "raises on it, and DeepSpeed ZeRO needs a loss connected to the model (TRL PR #5570)",
                      value=out.value)
    if float(out.value) != 0.0:
        return result("all_masked", INFO, f"{fmt(out.value)} (finite, not 0): state it where the loss is documented",
                      value=out.value)
    return result("all_masked", PASS, "0 with a finite (zero) gradient", value=out.value)


def _split_case(name: str, s: Setting, z_s: Tensor, z_t: Tensor, splits: tuple[tuple[int, ...], ...], what: str) -> CaseResult:
    mask = mask_of(RAGGED)
    whole = s.call(z_s, z_t, mask)
    if not whole.ok:
        return failed_call(name, "on the whole batch the loss", whole)
    N = int(mask.sum())
    combined, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(z_s)
    counts = []
    for rows in splits:
        idx = torch.tensor(rows)
        n = int(mask[idx].sum())
        counts.append(n)
        part = s.call(z_s[idx], z_t[idx], mask[idx])
        if not part.ok:
            return failed_call(name, f"on rows {list(rows)} the loss", part)
        combined = combined + part.value * n / N
        grad[idx] += part.grad * n / N
    numbers = dict(whole=whole.value, combined=combined, tokens=counts)
    parts = " and ".join(str(c) for c in counts)
    grads_match = grads_close(grad, whole.grad, s.tol)
    if s.stochastic and close(combined, whole.value, s.tol):
        return result(name, PASS, f"{what} of {parts} tokens, weighted by tokens: {fmt(combined)} == one batch "
                      f"{fmt(whole.value)}; gradients not compared (the loss draws random numbers)", **numbers)
    if close(combined, whole.value, s.tol) and grads_match:
        return result(name, PASS, f"{what} of {parts} tokens, weighted by tokens: {fmt(combined)} == one batch "
                      f"{fmt(whole.value)}, gradients equal", **numbers)
    cause = f"; the loss is normalised as a {s.normaliser}" if s.normaliser != "token mean" else ""
    value_part = ("values equal" if close(combined, whole.value, s.tol)
                  else f"{fmt(combined)} vs one batch {fmt(whole.value)} ({_percent(combined, whole.value)})")
    grad_part = "gradients equal" if grads_match else "gradients differ"
    return result(name, FAIL, f"{what} of {parts} tokens, weighted by tokens: {value_part}, {grad_part}{cause} "
                  "(TRL #4719, ms-swift PR #10165)", **numbers)


def case_accumulation(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Gradient accumulation: micro-batch losses, each a mean over its own tokens, weighted by their token
    counts (or, the same, `reduction="sum"` over the global count), equal the big batch's mean. A loss that
    normalises per sequence or per batch cannot be combined this way (TRL #4719, ms-swift PR #10165)."""
    return _split_case("accumulation", s, z_s, z_t, MICRO_BATCHES, "micro-batches")


def case_ranks(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Data parallelism: ranks hold interleaved rows with very unequal token counts (9 and 2); each rank's
    loss scaled by R·n_r/N before DDP's gradient average gives the one-process batch (ms-swift PR #10165)."""
    return _split_case("ranks", s, z_s, z_t, RANKS, "two ranks")


# ---------------------------------------------------------------------------------------------------------
# Temperature, extremes, gradients.


def case_temperature(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """The distillation temperature divides both sides' logits: loss(z_s, z_t; τ) = reference(z_s/τ, z_t/τ),
    with no τ² factor (kdlab's contract). TRL PR #5731 fixed a GKD path that used the generation-sampling
    temperature for the divergence and added 0.5·CE(student, labels) (Liger's default weights)."""
    if not s.adapter.takes_temperature:
        return result("temperature", SKIP, "the loss takes no temperature argument (name it with --temperature-arg)")
    mask = mask_of(FULL)
    hot, cold = s.call(z_s, z_t, mask, temperature=TEMPERATURE), s.call(z_s, z_t, mask, temperature=1.0)
    for out in (hot, cold):
        if not out.ok:
            return failed_call("temperature", "the loss", out)
    value = hot.value * s.to_token_mean
    target, _ = s.reference(z_s, z_t, mask, temperature=TEMPERATURE)
    numbers = dict(value=value, reference=target)
    if close(value, target, s.tol):
        return result("temperature", PASS, f"at τ={TEMPERATURE:g}: {fmt(value)} == reference on logits/τ "
                      f"{fmt(target)}", **numbers)
    if s.approximate:
        return result("temperature", INFO, f"at τ={TEMPERATURE:g}: {fmt(value)} vs full reference {fmt(target)} "
                      f"({_percent(value, target)}): a top-{s.topk} approximation", **numbers)
    if close(hot.value, cold.value, s.tol):
        why = (f"the temperature argument changes nothing ({fmt(value)} at τ=1 and τ={TEMPERATURE:g}): another "
               "temperature (the sampling one?) is used (TRL PR #5731)")
    elif close(value, TEMPERATURE ** 2 * target, s.tol):
        why = "it is τ²·reference (Hinton's gradient rescaling): state it, or drop it"
    else:
        why = diagnose(s, value, z_s, z_t, TEMPERATURE)
    return result("temperature", FAIL, f"at τ={TEMPERATURE:g}: {fmt(value)} != reference on logits/τ {fmt(target)}"
                  + (f": {why}" if why else ""), **numbers)


def extreme_inputs(s: Setting) -> list[tuple[str, Tensor, Tensor]]:
    """Three variants of one batch, each with one hazard: logits of ±1e4 (probabilities that underflow to exactly
    0 while their log-probabilities stay finite); a −inf vocabulary column in both models (a padded entry);
    −inf entries in the teacher only (a vocabulary masked on the teacher's side), kept where the family's value
    stays finite (not for reverse KL, which is +inf where the student has mass and the teacher none)."""
    z_s, z_t = logits(51), logits(52)
    big_s, big_t = z_s.clone(), z_t.clone()
    big_s[0, 0, 2] = big_t[0, 0, 2] = 1e4  # both nearly one-hot on the same token
    big_s[1, 1, 3] = -1e4  # the student rules out a token the teacher allows
    big_t[2, 2, 4] = 1e4  # the teacher is one-hot, the student is not
    big_s[0, 3, 1], big_t[0, 3, 5] = 1e4, 1e4  # one-hot on different tokens
    padded_s, padded_t = z_s.clone(), z_t.clone()
    padded_s[..., V - 1] = padded_t[..., V - 1] = -math.inf
    variants = [("±1e4 logits", big_s, big_t), ("a −inf column in both", padded_s, padded_t)]
    teacher_only = z_t.clone()
    teacher_only[1, 0, 0] = teacher_only[2, 4, 1] = -math.inf
    if math.isfinite(float(ref.token_mean(ref.per_token(s.family, z_s, teacher_only, s.param), mask_of(FULL)))):
        variants.append(("−inf teacher entries", z_s, teacher_only))
    return variants


def case_extreme_logits(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    mask = mask_of(FULL)
    failures, passes, numbers = [], [], {}
    for described, ext_s, ext_t in extreme_inputs(s):
        out = s.call(ext_s, ext_t, mask)
        if not out.ok:
            failures.append(f"{described}: the loss {out.error}")
            continue
        value = out.value * s.to_token_mean
        target = ref.token_mean(ref.per_token(s.family, ext_s, ext_t, s.param), mask)
        numbers[described] = float(value)
        bad_grad = int((~torch.isfinite(out.grad)).sum())
        if not math.isfinite(float(value)) or bad_grad:
            bad = [] if math.isfinite(float(value)) else [f"value {fmt(value)}"]
            if bad_grad:
                bad.append(f"{bad_grad} non-finite gradient entries")
            failures.append(f"{described}: {' and '.join(bad)} (reference {fmt(target)})")
        elif close(value, target, s.tol):
            passes.append(f"{described}: {fmt(value)} == reference")
        elif s.approximate:
            passes.append(f"{described}: finite {fmt(value)} (top-{s.topk}; full reference {fmt(target)})")
        elif not s.value_ok:
            passes.append(f"{described}: finite {fmt(value)} (reference {fmt(target)}; not compared: see value)")
        else:
            failures.append(f"{described}: {fmt(value)} != reference {fmt(target)} ({_percent(value, target)})")
    if failures:
        return result("extreme_logits", FAIL, "; ".join(failures + passes) + " (0·log 0 must be 0: Liger #769)",
                      **numbers)
    return result("extreme_logits", PASS, "; ".join(passes) + "; gradients finite", **numbers)


def case_gradient(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    mask = mask_of(FULL)
    out = s.call(z_s, z_t, mask)
    if not out.ok:
        return failed_call("gradient", "the loss", out)
    grad = out.grad * s.to_token_mean
    _, g_ref = s.reference(z_s, z_t, mask)
    err = float((grad - g_ref).norm()) / float(g_ref.norm())
    cos, ratio = cosine(grad, g_ref), float(grad.norm()) / float(g_ref.norm())
    numbers = dict(relative_error=err, cosine=cos, norm_ratio=ratio)
    if out.detached:
        return result("gradient", FAIL, "no gradient: the output has no autograd path to the student logits",
                      **numbers)
    if grads_close(grad, g_ref, s.tol):
        return result("gradient", PASS, f"‖g − g_ref‖/‖g_ref‖ = {err:.1e}", **numbers)
    status = INFO if s.approximate or s.stochastic else FAIL
    note = (f": a top-{s.topk} approximation" if s.approximate else
            ": one draw of a loss that draws random numbers (its mean: expected_gradient)" if s.stochastic else "")
    return result("gradient", status, f"‖g − g_ref‖/‖g_ref‖ = {err:.3g} (cosine {cos:.4f}, norm ratio {ratio:.4g})"
                  + note, **numbers)


def case_noop(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """Atropos #456: the teacher's targets were computed and dropped before the loss, so distillation trained
    nothing. Seen from the loss: no gradient reaches the student logits although student != teacher."""
    out = s.call(z_s, z_t, mask_of(FULL))
    if not out.ok:
        return failed_call("noop", "the loss", out)
    _, g_ref = s.reference(z_s, z_t, mask_of(FULL))
    norm, scale = float(out.grad.norm()) * s.to_token_mean, float(g_ref.norm())
    if out.detached:
        return result("noop", FAIL, f"value {fmt(out.value)} but no autograd path to the student logits: training on "
                      "it changes nothing (Atropos #456)", grad_norm=0.0)
    if norm <= NOOP_FRACTION * scale:
        return result("noop", FAIL, f"gradient norm {norm:.3g} with student != teacher (reference {scale:.3g}): a "
                      "no-op (Atropos #456)", grad_norm=norm)
    return result("noop", PASS, f"gradient norm {norm:.4g} with student != teacher (reference {scale:.4g})",
                  grad_norm=norm)


def case_expected_gradient(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """A per-position divergence applied as a detached advantage on the sampled token, A_t·∇log q(a_t) with
    a_t ~ q, has expectation A_t·Σ_a ∇q(a) = 0: it cannot teach the teacher's distribution (miles #2362). A loss
    that draws random numbers is called with EXPECTED_GRADIENT_DRAWS seeds and its gradients averaged."""
    mask = mask_of(FULL)
    first = s.call(z_s, z_t, mask, seed=0)
    if not first.ok:
        return failed_call("expected_gradient", "the loss", first)
    _, g_ref = s.reference(z_s, z_t, mask)
    stochastic = s.stochastic
    draws = EXPECTED_GRADIENT_DRAWS if stochastic else 1
    total, single_norms = first.grad.clone(), float(first.grad.norm())
    for seed in range(1, draws):
        out = s.call(z_s, z_t, mask, seed=seed)
        if not out.ok:
            return failed_call("expected_gradient", f"with seed {seed} the loss", out)
        total += out.grad
        single_norms += float(out.grad.norm())
    mean = total / draws
    cos = cosine(mean, g_ref)
    shrink = float(mean.norm()) / max(single_norms / draws, 1e-300)
    how = (f"the mean gradient over {draws} seeds (the loss draws random numbers; its norm is {shrink:.3g} of one "
           "draw's)" if stochastic else "the gradient")
    numbers = dict(cosine=cos, draws=draws, stochastic=stochastic, mean_to_single_norm=shrink)
    if cos >= MIN_COSINE:
        return result("expected_gradient", PASS, f"{how}: cosine {cos:.4f} with the reference's", **numbers)
    if s.approximate:  # the full reference's direction is not a top-k loss's target: bias, or no signal?
        return result("expected_gradient", INFO, f"{how}: cosine {cos:.3g} with the full reference's: a top-{s.topk} "
                      "approximation's bias, or no signal (the suite has no top-k reference to tell)", **numbers)
    return result("expected_gradient", FAIL, f"{how}: cosine {cos:.3g} with the reference's (below {MIN_COSINE}): "
                  "no descent on the divergence in expectation (miles #2362)", **numbers)


def case_topk_bias(s: Setting, z_s: Tensor, z_t: Tensor) -> CaseResult:
    """A top-k target keeps the teacher's k largest probabilities; the divergence on it is a different quantity
    (for an f-divergence with the tail as one bucket, a lower bound: data processing). The bias is disclosed
    (DESIGN.md practice 16); it fails only when the loss claims to be exact (--claims-exact)."""
    if not s.topk:
        return result("topk_bias", SKIP, "the loss takes the full teacher distribution (no --topk)")
    mask = mask_of(FULL)
    out = s.call(z_s, z_t, mask)
    if not out.ok:
        return failed_call("topk_bias", "the loss", out)
    value, grad = out.value * s.to_token_mean, out.grad * s.to_token_mean
    target, g_ref = s.reference(z_s, z_t, mask)
    cos = cosine(grad, g_ref)
    text = (f"top-{s.topk} of V={V}: value {fmt(value)} vs full {fmt(target)} ({_percent(value, target)}), "
            f"gradient cosine {cos:.4f}")
    exact = close(value, target, s.tol) and grads_close(grad, g_ref, s.tol)
    status = FAIL if s.claims_exact and not exact else INFO
    return result("topk_bias", status, text + (" but the loss claims to be exact" if status == FAIL else ""),
                  value=value, reference=target, cosine=cos)


CASE_FUNCTIONS = {
    "normalisation": case_normalisation, "value": case_value, "identical": case_identical,
    "stationary": case_stationary, "endpoints": case_endpoints, "jsd_mixture": case_jsd_mixture,
    "masking": case_masking, "all_masked": case_all_masked, "accumulation": case_accumulation, "ranks": case_ranks,
    "temperature": case_temperature, "extreme_logits": case_extreme_logits, "gradient": case_gradient,
    "noop": case_noop, "expected_gradient": case_expected_gradient, "topk_bias": case_topk_bias,
}
assert tuple(CASE_FUNCTIONS) == tuple(CASES)


# ---------------------------------------------------------------------------------------------------------
# The suite.


def run_suite(adapter: Adapter, family: str, param: float | None = None, *, target: str = "",
              topk: int | None = None, claims_exact: bool = False, tolerance: float | None = None) -> Report:
    """Run every case on ``adapter``'s loss as a member of ``family`` (with ``param``: β for gjsd, α for the
    skew KLs; the family's default when None). Raises ConformanceInputError when the loss cannot be called
    at all on an ordinary batch (the CLI's exit code 2). ``tolerance`` overrides the output dtype's."""
    if family not in ref.FAMILIES:
        raise ConformanceInputError(f"family={family!r}; allowed: {'|'.join(ref.FAMILIES)}")
    fam = ref.FAMILIES[family]
    if fam.param is None:
        param = None
    elif param is None:
        param = fam.default
    elif not 0.0 <= param <= 1.0:
        raise ConformanceInputError(f"{fam.param}={param}; allowed: 0 <= {fam.param} <= 1")
    s = Setting(adapter, family, param, topk, claims_exact)
    z_s, z_t = logits(1), logits(2)
    assumptions = list(adapter.assumptions)
    probe = s.call(z_s, z_t, mask_of(RAGGED))
    if not probe.ok:  # float64 refused (a kernel for float32 only?): try float32 before giving up
        s.input_dtype = torch.float32
        retry = s.call(z_s, z_t, mask_of(RAGGED))
        if not retry.ok:
            raise ConformanceInputError(f"calling {target or 'the loss'} as the {adapter.name} adapter does "
                                        f"{probe.error}")
        assumptions.append(f"float64 inputs refused ({probe.error}); the suite ran on float32 inputs")
        probe = retry
    # The loss's output dtype sets the tolerance: a loss that computes in float32 cannot match to 1e-9.
    out_dtype = probe.dtype
    s.tol = tolerance if tolerance is not None else TOLERANCE.get(out_dtype, 1e-2)
    if out_dtype != torch.float64:
        assumptions.append(f"the loss returns {str(out_dtype).replace('torch.', '')} on "
                           f"{str(s.input_dtype).replace('torch.', '')} inputs: tolerance {s.tol:g}")
    again = s.call(z_s, z_t, mask_of(RAGGED), seed=1)
    s.stochastic = again.ok and not (torch.equal(again.value, probe.value) and torch.equal(again.grad, probe.grad))
    if s.stochastic:
        assumptions.append("the loss draws random numbers (seed 0 and seed 1 differ): every call is seeded (0 unless "
                           "said), gradients of splits are not compared, expected_gradient averages "
                           f"{EXPECTED_GRADIENT_DRAWS} seeds")
    cases = []
    for name, fn in CASE_FUNCTIONS.items():
        cases.append(fn(s, z_s, z_t))
        if name == "normalisation" and s.normaliser != "token mean":
            assumptions.append(f"measured normalisation: {s.normaliser}; value-type cases rescale the loss by "
                               f"{s.to_token_mean:.4g} on a full batch")
    params = {fam.param: param} if fam.param else {}
    return Report(target, adapter.name, family, params, str(out_dtype).replace("torch.", ""), s.tol, assumptions, cases)


def table(report: Report) -> str:
    """The report as text: a header, the assumptions, one row per case, the counts."""
    head = f"{report.target or 'loss'}: adapter {report.adapter}, family {report.family}"
    head += "".join(f", {k}={v:g}" for k, v in report.param.items())
    head += f"; output {report.dtype}, tolerance {report.tolerance:g}"
    lines = [head] + [f"  assumed: {a}" for a in report.assumptions]
    width = max(len(c.name) for c in report.cases)
    lines += [f"{c.name:<{width}}  {c.status}  {c.reason}" for c in report.cases]
    counts = report.counts()
    lines.append(f"{len(report.cases)} cases: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]))
    return "\n".join(lines)
