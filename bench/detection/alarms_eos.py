"""Protocol I (issue 21, item 4; docs/LOG.md): a teacher that never ends, injected into a kdlab world with an EOS and an
oracle, so the EOS-mismatch and length-inflation alarms' firing and their lead over the golden detector can be
measured.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/detection/alarms_eos.py [--study alarms-eos-v8]

The runs are configs/studies/alarms-eos.yaml's "offline" condition (the demo world with world.synthetic.eos_token_id
0, offline 768 x 1, drift panel on) for seeds 0, 1 and 2, with one failure injected in this process: while the
offline dataset is built, the teacher's logit of the EOS is -inf, so its samples never end and its cached targets
give the EOS no mass (a teacher whose end token differs from the student's: ms-swift #9526). kdlab itself is not
changed. They go to `<study out>/<world>/never-ends/seed-N`, beside the study's own runs; then
`bench/detection/alarm_rates.py /tmp/kdlab-heldout/alarms-eos`. `--study` names another study file of the same
shape (protocol J: alarms-eos-v8, a world whose oracle ends most responses).
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="alarms-eos", help="a study file in configs/studies (without .yaml)")
    a = ap.parse_args()
    from kdlab.pipeline import distill
    from kdlab.pipeline.phase import load_phase_spec, study_cache, world_configs
    from kdlab.pipeline.study import study_configs

    original = distill.build_offline_dataset

    def never_ends(teacher, *args, eos_token_id=None, **kwargs):
        """The injection: the teacher's EOS logit at -inf while the offline set is sampled and its targets cached."""
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])

        def hook(module, inputs, logits):
            return logits.index_fill(-1, torch.tensor(eos, device=logits.device), float("-inf"))

        # on the lm_head: kdlab's decoding loop calls the model's submodules, not its forward
        handle = teacher.hf.get_output_embeddings().register_forward_hook(hook)
        try:
            return original(teacher, *args, eos_token_id=eos_token_id, **kwargs)
        finally:
            handle.remove()

    distill.build_offline_dataset = never_ends
    spec = load_phase_spec(ROOT / "configs" / "studies" / f"{a.study}.yaml")
    for w in world_configs(spec):
        conds = [c for c in w.conditions if c.name == "offline"]
        for cfg in study_configs(w.config, conds, list(SEEDS), w.directory, cache_dir=study_cache(spec)):
            cfg = cfg.model_copy(update={"name": "never-ends", "threads": None})
            cfg.output_dir = str(w.directory / "never-ends" / f"seed-{cfg.seed}")
            if (Path(cfg.output_dir) / "done.json").exists():
                continue
            print(f"{w.directory.name}: seed {cfg.seed}", flush=True)
            distill.run(cfg, log=lambda m: None, progress=False)


if __name__ == "__main__":
    main()
