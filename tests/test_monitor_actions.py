"""The monitor's `on_hacking` (issue 20, item 2): warn, stop (the old `stop_on_hacking`), or a hook that changes
the training, in a plain transformers Trainer on tiny models with a detector that fires at a known measurement."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.integrations import SwappableDataset, TeacherHackingMonitor, TeacherHackingWarning
from test_monitor import _FiresAt

OLD, FRESH = range(0, 6), range(6, 12)  # token ranges of the original data and of the "fresh teacher samples"


def _rows(g, tokens, n=64):
    data = torch.randint(tokens.start, tokens.stop, (n, 8), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in data]


def _trainer(tmp_path, monitor, seen, steps=30):
    """A plain Trainer on 64 sequences of tokens 0-5 in a SwappableDataset; `seen` records, for every batch the
    dataloader fetches, the trainer's step at that moment and whether all its tokens are fresh ones."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    train = SwappableDataset(_rows(torch.Generator().manual_seed(0), OLD))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=100, remove_unused_columns=False)
    trainer = Trainer(model=student, args=args, train_dataset=train)

    def collate(features):
        batch = default_data_collator(features)
        ids = batch["input_ids"]
        seen.append((trainer.state.global_step, bool((ids >= FRESH.start).all()), bool((ids < OLD.stop).all())))
        return batch

    trainer.data_collator = collate
    monitor.attach(trainer)
    return trainer


def _monitor(**kw):
    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    torch.manual_seed(1)
    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    prompts = torch.randint(0, 12, (8, 3), generator=torch.Generator().manual_seed(1))
    return TeacherHackingMonitor(teacher, (prompts, torch.ones_like(prompts, dtype=torch.bool)), max_new_tokens=4,
                                 num_points=10, detect_proxy=_FiresAt(n=3, onset_index=1), **kw)


def test_a_hook_swaps_the_training_data_for_fresh_samples_and_is_logged(tmp_path):
    calls = []
    fresh = _rows(torch.Generator().manual_seed(2), FRESH)

    def refresh(trainer, monitor, verdict):
        calls.append((trainer.state.global_step, verdict["detector"], verdict["onset_step"]))
        trainer.train_dataset.swap(fresh)
        return {"swapped_rows": len(fresh)}

    seen = []
    monitor = _monitor(on_hacking=refresh)
    trainer = _trainer(tmp_path, monitor, seen)
    with pytest.warns(TeacherHackingWarning, match="Calling the on_hacking hook refresh"):
        trainer.train()
    later = [r["step"] for r in monitor.history if r["step"] > 0]
    fired_at = later[2]  # the 3rd measurement after step 0
    assert calls == [(fired_at, "proxy_deviation", later[1])]
    assert trainer.state.global_step == 30, "a hook does not stop training"
    # Ground truth from the dataloader's side: every batch fetched before the hook ran holds old tokens only,
    # every batch fetched after it fresh tokens only. Batches are consumed in the order they are fetched (the
    # i-th trains step i + 1); accelerate had fetched one ahead, so fresh data trains steps fired_at + 2 onwards.
    assert all(old for step, _, old in seen if step < fired_at)
    assert all(new for step, new, _ in seen if step >= fired_at)
    assert [i + 1 for i, (_, new, _) in enumerate(seen[:30]) if new] == list(range(fired_at + 2, 31))
    rows = [json.loads(line) for line in (tmp_path / "t" / "teacher_hacking_monitor.jsonl").read_text().splitlines()]
    acted = [r for r in rows if "hacking_action" in r]
    assert [(r["step"], r["hacking_action"], r["hacking_action_detail"]) for r in acted] == [
        (fired_at, "refresh", {"swapped_rows": 64})]


@pytest.mark.parametrize("how", [dict(on_hacking="stop"), dict(stop_on_hacking=True)])
def test_stop_and_its_older_spelling_stop_and_restore(tmp_path, how):
    from kdlab.metrics import sequence_fkl
    from kdlab.models import LM

    seen = []
    monitor = _monitor(**how)
    trainer = _trainer(tmp_path, monitor, seen)
    with pytest.warns(TeacherHackingWarning, match="Training stopped; the weights of step"):
        trainer.train()
    later = [r["step"] for r in monitor.history if r["step"] > 0]
    assert trainer.state.global_step == later[2] < 30 and monitor.on_hacking == "stop" and monitor.keep_best
    best = max(r["step"] for r in monitor.history if r["step"] < later[1])
    row = next(r for r in monitor.history if r["step"] == best)
    assert sequence_fkl(LM(trainer.model), monitor.caches["proxy"]).mean == pytest.approx(row["proxy_fkl"], rel=1e-5)
    assert monitor.history[-1]["hacking_action"] == "stop"


def test_warn_is_the_default_and_wrong_settings_are_refused(tmp_path):
    seen = []
    monitor = _monitor()
    trainer = _trainer(tmp_path, monitor, seen, steps=12)
    with pytest.warns(TeacherHackingWarning, match="teacher hacking detected"):
        trainer.train()
    assert monitor.on_hacking == "warn" and not monitor.keep_best and trainer.state.global_step == 12
    assert [r.get("hacking_action") for r in monitor.history if "hacking_action" in r] == ["warn"]
    with pytest.raises(ValueError, match="must be one of 'warn', 'stop'"):
        _monitor(on_hacking="restart")
    with pytest.raises(ValueError, match="disagree"):
        _monitor(on_hacking="warn", stop_on_hacking=True)
    with pytest.raises(ValueError, match="same length"):
        SwappableDataset([1, 2]).swap([1])
