"""`metalm.runs.protocols`: which baselines a run evaluates beside its learner."""

from __future__ import annotations

from metalm.config import load_config
from metalm.learners import (
    HEADS,
    FrozenConfig,
    method_label,
)
from metalm.runs.protocols import baselines


def _other_head(config_class) -> str:
    """A head that is not `config_class`'s default (whatever the default is)."""
    return next(h for h in HEADS if h != config_class().head and h != "lpft")


def test_baselines_are_kept_apart_by_label():
    other = _other_head(FrozenConfig)
    config = load_config(
        None,
        [
            "learner.name=frozen",
            f"eval.baselines=[{{name: frozen}}, {{name: frozen, head: {other}}}]",
        ],
    )
    assert [method_label(b) for b in baselines(config)] == [f"frozen/{other}"]
