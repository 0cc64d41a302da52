"""Named failure-mode alarms on the drift panel (issue 21; the panel: kdlab.metrics.drift).

Each alarm reads a metrics table's drift columns, never models, and fires at the first evaluation of a run
of `persist` consecutive evaluations where its effect passes both a size threshold and a significance test
(the effect over its standard error, SEs of independent samples combined in quadrature):

    length_inflation   the student's responses are longer than the teacher's: ratio > length_ratio
                       (StableOPD; Bittensor SN97's length veto at 3-10x)
    eos_mismatch       student samples reach the length limit without EOS more often than the teacher's, by
                       more than eos_gap (ms-swift #9526: teacher and student with different EOS tokens)
    entropy_collapse   the student's per-token entropy along the teacher's samples falls below
                       entropy_ratio x the teacher's
    repetition_collapse  the student repeats n-grams more than the teacher, by more than repetition_gap
    exposure_gap_growth  the exposure gap (reverse KL on student samples minus forward KL on teacher samples)
                       rises above its running minimum by more than exposure_rise nats per token

The thresholds below were fixed before any run was looked at (docs/LOG.md, session 7) from what the
literature calls a failure (a 1.5x length ratio, a quarter of the samples without EOS, half the teacher's
entropy); their false-alarm rates on healthy runs are measured, not assumed (docs/LOG.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from kdlab import record

LENGTH_INFLATION = "length_inflation"
EOS_MISMATCH = "eos_mismatch"
ENTROPY_COLLAPSE = "entropy_collapse"
REPETITION_COLLAPSE = "repetition_collapse"
EXPOSURE_GAP_GROWTH = "exposure_gap_growth"

# The alarms by name (the keys of their verdicts in `kdlab detect --json`, summary.json and the monitor):
# name -> what it means.
ALARMS: dict[str, str] = {
    LENGTH_INFLATION: "the student's responses are much longer than the teacher's",
    EOS_MISMATCH: "the student does not end its responses where the teacher does (EOS)",
    ENTROPY_COLLAPSE: "the student's next-token entropy has collapsed below the teacher's",
    REPETITION_COLLAPSE: "the student repeats itself far more than the teacher",
    EXPOSURE_GAP_GROWTH: "the student is drifting to prefixes the teacher never visits (exposure gap rising)",
}
# Alarms measured not to be specific: shown, never acted on (the monitor's stop_on_alarm skips them).
# exposure_gap_growth fired on 7 of 7 healthy kdlab runs, early, as the gap's transient (docs/LOG.md, protocol E).
EXPERIMENTAL = {EXPOSURE_GAP_GROWTH: "fired on 7 of 7 healthy runs (protocol E): not specific; shown, not acted on"}


def alarm_column(name: str) -> str:
    """The monitor's per-measurement flag of alarm `name` (1 once it has fired)."""
    return f"alarm_{name}"


@dataclass(frozen=True)
class AlarmConfig:
    z: float = 4.0  # every effect must exceed z standard errors (one-sided)
    persist: int = 2  # consecutive flagged evaluations before an alarm
    length_ratio: float = 1.5
    eos_gap: float = 0.25
    entropy_ratio: float = 0.5
    repetition_gap: float = 0.2
    exposure_rise: float = 0.1  # nats per token


@dataclass
class AlarmVerdict:
    name: str
    fired: bool
    onset_step: int | None
    value: float | None  # the effect at the onset (or at the last evaluation when it did not fire)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _col(rows: list[dict], name: str) -> np.ndarray:
    return np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows], dtype=float)


def _se(rows, name):
    return _col(rows, record.se_column(name))


def _quad(*ses: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum([np.nan_to_num(s, nan=0.0) ** 2 for s in ses], axis=0))


def _first_persistent(flags: np.ndarray, persist: int) -> int | None:
    run = 0
    for i, f in enumerate(flags):
        run = run + 1 if f else 0
        if run >= persist:
            return i - persist + 1
    return None


def _verdict(name: str, steps, effect: np.ndarray, flags: np.ndarray, cfg: AlarmConfig, what: str) -> AlarmVerdict:
    i = _first_persistent(flags, cfg.persist)
    if i is None:
        finite = effect[np.isfinite(effect)]
        last = float(finite[-1]) if finite.size else None
        return AlarmVerdict(name, False, None, last, f"quiet: {what} at the last evaluation = "
                            f"{'n/a' if last is None else f'{last:.3g}'}")
    caveat = f" [experimental: {EXPERIMENTAL[name]}]" if name in EXPERIMENTAL else ""
    return AlarmVerdict(name, True, int(steps[i]), float(effect[i]),
                        f"{what} = {effect[i]:.3g} from step {int(steps[i])} ({cfg.persist} evaluations in a row, "
                        f"beyond {cfg.z:g} SE){caveat}")


def check_alarms(rows: list[dict], config: AlarmConfig | None = None, steps=None) -> dict[str, AlarmVerdict]:
    """Every alarm whose drift columns the rows hold (rows sorted by step, as read from a metrics log; `steps`
    when the log names its step column otherwise). No drift columns: no alarms ({})."""
    cfg = config or AlarmConfig()
    if not rows or all(r.get(record.LENGTH_STUDENT) is None for r in rows):
        return {}
    steps = [int(s) for s in steps] if steps is not None else [int(r[record.STEP]) for r in rows]
    out: dict[str, AlarmVerdict] = {}
    z = cfg.z
    with np.errstate(invalid="ignore", divide="ignore"):
        ls, lt = _col(rows, record.LENGTH_STUDENT), _col(rows, record.LENGTH_TEACHER)
        ratio = ls / lt
        diff_se = _quad(_se(rows, record.LENGTH_STUDENT), _se(rows, record.LENGTH_TEACHER))
        flags = (ratio > cfg.length_ratio) & (ls - lt > z * diff_se)
        out[LENGTH_INFLATION] = _verdict(LENGTH_INFLATION, steps, ratio, flags, cfg, "length ratio student/teacher")

        if any(r.get(record.NO_EOS_STUDENT) is not None for r in rows):
            gap = _col(rows, record.NO_EOS_STUDENT) - _col(rows, record.NO_EOS_TEACHER)
            gap_se = _quad(_se(rows, record.NO_EOS_STUDENT), _se(rows, record.NO_EOS_TEACHER))
            # (The largest per-position EOS-mass gap is logged beside it but does not fire: it has no SE, and on
            # a development run it stayed above 0.25 for a student that was still learning where to end.)
            flags = (gap > cfg.eos_gap) & (gap > z * gap_se)
            out[EOS_MISMATCH] = _verdict(EOS_MISMATCH, steps, gap, flags, cfg, "excess share of samples without EOS")

        es, et = _col(rows, record.ENTROPY_STUDENT), _col(rows, record.ENTROPY_TEACHER)
        e_se = _quad(_se(rows, record.ENTROPY_STUDENT), _se(rows, record.ENTROPY_TEACHER))
        flags = (es < cfg.entropy_ratio * et) & (et - es > z * e_se)
        out[ENTROPY_COLLAPSE] = _verdict(ENTROPY_COLLAPSE, steps, es / et, flags, cfg, "entropy ratio student/teacher")

        rs, rt = _col(rows, record.REPETITION_STUDENT), _col(rows, record.REPETITION_TEACHER)
        r_se = _quad(_se(rows, record.REPETITION_STUDENT), _se(rows, record.REPETITION_TEACHER))
        flags = (rs - rt > cfg.repetition_gap) & (rs - rt > z * r_se)
        out[REPETITION_COLLAPSE] = _verdict(REPETITION_COLLAPSE, steps, rs - rt, flags, cfg,
                                            "extra repetition of the student")

        g, g_se = _col(rows, record.EXPOSURE_GAP), _se(rows, record.EXPOSURE_GAP)
        rise = np.full(len(g), np.nan)
        rise_se = np.full(len(g), np.nan)
        best, best_se = math.inf, 0.0
        for i in range(len(g)):
            if i > 0 and math.isfinite(best):
                rise[i], rise_se[i] = g[i] - best, math.hypot(np.nan_to_num(g_se[i]), best_se)
            if np.isfinite(g[i]) and g[i] < best:
                best, best_se = float(g[i]), float(np.nan_to_num(g_se[i]))
        flags = (rise > cfg.exposure_rise) & (rise > z * rise_se)
        out[EXPOSURE_GAP_GROWTH] = _verdict(EXPOSURE_GAP_GROWTH, steps, rise, flags, cfg,
                                            "exposure-gap rise over its minimum (nats/token)")
    return out
