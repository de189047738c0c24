"""`metalm.tune.space`: the search space parsed from a tuning YAML."""

from __future__ import annotations

import optuna
import pytest
from tuning import SPACE, TINY_SEARCH, write_tune_yaml

from metalm.config import RunConfig, load_config
from metalm.errors import MetalmError
from metalm.tune import load_tune_config, parse_space


def test_space_parses_types_and_conditions():
    space = parse_space(SPACE, RunConfig())
    kinds = {p.name: (p.kind, p.log) for p in space.params}
    assert kinds == {
        "learner.name": ("categorical", False),
        "train.lr": ("float", True),
        "episode.k_shot": ("int", False),
        "learner.inner_lr": ("float", True),
    }
    assert space.params[3].when == {"learner.name": ("fomaml",)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = space.suggest(trial)
        seen.add(values["learner.name"])
        # the inner-loop rate exists exactly for the gradient-based learner
        assert ("learner.inner_lr" in values) == (values["learner.name"] == "fomaml")
        assert isinstance(values["episode.k_shot"], int) and 1 <= values["episode.k_shot"] <= 3
        config = space.apply(RunConfig(), values)
        assert config.learner.name == values["learner.name"]
        assert config.train.lr == pytest.approx(values["train.lr"])
        study.tell(trial, 0.5)
    assert seen == {"protonet", "fomaml"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ([1, 2], "non-empty mapping"),
        ({}, "non-empty mapping"),
        ({"train.lr": 0.1}, "expected a mapping"),
        ({"train.lr": {"low": 1, "hi": 2}}, "unknown key 'hi'"),
        ({"train.lr": {"low": 0.1}}, "needs both low and high"),
        ({"train.lr": {"low": 0.1, "high": 0.01}}, "low must be below high"),
        ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
        ({"train.lr": {"low": "a", "high": 0.1}}, "expected a number"),
        ({"train.steps": {"low": 1, "high": 5, "type": "double"}}, "expected int or float"),
        ({"learner.name": {"choices": []}}, "non-empty list"),
        ({"learner.name": {"choices": [[1], [2]]}}, "must be scalars"),
        ({"learner.name": {"choices": ["maml"], "low": 1}}, "either choices or low/high"),
        ({"train.lr": {"low": 1e-5, "high": 1e-3, "when": {"learner.name": ["maml"]}}}, "listed"),
        (
            {
                "learner.name": {"choices": ["protonet", "maml"]},
                "learner.inner_lr": {"low": 1e-4, "high": 1e-2, "when": {"learner.name": ["x"]}},
            },
            "not one of learner.name's choices",
        ),
        ({"train.lrr": {"low": 1e-5, "high": 1e-3}}, "not a valid config field"),
        ({"train.steps": {"low": 0.5, "high": 2.5}}, "expected int"),
        ({"learner.inner_lr": {"low": 1e-4, "high": 1e-2}}, "not a valid config field"),
    ],
)
def test_bad_spaces_give_clear_errors(section, message):
    with pytest.raises(MetalmError, match=message):
        parse_space(section, RunConfig())


def test_tune_yaml_splits_search_from_run_config(tmp_path):
    path = write_tune_yaml(tmp_path / "t.yaml")
    base, space = load_tune_config(path, ["train.steps=7"])
    assert base.train.steps == 7 and space.names == list(TINY_SEARCH)
    # a plain run skips the search: (and tune:) sections: the study's base config
    assert load_config(path, ["train.steps=7"]) == base
