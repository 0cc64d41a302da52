"""Each package declares its own table (losses, regimes, detectors); everything else reads it.

Adding a name to a table must be the one change needed: the config's allowed values are the table's
keys, every name the config accepts has an implementation, and the outputs that name detectors use
exactly the table's names.
"""

import subprocess
import sys
from typing import get_args

import pytest

from kdlab.analysis import analyse_sweep
from kdlab.analysis import synthetic as syn
from kdlab.analysis.detectors import DETECTORS
from kdlab.config import ConfigError, LossConfig, MixedConfig, Stage2Config, build_config, describe_fields
from kdlab.data.regimes import OFF_POLICY_REGIMES, ONLINE_REGIMES, REGIMES
from kdlab.losses import LOSSES
from kdlab.losses.names import LOSS_NAMES, LOSS_PARAMS, SEQUENCE_LOSSES


def allowed(section, field: str) -> tuple:
    return get_args(section.model_fields[field].annotation)


def test_config_allows_exactly_the_loss_table():
    # the token-level losses of the registry, then the sequence-level ones the loop calls itself (MiniLLM)
    assert allowed(LossConfig, "name") == LOSS_NAMES == tuple(LOSSES) + SEQUENCE_LOSSES


def test_every_loss_the_config_accepts_has_a_function_and_its_parameters():
    for name in allowed(LossConfig, "name"):
        if name in SEQUENCE_LOSSES:  # called by the loop on sampled responses; on-policy regimes only
            assert build_config({}, [f"loss.name={name}", "stage2.regime=online_student"]).loss.name == name
            continue
        fn, params = LOSSES[name]
        assert fn.__name__ == name and params == LOSS_PARAMS[name]
        assert build_config({}, [f"loss.name={name}"]).loss.name == name
    from kdlab.pipeline.distill import make_loss  # binds loss.beta / loss.alpha from the table's parameters

    jsd = make_loss(build_config({}, ["loss.name=generalized_jsd", "loss.beta=0.3"]))
    assert jsd.keywords == {"beta": 0.3}
    assert make_loss(build_config({}, ["loss.name=skew_reverse_kl", "loss.alpha=0.2"])).keywords == {"alpha": 0.2}
    assert make_loss(build_config({}, ["loss.name=taid"])) is LOSSES["taid"][0]  # t comes from the schedule


def test_config_allows_exactly_the_regime_table():
    assert allowed(Stage2Config, "regime") == tuple(REGIMES)
    assert allowed(MixedConfig, "other") == OFF_POLICY_REGIMES
    assert set(OFF_POLICY_REGIMES) < set(REGIMES) and set(ONLINE_REGIMES) < set(REGIMES)
    for name in REGIMES:
        extra = ["loss.name=minillm"] if name == "teacher_mixed" else []  # its samples are for MiniLLM's loss
        assert build_config({}, [f"stage2.regime={name}", *extra]).stage2.regime == name
    with pytest.raises(ConfigError, match="stage2.regime = 'nope': must be one of 'offline'"):
        build_config({}, ["stage2.regime=nope"])


def test_config_allows_exactly_the_controller_tables():
    from kdlab.config import ControllerConfig
    from kdlab.pipeline.controller import Controller
    from kdlab.policies import DATA_POLICIES, OFF, POLICIES, PROXY_DETECTORS, TRIGGERS

    assert allowed(ControllerConfig, "policy") == tuple(POLICIES)
    assert allowed(ControllerConfig, "trigger") == tuple(TRIGGERS)
    assert allowed(ControllerConfig, "proxy_detector") == PROXY_DETECTORS and set(PROXY_DETECTORS) < set(DETECTORS)
    assert set(DATA_POLICIES) < set(POLICIES) and OFF in POLICIES
    assert Controller.observe.__doc__ and build_config({}).stage2.controller.policy == OFF


def test_help_lists_the_tables_names():
    lines = describe_fields()
    assert any(line.startswith(f"loss.name (one of {'|'.join(LOSS_NAMES)},") for line in lines)
    assert any(line.startswith(f"stage2.regime (one of {'|'.join(REGIMES)},") for line in lines)


def test_verdicts_are_keyed_by_the_detector_table(tmp_path):
    syn.write_sweep(tmp_path, seeds=(0,), conditions=["online_student"])
    summary = analyse_sweep([tmp_path])
    assert set(summary["thresholds"]) == set(DETECTORS)
    assert set(DETECTORS) <= set(summary["runs"][0]) and set(DETECTORS) <= set(summary["conditions"][0])


def test_the_tables_and_the_config_import_without_torch():
    code = ("import sys, kdlab.config, kdlab.losses.names, kdlab.data.regimes, kdlab.analysis.detectors, kdlab.policies; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
