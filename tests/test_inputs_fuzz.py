"""Property-based fuzzing of ``data.inputs`` entries (salm_mtp/data/mix.py InputConfig, salm_mtp/data/config.py
DataConfig): whatever a YAML list can hold (wrong types, unknown keys, YAML booleans, NaN/inf weights, missing and
existing files), building the data settings either succeeds with a valid source list or raises the documented
one-line errors: ConfigError (a value) or MissingInputError (a file), each naming ``data.inputs``. Nothing else
escapes (no TypeError, AttributeError, KeyError ...)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salm_mtp.data.config import DataConfig
from salm_mtp.data.mix import LOSS_TURNS, SOURCE_TYPES, InputConfig
from salm_mtp.errors import ConfigError, MissingInputError

FIELDS = ("name", "type", "path", "paths", "weight", "system_prompt", "loss_turns")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two files that exist (their content is read later, by the loaders: not here)."""
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for name in ("a.jsonl", "b.jsonl.gz"):
        (root / name).write_text("")
        out.append(str(root / name))
    return out


def scalars(files):
    """Values a YAML scalar can become: strings (names, types, paths, "off"), booleans, numbers, null."""
    return st.one_of(
        st.text(max_size=12), st.sampled_from([*SOURCE_TYPES, *LOSS_TURNS, "off", "yes", "/nope/x.jsonl", *files]),
        st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.none())


def entries(files):
    """One data.inputs entry: a mapping of known keys (and sometimes an unknown one) to any value, or not a mapping."""
    value = st.one_of(scalars(files), st.lists(scalars(files), max_size=3))
    keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.text(min_size=1, max_size=8))
    mapping = st.dictionaries(keys, value, max_size=7)
    good = st.fixed_dictionaries(
        {"name": st.text(min_size=1, max_size=8)},
        optional={"type": st.sampled_from(SOURCE_TYPES), "path": st.sampled_from(files),
                  "weight": st.floats(min_value=0.01, max_value=100)})
    return st.one_of(mapping, good, scalars(files))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_data_inputs_fail_only_with_the_documented_errors(files, data):
    items = data.draw(st.lists(entries(files), min_size=1, max_size=3))
    try:
        cfg = DataConfig(inputs=items, max_tokens=4096)
    except (ConfigError, MissingInputError) as e:
        message = str(e)
        assert message.startswith("data.inputs"), message
        assert "\n" not in message and ";" in message, message  # one line: what is wrong; what to do
        return
    for spec in cfg.inputs:  # accepted: every source is what the loaders can read
        assert isinstance(spec, InputConfig) and isinstance(spec.name, str) and spec.name and "/" not in spec.name
        assert spec.type in SOURCE_TYPES and spec.loss_turns in LOSS_TURNS
        assert math.isfinite(spec.weight) and spec.weight > 0
        assert spec.files() and all(f in files for f in spec.files())
    assert len({s.name for s in cfg.inputs}) == len(cfg.inputs)
