"""kdlab.integrations: teacher-hacking monitoring inside other trainers.

`TeacherHackingMonitor` is a `transformers.TrainerCallback` for `Trainer`, TRL's `SFTTrainer`,
`GKDTrainer` and `DistillationTrainer` (see `kdlab.integrations.monitor`).
"""

from kdlab.integrations.monitor import SwappableDataset, TeacherHackingMonitor, TeacherHackingWarning, log_spaced_steps

__all__ = ["SwappableDataset", "TeacherHackingMonitor", "TeacherHackingWarning", "log_spaced_steps"]
