"""The stage-2 data regimes: one table, `REGIMES`, declares each regime's name and what it is.

Torch-free, so that the config (`stage2.regime`, `stage2.mixed.other`) and the analysis take their
allowed values from it; adding a regime is a line here and its batch source in kdlab.data.sources.
"""

from __future__ import annotations

from dataclasses import dataclass

MINILLM = "minillm"  # kdlab.losses.names.MINILLM (not imported: the analysis imports this table without the losses)

OFFLINE = "offline"
ONLINE_TEACHER = "online_teacher"
ONLINE_STUDENT = "online_student"
MIXED = "mixed"
TEACHER_MIXED = "teacher_mixed"


@dataclass(frozen=True)
class Regime:
    online: bool  # fresh samples every step, no dataset reused (mixed: at least its on-policy share)
    on_policy: bool  # some batches are sampled from the current student
    mixture: bool  # mixes on-policy batches with another regime's (stage2.mixed)
    description: str
    loss: str | None = None  # the one loss its samples are drawn for (None: any token-level loss)


REGIMES: dict[str, Regime] = {
    OFFLINE: Regime(online=False, on_policy=False, mixture=False, description=(
        "a fixed dataset of num_prompts x generations_per_prompt teacher samples, made once and reused for "
        "many epochs")),
    ONLINE_TEACHER: Regime(online=True, on_policy=False, mixture=False, description=(
        "fresh teacher samples for every batch")),
    ONLINE_STUDENT: Regime(online=True, on_policy=True, mixture=False, description=(
        "fresh student samples for every batch (on-policy)")),
    MIXED: Regime(online=True, on_policy=True, mixture=True, description=(
        "a fraction lmbda of batches on-policy, the rest from stage2.mixed.other (GKD-style)")),
    TEACHER_MIXED: Regime(online=True, on_policy=True, mixture=False, description=(
        "fresh samples drawn token by token from teacher_alpha x teacher + (1 - teacher_alpha) x student "
        "(MiniLLM's teacher-mixed sampling), with each token's log-prob under that mixture"), loss=MINILLM),
}

ONLINE_REGIMES = tuple(name for name, r in REGIMES.items() if r.online)
# The regimes that can supply the off-policy share of a mixture (stage2.mixed.other).
OFF_POLICY_REGIMES = tuple(name for name, r in REGIMES.items() if not r.on_policy)
# The single regimes that fresh data comes from, for any loss: an online control condition (kdlab study, the demo).
CONTROL_REGIMES = tuple(name for name, r in REGIMES.items() if r.online and not r.mixture and r.loss is None)
