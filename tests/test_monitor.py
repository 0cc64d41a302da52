"""TeacherHackingMonitor inside real trainers: TRL's GKDTrainer (the example script) and a plain Trainer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.integrations import TeacherHackingMonitor, TeacherHackingWarning, log_spaced_steps
from kdlab.metrics import sequence_fkl
from kdlab.models import LM

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("monitor_gkd", ROOT / "examples" / "monitor_gkd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monitor_inside_trl_gkd_trainer(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("tensorboard")
    out = tmp_path / "gkd"
    trainer, monitor = _example().main(["--out", str(out), "--steps", "12", "--tiny-oracle", "--eval-prompts", "16",
                                        "--num-points", "8", "--report-to", "tensorboard"])
    steps = log_spaced_steps(12, 8)
    assert [r["step"] for r in monitor.history] == steps
    # The last measurement is the student the trainer ends with, measured against the cached teacher.
    final = sequence_fkl(LM(trainer.model), monitor.caches["proxy"])
    assert monitor.history[-1]["proxy_fkl"] == pytest.approx(final.mean, rel=1e-5)
    assert monitor.history[-1]["proxy_fkl"] < monitor.history[0]["proxy_fkl"], "GKD must approach the teacher"
    assert all(r["golden_fkl"] > 0 and r["golden_fkl_se"] > 0 for r in monitor.history)
    # Through the trainer's own loggers: its log history and its TensorBoard event files.
    logged = [h["step"] for h in trainer.state.log_history if "teacher_hacking/proxy_fkl" in h]
    assert logged == steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/teacher_hacking/proxy_fkl", "train/teacher_hacking/golden_fkl"} <= tags, sorted(tags)
    # The monitor's JSONL is a metrics file `kdlab detect` reads.
    jsonl = out / "teacher_hacking_monitor.jsonl"
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == steps
    res = subprocess.run([sys.executable, "-m", "kdlab.cli", "detect", str(jsonl), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"golden", "proxy_deviation"}
    # The monitor and `kdlab detect` give the same verdicts and SEs for the same measurements (issue 17): the
    # detectors on the monitor's in-memory history equal detect's on the file it wrote.
    from kdlab.analysis.detectors import detect_golden, detect_proxy_deviation

    h = monitor.history
    steps = [r["step"] for r in h]
    col = lambda name: [r[name] for r in h]  # noqa: E731
    pv = detect_proxy_deviation(steps, col("proxy_fkl"), col("proxy_fkl_se"))
    gv = detect_golden(steps, col("golden_fkl"), col("golden_fkl_se"), col("proxy_fkl"), col("proxy_fkl_se"))
    assert out["proxy_deviation"]["detected"] == pv.detected and out["proxy_deviation"]["onset_step"] == pv.onset_step
    same = lambda a, b: a == b if not isinstance(b, float) else a == pytest.approx(b, nan_ok=True)  # noqa: E731
    assert same(out["proxy_deviation"]["z_at_end"], pv.z_at_end)
    for key in ("kind", "onset_step", "rise", "rise_se", "proxy_change", "proxy_change_se"):
        assert same(out["golden"][key], getattr(gv, key)), key
    assert out["metric_storage"] == {"proxy_fkl": "full", "golden_fkl": "full"}


class _FiresAt:
    """A stand-in proxy detector that flags hacking once `n` measurements after step 0 exist."""

    def __init__(self, n: int, onset_index: int):
        self.n, self.onset_index = n, onset_index

    def __call__(self, steps, proxy, proxy_se=None, **kw):
        from types import SimpleNamespace

        later = [s for s in steps if s > 0]
        fire = len(later) >= self.n
        return SimpleNamespace(detected=fire, onset_step=later[self.onset_index] if fire else None, reason="test")


def test_stop_on_hacking_in_a_plain_trainer_restores_the_pre_onset_weights(tmp_path):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    student = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 12, (64, 8), generator=g)
    train = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    prompts = torch.randint(0, 12, (8, 3), generator=g)
    detector = _FiresAt(n=5, onset_index=2)
    monitor = TeacherHackingMonitor(teacher, (prompts, torch.ones_like(prompts, dtype=torch.bool)), max_new_tokens=4,
                                    num_points=10, stop_on_hacking=True, detect_proxy=detector)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=student, args=args, train_dataset=train)
    monitor.attach(trainer)
    with pytest.warns(TeacherHackingWarning, match="teacher hacking detected"):
        trainer.train()
    steps = [r["step"] for r in monitor.history]
    later = [s for s in steps if s > 0]
    assert len(later) == 5 and trainer.state.global_step == later[-1] < 30, "training must stop at the detection"
    onset = later[2]
    best = max(s for s in steps if s < onset)
    assert monitor.best_step == best and monitor.best_checkpoint == tmp_path / "t" / "teacher_hacking_monitor" / "best"
    assert json.loads((monitor.best_checkpoint / "step.json").read_text())["step"] == best
    assert not list(monitor.best_checkpoint.parent.glob("step-*")), "only the best snapshot is kept"
    # The model the trainer holds now is the best one: its proxy is the one measured at that step.
    row = next(r for r in monitor.history if r["step"] == best)
    assert sequence_fkl(LM(trainer.model), monitor.caches["proxy"]).mean == pytest.approx(row["proxy_fkl"], rel=1e-5)
    assert trainer.state.log_history[-2].get("teacher_hacking/hacking_detected") == 1.0


def test_reference_samples_end_at_the_tokenizer_eos_and_every_eos_the_teacher_lists():
    """A chat teacher lists several EOS ids (Llama 3: three); the monitor's reference responses end at any
    of them and at the tokenizer's, which comes first (it pads finished rows)."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    teacher = LM(LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2)))
    teacher.hf.generation_config.eos_token_id = [5, 6]
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    monitor = TeacherHackingMonitor(teacher, [[3, 4], [7, 8, 9]], tokenizer=tokenizer, max_new_tokens=4)
    assert monitor.eos_token_id == (1, 5, 6)
    teacher.hf.generation_config.eos_token_id = 1  # the same id twice is listed once
    assert TeacherHackingMonitor(teacher, [[3, 4]], tokenizer=tokenizer, max_new_tokens=4).eos_token_id == (1,)
    assert TeacherHackingMonitor(teacher, [[3, 4]], max_new_tokens=4).eos_token_id == (1,)


def _plain_trainer_run(tmp_path, name, monitor=None):
    """35 steps of a plain Trainer logging its loss every 5 steps, with or without the monitor."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from kdlab.models import tiny_llama_config

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 12, (64, 8), generator=g)
    train = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=35, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=5, seed=0)
    trainer = Trainer(model=student, args=args, train_dataset=train)
    if monitor is not None:
        monitor.attach(trainer)
    trainer.train()
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_the_trainers_own_loss_logs_are_unchanged_by_the_monitor(tmp_path):
    """Issue 17, bug 2: the monitor logged through `trainer.log`, which resets `control.should_log`, so the
    trainer's loss due at a measured step was dropped and the next one averaged over twice the steps."""
    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    torch.manual_seed(1)
    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    prompts = torch.randint(0, 12, (8, 3), generator=torch.Generator().manual_seed(1))
    monitor = TeacherHackingMonitor(teacher, (prompts, torch.ones_like(prompts, dtype=torch.bool)), max_new_tokens=4,
                                    num_points=12)
    assert {5, 10, 25, 35} <= set(log_spaced_steps(35, 12)), "the monitor must measure at logging steps"
    without = _plain_trainer_run(tmp_path, "without")
    with_monitor = _plain_trainer_run(tmp_path, "with", monitor)
    assert sorted(without) == [5, 10, 15, 20, 25, 30, 35]
    assert sorted(with_monitor) == sorted(without)
    for step, loss in without.items():
        assert with_monitor[step] == pytest.approx(loss, rel=1e-6), step


def _distillation_run(tmp_path, name, **monitor_kw):
    """30 steps of TRL's stable `DistillationTrainer` (on-policy, tiny models) logging every 2 steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    example = _example()
    tok = example.tiny_tokenizer()
    teacher = example.tiny_model(len(tok), 32, 1, tok.eos_token_id, tok.pad_token_id)
    student = example.tiny_model(len(tok), 16, 2, tok.eos_token_id, tok.pad_token_id)
    import random

    rng = random.Random(0)
    prompts = [" ".join(rng.choice(example.WORDS) for _ in range(4)) for _ in range(48)]
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts[16:]]})
    eval_prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for p in prompts[:16]]
    config = trl.DistillationConfig(output_dir=str(tmp_path / name), max_steps=30, per_device_train_batch_size=4,
                                    learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to="none",
                                    use_cpu=True, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                                    max_completion_length=5)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                      processing_class=tok)
    monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=5, num_points=8,
                                    **monitor_kw).attach(trainer)
    trainer.train()
    return trainer, monitor


@pytest.mark.filterwarnings("ignore::kdlab.integrations.TeacherHackingWarning")
@pytest.mark.parametrize("stop", [False, True])
def test_trl_distillation_trainer_keeps_its_loss_and_buffered_metrics(tmp_path, stop):
    """Issue 17, bug 2, in TRL's `DistillationTrainer`: its loss appears at every logging step (it appeared at 7
    of 15, and at none with `stop_on_hacking`), and its buffered metrics (`completions/*`, `entropy`) stay in
    its own rows instead of moving into the monitor's."""
    kw = dict(stop_on_hacking=True, detect_proxy=_FiresAt(n=4, onset_index=2)) if stop else {}
    trainer, monitor = _distillation_run(tmp_path, f"stop{stop}", **kw)
    last = trainer.state.global_step
    assert (last < 30) if stop else (last == 30)
    rows = trainer.state.log_history
    loss_steps = [h["step"] for h in rows if "loss" in h]
    assert loss_steps == list(range(2, last + 1, 2)), loss_steps
    monitor_rows = [h for h in rows if any(k.startswith("teacher_hacking/") for k in h)]
    assert [h["step"] for h in monitor_rows] == [r["step"] for r in monitor.history]
    assert all(set(h) <= {"step"} | {k for k in h if k.startswith("teacher_hacking/")} for h in monitor_rows)
    assert all("completions/mean_length" in h and "entropy" in h for h in rows if "loss" in h)


def _sft_run(tmp_path, name, **monitor_kw):
    """30 steps of TRL's `SFTTrainer` on the teacher's own samples (sequence-level distillation), tiny models,
    logging every 2 steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    example = _example()
    tok = example.tiny_tokenizer()
    teacher = example.tiny_model(len(tok), 32, 1, tok.eos_token_id, tok.pad_token_id)
    student = example.tiny_model(len(tok), 16, 2, tok.eos_token_id, tok.pad_token_id)
    rows = example.synthetic_data(teacher, tok, 48, seed=0)
    train = Dataset.from_dict({"messages": [[{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["response"]}] for r in rows[16:]]})
    eval_prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for r in rows[:16]]
    config = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=30, per_device_train_batch_size=4,
                           learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                           disable_tqdm=True, bf16=False, max_length=64)
    trainer = trl.SFTTrainer(model=student, args=config, train_dataset=train, processing_class=tok)
    monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=5, num_points=8,
                                    **monitor_kw).attach(trainer)
    trainer.train()
    return trainer, monitor


@pytest.mark.filterwarnings("ignore::kdlab.integrations.TeacherHackingWarning")
@pytest.mark.parametrize("stop", [False, True])
def test_trl_sft_trainer_keeps_its_logs_and_stops_on_hacking(tmp_path, stop):
    """Issue 21, item 3: the monitor inside TRL's `SFTTrainer`. Its loss and its own metrics (`entropy`,
    `mean_token_accuracy`) appear at every logging step, in its own rows; the monitor's rows hold only the
    monitor's columns; a detector that fires at the 4th measurement stops training there."""
    kw = dict(stop_on_hacking=True, detect_proxy=_FiresAt(n=4, onset_index=2)) if stop else {}
    trainer, monitor = _sft_run(tmp_path, f"sft{stop}", **kw)
    last = trainer.state.global_step
    measured = [r["step"] for r in monitor.history]
    if stop:
        assert last == measured[4] < 30  # stopped at the measurement where the detector fired
    else:
        assert last == 30 and measured == log_spaced_steps(30, 8)
    # (No direction asserted for the proxy: the tiny random teacher's free samples are near uniform, and SFT on
    # its word-only replies of fixed length moves the student away from them.)
    assert all(r["proxy_fkl"] > 0 and r["proxy_fkl_se"] > 0 for r in monitor.history)
    rows = trainer.state.log_history
    assert [h["step"] for h in rows if "loss" in h] == list(range(2, last + 1, 2))
    assert all("entropy" in h and "mean_token_accuracy" in h for h in rows if "loss" in h)
    monitor_rows = [h for h in rows if any(k.startswith("teacher_hacking/") for k in h)]
    assert [h["step"] for h in monitor_rows] == measured
    assert all(set(h) <= {"step"} | {k for k in h if k.startswith("teacher_hacking/")} for h in monitor_rows)


def _eos_failure_run(tmp_path, end_token: str, **monitor_kw):
    """Issue 21, item 4: a failure built on purpose. A tiny teacher SFT'd to answer 4 words then <eos>; a student
    first SFT'd the same way (a 'pretrained' student that ends where the teacher does), then distilled by TRL's
    SFTTrainer on teacher-style data whose answers end with `end_token` — another tokenizer's EOS (<user>) in
    the failure, the teacher's own <eos> in the control — watched by the monitor with the drift panel."""
    trl = pytest.importorskip("trl")
    import random

    from datasets import Dataset

    example = _example()
    tok = example.tiny_tokenizer()
    eos = tok.eos_token_id
    rng = random.Random(0)

    def data(n, end):
        rows = []
        for _ in range(n):
            p = tok.apply_chat_template([{"role": "user", "content": " ".join(rng.choice(example.WORDS[:8]) for _ in range(3))}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
            rows.append((p, [tok.convert_tokens_to_ids(w) for w in rng.choices(example.WORDS[8:16], k=4)] + [end]))
        return rows

    def sft(model, rows, name, steps, monitor=None):
        ds = Dataset.from_dict({"input_ids": [p + r for p, r in rows],
                                "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in rows]})
        cfg = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=16,
                            learning_rate=3e-3, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
                            disable_tqdm=True, bf16=False, completion_only_loss=True, max_length=64)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        if monitor is not None:
            monitor.attach(trainer)
        trainer.train()

    teacher = example.tiny_model(len(tok), 32, 1, eos, tok.pad_token_id)
    sft(teacher, data(256, eos), "teacher", 120)
    student = example.tiny_model(len(tok), 16, 2, eos, tok.pad_token_id)
    sft(student, data(256, eos), "pretrain", 200)
    eval_prompts = [p for p, _ in data(32, eos)]
    monitor = TeacherHackingMonitor(teacher, eval_prompts, tokenizer=tok, max_new_tokens=8, num_points=6, drift=True,
                                    **monitor_kw)
    sft(student, data(256, tok.convert_tokens_to_ids(end_token)), "distil", 120, monitor)
    return monitor


@pytest.mark.filterwarnings("ignore::kdlab.integrations.TeacherHackingWarning")
def test_eos_mismatch_alarm_fires_on_a_student_trained_on_another_eos_and_not_on_the_control(tmp_path):
    from kdlab.analysis.alarms import EOS_MISMATCH, alarm_column

    failure = _eos_failure_run(tmp_path / "failure", "<user>")
    control = _eos_failure_run(tmp_path / "control", "<eos>")
    assert EOS_MISMATCH in failure.alarms and failure.alarms[EOS_MISMATCH].onset_step > 0
    assert failure.history[-1]["no_eos_student"] > 0.5 and failure.history[-1][alarm_column(EOS_MISMATCH)] == 1
    assert EOS_MISMATCH not in control.alarms, control.alarms
    assert control.history[-1]["no_eos_student"] < 0.25
    stopped = _eos_failure_run(tmp_path / "stopped", "<user>", stop_on_alarm=True)
    # training ended at the measurement where eos_mismatch fired (exposure-gap growth, earlier, is experimental:
    # shown, never acted on)
    first = min(i for i, r in enumerate(stopped.history) if r.get(alarm_column(EOS_MISMATCH)) == 1)
    assert len(stopped.history) == first + 1 and stopped.history[-1]["step"] < 120


@pytest.mark.filterwarnings("ignore::kdlab.integrations.TeacherHackingWarning")
def test_distillation_trainer_example_shows_an_alarm_in_its_logs_and_its_control_none(tmp_path):
    """examples/monitor_distillation.py (issue 21, item 3): TRL's DistillationTrainer with the drift panel. The
    student pretrained on another EOS raises eos_mismatch, in the monitor, the trainer's log history and
    TensorBoard; the control (pretrained on the teacher's EOS) raises nothing."""
    pytest.importorskip("trl")
    pytest.importorskip("tensorboard")
    spec = importlib.util.spec_from_file_location("monitor_distillation", ROOT / "examples" / "monitor_distillation.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from kdlab.analysis.alarms import EOS_MISMATCH, alarm_column

    trainer, monitor = example.main(["--out", str(tmp_path / "fail"), "--steps", "20", "--report-to", "tensorboard"])
    assert EOS_MISMATCH in monitor.alarms and monitor.history[-1]["no_eos_student"] > 0.5
    logged = [h for h in trainer.state.log_history if f"teacher_hacking/{alarm_column(EOS_MISMATCH)}" in h]
    assert logged and logged[-1][f"teacher_hacking/{alarm_column(EOS_MISMATCH)}"] == 1
    assert any("loss" in h for h in trainer.state.log_history)  # the trainer's own logs are still there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for d in {p.parent for p in (tmp_path / "fail").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert f"train/teacher_hacking/{alarm_column(EOS_MISMATCH)}" in tags, sorted(tags)
    _, control = example.main(["--out", str(tmp_path / "control"), "--steps", "20", "--control"])
    assert control.alarms == {}, control.alarms


@pytest.mark.filterwarnings("ignore::kdlab.integrations.TeacherHackingWarning")
def test_gradient_alignment_in_the_monitor_leaves_training_unchanged(tmp_path):
    """Issue 16, item 4, in the monitor: with alignment_prompts, each measurement after step 0 logs grad_cos_fresh
    (and grad_cos_golden with an oracle), a cosine in [-1, 1], taken between backward and the optimizer step; the
    trainer's losses are those of the same run without it (its gradients are left alone)."""
    from transformers import LlamaForCausalLM

    from kdlab.models import tiny_llama_config

    torch.manual_seed(1)
    teacher = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    oracle = LlamaForCausalLM(tiny_llama_config(12, 16, 1, 2, max_position_embeddings=32))
    prompts = torch.randint(0, 12, (8, 3), generator=torch.Generator().manual_seed(1))
    pool = torch.randint(0, 12, (32, 3), generator=torch.Generator().manual_seed(2))
    ones = lambda t: (t, torch.ones_like(t, dtype=torch.bool))  # noqa: E731
    plain = TeacherHackingMonitor(teacher, ones(prompts), oracle=oracle, max_new_tokens=4, num_points=6)
    aligned = TeacherHackingMonitor(teacher, ones(prompts), oracle=oracle, max_new_tokens=4, num_points=6,
                                    alignment_prompts=ones(pool), batch_size=8)
    without = _plain_trainer_run(tmp_path, "plain", plain)
    with_alignment = _plain_trainer_run(tmp_path, "aligned", aligned)
    assert with_alignment == without  # the same losses to the last digit
    later = [r for r in aligned.history if r["step"] > 0]
    assert later and all(-1.0 <= r["grad_cos_fresh"] <= 1.0 and -1.0 <= r["grad_cos_golden"] <= 1.0 for r in later)
    assert "grad_cos_fresh" not in aligned.history[0] and "grad_cos_fresh" not in plain.history[-1]
    assert [r["proxy_fkl"] for r in aligned.history] == [r["proxy_fkl"] for r in plain.history]
