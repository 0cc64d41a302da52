"""Protocol G2 (issue 21, item 4; docs/LOG.md): a loss truncated to the teacher's top token, injected into kdlab worlds
that have an oracle, so the entropy-collapse alarm's firing and its lead over the golden detector can be measured.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/detection/alarms_lead.py [--out /tmp/kdlab-heldout/alarms-lead2]

The runs are Protocol G's "top-1" condition (configs/studies/alarms-lead-demo.yaml and alarms-lead-paper.yaml:
the demo world and world 200, offline 768 x 1, top-1 cached targets, drift panel on, seeds 0 and 1) with one bug
injected in this process: the cached top-k log-probs are renormalised over the k kept tokens, dropping kdlab's
rest bucket (what a truncated top-k loss does; verl #5041, miles #2362). With k = 1 the teacher's top token gets
probability 1, so forward KL becomes cross-entropy on the teacher's argmax. kdlab itself is not changed: the bug
lives in this script only (`truncated_from_logits`). The uninjected runs are Protocol G's own top-1 runs.
Then `bench/detection/alarm_rates.py OUT` reads the alarms and their lead over the golden detector.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ("alarms-lead-demo", "alarms-lead-paper")
CONDITION = "top-1"


def truncated_from_logits(cls, teacher_logits_BxTxV, k: int, temperature: float = 1.0):
    """The injected bug: top-k log-probs renormalised over the top k (no rest bucket)."""
    z = teacher_logits_BxTxV.float() / temperature
    top = z.topk(k, dim=-1)
    return cls(top.indices, top.values - torch.logsumexp(top.values, dim=-1, keepdim=True))


def rerun_condition(study: str, condition: str, name: str, seeds=None, out: Path | None = None) -> None:
    """A study's `condition` run again in this process (where a bug has been injected) as condition `name`, for
    `seeds` (default the study's), into `<out or the study's out>/<world>/<name>/seed-N`; finished runs are kept."""
    from kdlab import record
    from kdlab.pipeline.distill import run
    from kdlab.pipeline.phase import load_phase_spec, study_cache, world_configs
    from kdlab.pipeline.study import study_configs

    spec = load_phase_spec(ROOT / "configs" / "studies" / f"{study}.yaml")
    for w in world_configs(spec):
        conds = [c for c in w.conditions if c.name == condition]
        where = (out / w.directory.name) if out is not None else w.directory
        for cfg in study_configs(w.config, conds, list(seeds or spec.seeds), where, cache_dir=study_cache(spec)):
            cfg = cfg.model_copy(update={"name": name, "threads": None})
            cfg.output_dir = str(where / name / f"seed-{cfg.seed}")
            if (Path(cfg.output_dir) / record.DONE).exists():
                continue
            print(f"{w.directory.name}: seed {cfg.seed}", flush=True)
            run(cfg, log=lambda m: None, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kdlab-heldout/alarms-lead2"))
    a = ap.parse_args()
    from kdlab.losses import SparseTarget

    SparseTarget.from_logits = classmethod(truncated_from_logits)  # the injection
    for study in STUDIES:
        rerun_condition(study, CONDITION, "top-1-truncated", out=a.out)


if __name__ == "__main__":
    main()
