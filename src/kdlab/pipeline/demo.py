"""The embedded demo: the teacher-hacking study (Tiapkin et al. 2025) on the synthetic world.

Conditions, all on the same budget (steps × batch size × response length):
1. regimes      `offline` (N prompts × 1 generation), `online_teacher`, `online_student`;
2. diversity    at a fixed dataset size N: N×1, N/2×2, N/5×5;
3. generations  at fixed prompts N/5: ×1, ×2, ×5 (N/5×5 is shared with the diversity group).
Every condition runs with several seeds (seeds vary the data and sampling; the world is fixed).
"""

from __future__ import annotations

from pathlib import Path

from kdlab.config import RunConfig, load_config
from kdlab.data.regimes import OFFLINE, ONLINE_STUDENT, ONLINE_TEACHER
from kdlab.pipeline.study import Condition

CONFIGS = Path(__file__).resolve().parent / "demo_configs"


def demo_config(quick: bool = False) -> RunConfig:
    return load_config(CONFIGS / ("quick.yaml" if quick else "demo.yaml"))


def demo_conditions(cfg: RunConfig) -> list[Condition]:
    n = cfg.stage2.offline.num_prompts

    def offline(prompts: int, gens: int, group: str, name: str | None = None) -> Condition:
        return Condition(name or f"offline-{prompts}x{gens}", group,
                         [f"stage2.regime={OFFLINE}", f"stage2.offline.num_prompts={prompts}",
                          f"stage2.offline.generations_per_prompt={gens}"])

    return [
        offline(n, 1, "regimes", name=OFFLINE),
        Condition(ONLINE_TEACHER, "regimes", [f"stage2.regime={ONLINE_TEACHER}"]),
        Condition(ONLINE_STUDENT, "regimes", [f"stage2.regime={ONLINE_STUDENT}"]),
        offline(n // 2, 2, "diversity"),
        offline(n // 5, 5, "diversity"),
        offline(n // 5, 1, "generations"),
        offline(n // 5, 2, "generations"),
    ]


# The ordered comparisons of finding 3: (label, [condition names in the order the paper predicts
# an increasing golden rise]).
DIVERSITY_ORDER = lambda n: [OFFLINE, f"offline-{n // 2}x2", f"offline-{n // 5}x5"]  # noqa: E731
GENERATIONS_ORDER = lambda n: [f"offline-{n // 5}x5", f"offline-{n // 5}x2", f"offline-{n // 5}x1"]  # noqa: E731


EVIDENCE = CONFIGS / "evidence.json"


def attribution_lines(assessment, offline_conditions: list[str]) -> list[str]:
    """The demo's attribution paragraph: the world's ordering, then per offline condition the teacher
    floor and the iso-proxy gap against online_teacher (kdlab.analysis.worlds.assess_runs)."""
    a = assessment
    lines = []
    if a.teacher_golden is not None and a.online_best is not None:
        if a.ordering and a.ordering["holds"]:
            lines.append(f"Ordering: the paper's. The teacher's golden {a.teacher_golden:.2f} stays below every student's; "
                         f"online students approach it (best {a.online_best:.2f}).")
        elif a.teacher_golden > a.online_best:
            lines.append(f"Ordering: NOT the paper's. The teacher's golden is {a.teacher_golden:.2f} nats/response, but online "
                         f"students reach {a.online_best:.2f}: the students end closer to the truth than their teacher. "
                         "This is case (i): a golden rise here can be a student converging towards a teacher worse than "
                         "itself, whatever the data. The iso-proxy gap below separates the data regime's own cost (ii).")
        else:
            reasons = "; ".join((a.ordering or {}).get("reasons") or [])
            lines.append(f"Ordering: not the paper's ({reasons}).")
    for name in offline_conditions:
        c = a.conditions.get(name)
        if c is None:
            continue
        gap = c.get("iso_proxy_gap") or {}
        floor = c.get("teacher_floor_crossed")
        text = f"  {name}: golden below the teacher's in {floor}/{c['seeds']} seeds" if floor is not None else f"  {name}:"
        if gap.get("gap_end") is not None:
            se = f" ± {gap['gap_end_se']:.2f}" if gap.get("gap_end_se") else ""
            text += (f"; iso-proxy gap {gap['gap_end']:+.2f}{se} nats (golden above online_teacher's at the same proxy); "
                     f"of its golden change from the minimum to the end {gap['rise']:+.2f}, the regime adds {gap['regime_part']:+.2f} and the online "
                     f"path to the same proxy {gap['control_part']:+.2f}")
        elif gap:
            text += f"; iso-proxy gap: {gap.get('reason')}"
        lines.append(text)
    return lines


def evidence_lines() -> list[str]:
    """Recorded robustness numbers (pre-registered held-out world seeds, the phase map) shipped with
    the demo: measured by the commands they name, not by this demo run."""
    import json

    if not EVIDENCE.is_file():
        return []
    ev = json.loads(EVIDENCE.read_text())
    lines = [f"Recorded evidence ({ev['date']}; not measured by this run; reproduce with the commands named):"]
    lines += [f"  {line}" for line in ev["lines"]]
    return lines
