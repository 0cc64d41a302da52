"""The phase study (kdlab.pipeline.phase, `kdlab study`): spec validation, judging cells whose answer
is known by construction, the map's files; and (slow) a real tiny study end to end."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdlab.analysis.synthetic import write_run
from kdlab.config import ConfigError
from kdlab.pipeline.phase import CONTROL_NAME, judge_phase, load_phase_spec, world_configs, write_phase

QUICK = Path(__file__).resolve().parents[1] / "src/kdlab/pipeline/demo_configs/quick.yaml"
STEPS = np.unique(np.round(np.geomspace(1, 1500, 20)).astype(int))
TEACHER = 2.0


def _spec(tmp_path, **extra) -> Path:
    data = {"base": str(QUICK), "out": str(tmp_path / "phase"), "world_seeds": [7], "seeds": [0, 1, 2],
            "rows": {"teacher A": {"stage1.teacher.steps": 20}},
            "columns": {"80x1": {"stage2.offline.num_prompts": 80},
                        "20x4": {"stage2.offline.num_prompts": 20, "stage2.offline.generations_per_prompt": 4}}}
    data.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rows(rng, *, p_floor, delta):
    """Proxy falls to p_floor; golden = the online law h(p) + delta after 60% of the log-step range."""
    x = np.log(STEPS) / np.log(STEPS[-1])
    p = p_floor + (6 - p_floor) * np.exp(-10 * x)
    g = TEACHER + 0.8 * p + delta * np.clip((x - 0.6) / 0.2, 0, 1)
    noise = 0.02
    return [{"step": int(s), "proxy_fkl": float(pp + rng.normal(0, noise)), "proxy_fkl_se": noise,
             "golden_fkl": float(gg + rng.normal(0, noise)), "golden_fkl_se": noise} for s, pp, gg in zip(STEPS, p, g)]


def _fake_world(world, seeds, effects):
    rng = np.random.default_rng(0)
    for cond in world.conditions:
        p_floor, delta = effects[cond.name]
        for seed in seeds:
            d = write_run(world.directory / cond.name / f"seed-{seed}", _rows(rng, p_floor=p_floor, delta=delta),
                          {"name": cond.name, "seed": seed, "stage2": {"regime": "offline" if cond.name != CONTROL_NAME
                                                                       else "online_teacher"}})
            (d / "done.json").write_text("{}")  # a finished run
            (d / "world.json").write_text(json.dumps({"teacher_golden_fkl": TEACHER, "teacher_golden_fkl_se": 0.02,
                                                      "teacher": {"num_parameters": 1000},
                                                      "student_init": {"num_parameters": 100}}))


def test_judge_phase_finds_the_injected_effects(tmp_path):
    spec = load_phase_spec(_spec(tmp_path))
    worlds = world_configs(spec)
    assert len(worlds) == 1 and [c.name for c in worlds[0].conditions] == ["80x1", "20x4", CONTROL_NAME]
    # 80x1 follows the online law (no effect); 20x4 plateaus higher and gains +0.6 golden at a flat proxy
    _fake_world(worlds[0], spec.seeds, {"80x1": (0.5, 0.0), "20x4": (1.5, 0.6), CONTROL_NAME: (0.3, 0.0)})
    result = judge_phase(spec, worlds)
    cells = {c["column"]: c for c in result["cells"]}
    assert cells["20x4"]["verdict"] == "hacking" and cells["20x4"]["hacking_seeds"] == 3
    assert abs(cells["20x4"]["iso_proxy_gap"] - 0.6) < 2 * cells["20x4"]["iso_proxy_gap_se"] + 0.03
    assert cells["80x1"]["verdict"] == "none" and abs(cells["80x1"]["iso_proxy_gap"]) < 0.05
    assert result["worlds"][0]["paper_ordering"] is True  # h(p) > TEACHER everywhere, control falls
    # a world with an unfinished condition is "not run", never judged on part of its runs
    (worlds[0].directory / CONTROL_NAME / "seed-2" / "done.json").unlink()
    partial = judge_phase(spec, worlds)
    assert {c["verdict"] for c in partial["cells"]} == {"not run"} and partial["worlds"][0]["paper_ordering"] is None
    write_phase(spec, result)
    out = spec.out
    assert (out / "phase.png").stat().st_size > 1000 and (out / "phase.pdf").stat().st_size > 1000
    with open(out / "phase.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["column"]: r["verdict"] for r in rows} == {"80x1": "none", "20x4": "hacking"}


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="columns"):
        load_phase_spec(_spec(tmp_path, columns=[1, 2]))
    with pytest.raises(ConfigError, match=r"unknown key.*'colums'"):
        load_phase_spec(_spec(tmp_path, colums={}))
    with pytest.raises(ConfigError, match=r"(?s)teacher A.*stage1.teacher.stepz"):
        load_phase_spec(_spec(tmp_path, rows={"teacher A": {"stage1.teacher.stepz": 3}}))
    with pytest.raises(ConfigError, match="control"):
        load_phase_spec(_spec(tmp_path, control="offline"))
    with pytest.raises(ConfigError, match="not found"):
        load_phase_spec(tmp_path / "missing.yaml")


def test_study_cli_reports_a_bad_spec_without_a_traceback(tmp_path):
    path = _spec(tmp_path, seeds="0,1")
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", "study", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "seeds" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_study_runs_end_to_end(tmp_path):
    path = _spec(tmp_path, seeds=[0, 1], jobs=1)
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", "study", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "phase" / "phase.json").read_text())
    assert len(result["cells"]) == 2 and all(c["seeds"] == 2 for c in result["cells"])
    assert (tmp_path / "phase" / "phase.png").exists() and "iso-proxy gap" in proc.stdout


def test_an_online_control_that_does_not_approach_the_teacher_breaks_the_ordering(tmp_path):
    """The control is named "control" in a phase world: it must still count as an online condition of
    the paper's ordering (which needs the online students to approach the teacher's golden)."""
    spec = load_phase_spec(_spec(tmp_path))
    worlds = world_configs(spec)
    # the control's golden ends above where it started: it does not approach the teacher
    _fake_world(worlds[0], spec.seeds, {"80x1": (0.5, 0.0), "20x4": (1.5, 0.6), CONTROL_NAME: (0.3, 6.0)})
    world = judge_phase(spec, worlds)["worlds"][0]
    assert world["paper_ordering"] is False
    assert any("control" in r and "does not fall" in r for r in world["ordering_reasons"])


def test_the_study_uses_the_cache_dir_its_file_sets(tmp_path):
    """`set: {cache_dir: ...}` was silently replaced by <out>/.kdlab-cache (found in protocol D)."""
    from kdlab.pipeline.phase import study_cache

    assert study_cache(load_phase_spec(_spec(tmp_path), None)) == tmp_path / "phase" / ".kdlab-cache"
    spec = load_phase_spec(_spec(tmp_path, set={"cache_dir": str(tmp_path / "shared")}), None)
    assert study_cache(spec) == tmp_path / "shared"
