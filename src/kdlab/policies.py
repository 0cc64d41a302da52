"""The stage-2 controller's names (issue 20): its policies and its triggers, one table each.

Torch-free and numpy-free, so that the config (`stage2.controller.policy`, `.trigger`) takes its allowed
values from here without importing anything heavy; the controller itself is
`kdlab.pipeline.controller`. Adding a policy is a line here and its branch in `Controller.act`.
"""

from __future__ import annotations

OFF = "off"
REFRESH = "refresh"
DIVERSIFY = "diversify"
MIX = "mix"
STOP = "stop"

# name -> what the controller does when its trigger fires
POLICIES: dict[str, str] = {
    OFF: "no controller: the run is exactly what it was before the controller existed",
    REFRESH: "replace refresh_fraction of the offline dataset's sequences with fresh teacher samples on the same "
             "prompts (a new random stream), within extra_teacher_samples",
    DIVERSIFY: "replace refresh_fraction of the offline dataset's sequences with fresh teacher samples on prompts of "
               "the stage-2 pool that are not in the dataset (one sample each), within extra_teacher_samples",
    MIX: "switch to a mixture: a fraction mix_lmbda of the batches on-policy (student samples), the rest from the "
         "current source",
    STOP: "roll the student back to its weights at the last evaluation at or before the detector's onset and end "
          "the run",
}
# The policies that change the offline dataset (they need one, and spend extra teacher samples).
DATA_POLICIES = (REFRESH, DIVERSIFY)

PROXY = "proxy"
GOLDEN = "golden"
ANY = "any"

# name -> which detectors can fire the controller
TRIGGERS: dict[str, str] = {
    PROXY: "the oracle-free proxy-only detector (stage2.controller.proxy_detector) on the curve so far",
    GOLDEN: "the golden detector (hacking in the paper's sense) on the curve so far; needs an oracle",
    ANY: "either; when both fire at one evaluation, the one with the earlier onset (the golden one on a tie)",
}

# The proxy-only detectors the trigger can use. These are keys of kdlab.analysis.detectors.DETECTORS,
# spelled here because importing that module would pull numpy and scipy into the config's import;
# tests/test_tables.py checks that they are the table's names.
PROXY_DETECTORS = ("proxy_deviation", "proxy_sequential")
