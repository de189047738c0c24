"""Fuzzing the configuration surface with Hypothesis: generated YAML files (real keys
with wrong values, unknown keys, odd YAML, bad bytes) and `key=value` overrides either
give a valid RunConfig or raise one MetalmError."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzing import EXAMPLES, fuzz_settings, valid_or_metalm_error, write_temp
from hypothesis import given
from hypothesis import strategies as st

from metalm.config import RunConfig, config_from_data, load_config, save_config, to_dict
from metalm.learners import LEARNERS


def dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a nested mapping (`train.steps`, `data.train.source`, ...)."""
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


KEYS = dotted_keys(to_dict(RunConfig()))
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["all", "auto", "cpu", "centroid", "logreg", "clinc150", *LEARNERS]),
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
key = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".0"),
    st.sampled_from(KEYS).map(lambda k: k + ".x"),
    st.text(max_size=12),
    st.just("learner.name"),
)
yaml_value = st.one_of(
    value.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...")),
    st.text(max_size=20),
    st.sampled_from(["[1, 2", "{a: ", "&a [*a]", "!!python/object:os.system ls", "- - -", "'"]),
)


def leaf_defaults(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each leaf key of the default config with its default value."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(leaf_defaults(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


LEAVES = leaf_defaults(to_dict(RunConfig()))


def plausible_value(default: Any) -> st.SearchStrategy[str]:
    """Values of the default's own type (so many overrides are valid), as YAML."""
    if isinstance(default, bool):
        options: st.SearchStrategy[Any] = st.booleans()
    elif isinstance(default, int):
        options = st.integers(-2, 200)
    elif isinstance(default, float):
        options = st.floats(-1, 10)
    elif isinstance(default, str):
        options = st.sampled_from([default, "all", "auto", "cpu", "banking77", "x", ""])
    else:
        options = st.just(default)
    return options.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())


plausible = st.sampled_from(sorted(LEAVES)).flatmap(
    lambda k: plausible_value(LEAVES[k]).map(lambda v: f"{k}={v.removesuffix('...').strip()}")
)
override = st.one_of(
    plausible,
    plausible,
    st.builds(lambda k, v: f"{k}={v}", key, yaml_value),
    st.text(max_size=20),
)


def nest(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A nested mapping from dotted keys (later keys win, clashes replace)."""
    out: dict[str, Any] = {}
    for dotted, v in pairs:
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = v
    return out


@st.composite
def yaml_bytes(draw: st.DrawFn) -> bytes:
    """A config file: real keys with generated values, dumped as YAML; or raw text; in
    UTF-8 (maybe with a BOM), UTF-16 or with junk bytes."""
    kind = draw(st.sampled_from(["config", "config", "raw", "deep"]))
    if kind == "config":
        text = yaml.safe_dump(nest(draw(st.lists(st.tuples(key, value), max_size=5))))
    elif kind == "deep":
        depth = draw(st.integers(1, 5000))
        text = "a: " + "[" * depth + "]" * depth
    else:
        text = draw(st.text(max_size=60))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]))
    data = text.encode(encoding, errors="surrogatepass")
    if draw(st.booleans()):
        data += draw(st.binary(max_size=6))
    return data


def check_config(result: Any) -> None:
    """A config that loads is a RunConfig that survives a YAML round trip."""
    if result is None:
        return
    assert isinstance(result, RunConfig)
    path = Path(tempfile.mkdtemp()) / "again.yaml"
    save_config(result, path)
    assert load_config(path) == result


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_yaml_files_load_or_raise_metalm_error(examples: int) -> None:
    """Generated config files, with and without overrides on top."""

    @fuzz_settings(examples)
    @given(data=yaml_bytes(), overrides=st.lists(override, max_size=2))
    def check(data: bytes, overrides: list[str]) -> None:
        path = write_temp(data, ".yaml")
        try:
            check_config(valid_or_metalm_error(lambda: load_config(path, overrides)))
        finally:
            path.unlink()

    check()


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_overrides_load_or_raise_metalm_error(examples: int) -> None:
    """Generated `key=value` overrides on the defaults."""

    @fuzz_settings(examples)
    @given(overrides=st.lists(override, min_size=1, max_size=4))
    def check(overrides: list[str]) -> None:
        check_config(valid_or_metalm_error(lambda: config_from_data({}, overrides)))

    check()
