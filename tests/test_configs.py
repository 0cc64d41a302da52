"""Every shipped config resolves, the paper's configs pin the paper's setup, and each paper config runs
a few steps end to end with tiny stand-in models of its family on local copies of its dataset."""

import json
from pathlib import Path

import pytest
import yaml

from kdlab.config import ConfigError, load_config, read_config_file
from standins import family_of, write_standins
from task_data import write_task_data

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"accelerate", "studies"} & set(p.parts))
STUDIES = sorted((ROOT / "configs/studies").glob("*.yaml"))
SHIPPED += sorted((ROOT / "src/kdlab/pipeline/demo_configs").glob("*.yaml"))
PAPER = sorted((ROOT / "configs/paper").rglob("*.yaml"))
EXPECTED_METRIC = {"xsum": "rouge", "wmt14_en_de": "bleu", "natural_instructions": "rouge"}


def test_the_paper_directory_has_every_setup():
    """Three tasks x six conditions, for the T5 family and the decoder-only counterpart."""
    names = {p.relative_to(ROOT / "configs/paper").as_posix() for p in PAPER}
    for family in ("t5", "qwen"):
        for task in ("xsum", "wmt14", "natural_instructions"):
            for cond in ("offline", "offline-prompts-half", "offline-prompts-quarter", "offline-generations-4",
                         "online-teacher", "online-student"):
                assert f"{family}/{task}/{cond}.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_resolves(path):
    cfg = load_config(path)
    assert cfg.stage2.steps >= 1


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_resolves(path):
    from kdlab.pipeline.phase import load_phase_spec, world_configs

    spec = load_phase_spec(path)  # validates every cell's config
    assert world_configs(spec) and spec.columns


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.relative_to(ROOT / "configs/paper").as_posix())
def test_paper_configs_pin_the_paper_setup(path):
    cfg = load_config(path)
    family = path.relative_to(ROOT / "configs/paper").parts[0]
    assert (cfg.stage2.batch_size, cfg.stage2.lr, cfg.stage2.warmup_steps) == (32, 3e-4, 100)
    assert cfg.stage2.sampling.temperature == 1.0 and cfg.loss.temperature == 1.0
    assert (cfg.world.task.max_input_tokens, cfg.world.task.max_output_tokens) == (1024, 128)
    assert cfg.models.dropout == 0.0
    if family == "t5":
        assert (cfg.world.oracle, cfg.models.teacher, cfg.models.student) == (
            "hf:google/flan-t5-xl", "hf:google-t5/t5-large", "hf:google-t5/t5-base")
    else:
        assert all(family_of(m) == "qwen2" for m in (cfg.world.oracle, cfg.models.teacher, cfg.models.student))
    # the header says what hardware and time it needs and how to launch it
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "Hardware:" in header and "ESTIMATE" in header
    assert f"accelerate launch --multi_gpu --num_processes 8 -m kdlab.cli run configs/paper/{path.relative_to(ROOT / 'configs/paper').as_posix()}" in header
    # equal budgets: every condition of a task trains for the same steps x batch
    base = load_config(path.parent / "offline.yaml")
    assert (cfg.stage2.steps, cfg.stage2.batch_size) == (base.stage2.steps, base.stage2.batch_size)
    assert cfg.stage1_key() == base.stage1_key()  # one world per task and family


def test_base_chains_merge_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text("stage2:\n  steps: 7\n  lr: 0.01\nloss:\n  name: tvd\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstage2:\n  lr: 0.02\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\nloss:\n  beta: 0.3\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml")
    assert (cfg.stage2.steps, cfg.stage2.lr, cfg.loss.name, cfg.loss.beta) == (7, 0.02, "tvd", 0.3)
    assert "base" not in read_config_file(tmp_path / "sub" / "c.yaml")


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*the base of .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------
# Each paper config, a few steps, tiny stand-ins

DATA_ROWS = {"xsum": {"train": 48, "validation": 8, "test": 8},
             "wmt14_en_de": {"train": 48, "validation": 8, "test": 8},
             "natural_instructions": {"train": 48, "test": 8}}


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data = {task: write_task_data(task, root / "data" / task, rows, long_every=6) for task, rows in DATA_ROWS.items()}
    return root, data


def standin_overrides(cfg, root: Path, data: dict[str, str], out: Path) -> list[str]:
    """Shrink a paper config to a seconds-long run: same family, regime, loss, task and dataset shape."""
    family = family_of(cfg.world.oracle[len("hf:"):])
    models = write_standins(root / "models", family)
    o = cfg.stage2.offline
    scale = 8 / 5000  # 5,000 prompts -> 8, keeping the conditions' prompt : generation ratios
    return [
        f"world.oracle=hf:{models['oracle']}", f"models.teacher=hf:{models['teacher']}",
        f"models.student=hf:{models['student']}", f"world.task.path={data[cfg.world.task.name]}",
        "world.task.max_input_tokens=32", "world.task.max_output_tokens=6",
        "world.pools.stage1=16", "world.pools.stage2=16", "world.pools.eval=6",
        "stage1.teacher.num_samples=16", "stage1.teacher.steps=2", "stage1.teacher.batch_size=8",
        "stage1.student.num_samples=16", "stage1.student.steps=2", "stage1.student.batch_size=8",
        "stage2.steps=3", "stage2.batch_size=4", "stage2.warmup_steps=2", "stage2.checkpoint_every=2",
        f"stage2.offline.num_prompts={max(1, round(o.num_prompts * scale))}",
        "eval.num_points=2", "eval.num_prompts=4", "eval.batch_size=4", "eval.train_prompts=2",
        "eval.task_metric_prompts=2", "device=cpu", "threads=1",
        f"output_dir={out}", f"cache_dir={root / 'cache'}",
    ]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.relative_to(ROOT / "configs/paper").as_posix())
def test_each_paper_config_runs_with_standins(path, local_assets, tmp_path, monkeypatch):
    from kdlab.pipeline.distill import run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, data = local_assets
    cfg = load_config(path)
    small = load_config(path, standin_overrides(cfg, root, data, tmp_path / "run"))
    # what the test keeps from the shipped config
    assert (small.stage2.regime, small.loss.name, small.world.task.name, small.precision, small.eval.task_metrics) == (
        cfg.stage2.regime, cfg.loss.name, cfg.world.task.name, cfg.precision, cfg.eval.task_metrics)
    assert small.stage2.offline.generations_per_prompt == cfg.stage2.offline.generations_per_prompt
    run_dir = run(small, log=lambda m: None, progress=False)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 3]
    metric = EXPECTED_METRIC[cfg.world.task.name]
    key = "task_bleu" if metric == "bleu" else "task_rougeL"
    for r in rows:
        for name in ("proxy_fkl", "golden_fkl", f"{key}_ref", f"{key}_oracle"):
            assert r[name] is not None and r[name] >= 0, (name, r)
    assert rows[-1]["train_loss"] is not None and rows[-1]["train_loss"] >= 0
    world = json.loads((run_dir / "world.json").read_text())
    assert set(world["prompt_reports"]) == {"stage1", "stage2", "eval"}
    assert world["prompt_reports"]["stage1"]["n_truncated"] > 0  # every 6th document is 400 words long
    assert f"teacher_{key}_ref" in world
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["world"]["task"]["name"] == cfg.world.task.name
    assert (run_dir / "done.json").exists()


def test_a_regime_drawn_for_one_loss_names_a_loss_that_exists():
    from kdlab.data.regimes import REGIMES
    from kdlab.losses.names import LOSS_NAMES

    assert all(r.loss is None or r.loss in LOSS_NAMES for r in REGIMES.values())
