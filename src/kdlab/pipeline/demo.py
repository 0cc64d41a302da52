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
from kdlab.pipeline.study import Condition

CONFIGS = Path(__file__).resolve().parent / "demo_configs"


def demo_config(quick: bool = False) -> RunConfig:
    return load_config(CONFIGS / ("quick.yaml" if quick else "demo.yaml"))


def demo_conditions(cfg: RunConfig) -> list[Condition]:
    n = cfg.stage2.offline.num_prompts

    def offline(prompts: int, gens: int, group: str, name: str | None = None) -> Condition:
        return Condition(name or f"offline-{prompts}x{gens}", group,
                         ["stage2.regime=offline", f"stage2.offline.num_prompts={prompts}",
                          f"stage2.offline.generations_per_prompt={gens}"])

    return [
        offline(n, 1, "regimes", name="offline"),
        Condition("online_teacher", "regimes", ["stage2.regime=online_teacher"]),
        Condition("online_student", "regimes", ["stage2.regime=online_student"]),
        offline(n // 2, 2, "diversity"),
        offline(n // 5, 5, "diversity"),
        offline(n // 5, 1, "generations"),
        offline(n // 5, 2, "generations"),
    ]


# The ordered comparisons of finding 3: (label, [condition names in the order the paper predicts
# an increasing golden rise]).
DIVERSITY_ORDER = lambda n: ["offline", f"offline-{n // 2}x2", f"offline-{n // 5}x5"]  # noqa: E731
GENERATIONS_ORDER = lambda n: [f"offline-{n // 5}x5", f"offline-{n // 5}x2", f"offline-{n // 5}x1"]  # noqa: E731
