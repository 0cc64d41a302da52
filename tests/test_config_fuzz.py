"""Invalid configs generated from the config schema itself (issue 19): wrong types, out-of-range values,
unknown keys, values where sections go and sections where values go, in YAML files and in --set overrides.
Each must give a ConfigError (the one-line message the CLI prints) naming the field, never another exception."""

from __future__ import annotations

import datetime
from typing import Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdlab.config import ConfigError, RunConfig, build_config, load_config, parse_value  # noqa: E402


def _section(annotation):
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def walk(model=RunConfig, prefix=""):
    """(leaves, sections) of the schema: (dotted name, field) of every leaf field, and every section's name."""
    leaves, sections = [], []
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is None:
            leaves.append((f"{prefix}{name}", field))
            continue
        sections.append(f"{prefix}{name}")
        more_leaves, more_sections = walk(sub, f"{prefix}{name}.")
        leaves += more_leaves
        sections += more_sections
    return leaves, sections


LEAVES, SECTIONS = walk()


def _bound(field, kind):
    for m in field.metadata:
        value = getattr(m, kind, None)
        if value is not None:
            return value
    return None


def invalid_values(field):
    """Values that this field must refuse, read from its annotation and constraints."""
    ann = field.annotation
    values = [{"nested": 1}, [1, 2]]
    if get_origin(ann) is Literal:
        values.append("not-" + str(get_args(ann)[0]))
    if ann in (int, float) or str(ann) in ("int | None", "float | None"):
        values += ["abc", datetime.date(2026, 1, 2)]
        for kind, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            b = _bound(field, kind)
            if b is not None and not isinstance(b, bool):
                values.append(b + delta if delta else b)
    if ann is bool:
        values.append("maybe")
    return values


FIELD_VALUES = [(name, v) for name, field in LEAVES for v in invalid_values(field)]


def nest(dotted: str, value):
    data = value
    for key in reversed(dotted.split(".")):
        data = {key: data}
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELD_VALUES))
def test_invalid_field_values_in_a_yaml_file_name_the_field(tmp_path_factory, case):
    dotted, value = case
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    if isinstance(value, datetime.date):  # YAML reads an unquoted ISO date as a date: a user's typo can give one
        text = yaml.safe_dump(nest(dotted, "DATE"), default_flow_style=False).replace("DATE", value.isoformat())
    else:
        text = yaml.safe_dump(nest(dotted, value), default_flow_style=False)
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err).split("invalid config:")[0], str(err)
        last = dotted.split(".")[-1]
        assert last in str(err) or "not a number" in str(err), (dotted, value, str(err))
        return
    pytest.fail(f"{dotted} = {value!r} was accepted")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([n for n, _ in LEAVES] + SECTIONS), st.text(min_size=1, max_size=12))
def test_any_override_text_gives_a_config_or_a_config_error(dotted, raw):
    try:
        build_config(None, [f"{dotted}={raw}"])
    except ConfigError:
        pass  # any other exception fails the test with its traceback


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SECTIONS + [""]), st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_unknown_keys_are_refused(section, key):
    names = {n.split(".")[-1] for n, _ in LEAVES} | {s.split(".")[-1] for s in SECTIONS}
    if key in names or key == "base":
        return
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match="unknown key"):
        build_config(nest(dotted, 1))


@pytest.mark.parametrize("section", SECTIONS)
def test_a_value_where_a_section_goes(section):
    with pytest.raises(ConfigError):
        build_config(nest(section, 7))


def test_override_values_that_are_not_yaml():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_value("[1, 2")
