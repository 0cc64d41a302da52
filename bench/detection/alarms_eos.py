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

import torch

SEEDS = (0, 1, 2)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="alarms-eos", help="a study file in configs/studies (without .yaml)")
    a = ap.parse_args()
    from alarms_lead import rerun_condition  # this script's folder is on sys.path when it runs

    from kdlab.pipeline import distill

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

    distill.build_offline_dataset = never_ends  # the injection
    rerun_condition(a.study, "offline", "never-ends", seeds=SEEDS)


if __name__ == "__main__":
    main()
