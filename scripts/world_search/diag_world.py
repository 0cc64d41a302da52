"""Diagnose a built world: golden of the oracle itself (must be 0), teacher golden on its own
stage-1 training prompts vs held-out prompts, teacher CE on held-out oracle samples."""
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from safetensors.torch import load_file
from kdlab.models import LM
from kdlab.metrics import ReferenceCache, sequence_fkl
from kdlab.seeding import generator_for
root = Path(sys.argv[1])
oracle, teacher = LM.load(root / "oracle"), LM.load(root / "teacher")
student = LM.load(root / "student_init")
p = load_file(str(root / "prompts.safetensors"))
R = 16
for pool in ("stage1", "eval"):
    ids = p[f"{pool}.ids"][:512]; mask = p[f"{pool}.mask"][:512].bool()
    cache = ReferenceCache.build(oracle, ids, mask, generator=generator_for(123, pool), samples_per_prompt=1, max_new_tokens=R, batch_size=256)
    for name, lm in (("oracle", oracle), ("teacher", teacher), ("student", student)):
        est = sequence_fkl(lm, cache, batch_size=256)
        print(pool, name, round(est.mean, 3), "+-", round(est.se, 3), flush=True)
