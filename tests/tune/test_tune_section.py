"""The `tune:` section of a tuning YAML: `metalm tune`'s settings, then `tune.key=value`
overrides, then the older flags (aliases that win); checked as the run config is; skipped
by `metalm train`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import tiny_overrides
from tuning import TINY_SEARCH

from metalm.cli import main
from metalm.cli.parser import build_parser
from metalm.cli.train_commands import _tune_flags
from metalm.config import load_config
from metalm.errors import MetalmError
from metalm.tune import TuneSection, load_tune, load_tune_config
from metalm.tune.space import parse_tune_section
from metalm.tune.study import JOURNAL_FILE, journal_storage

REPO_ROOT = Path(__file__).resolve().parents[2]

# every key of the section, and the same settings as flags
SECTION = {
    "trials": 7,
    "study_dir": "somewhere",
    "arch": False,
    "study_name": "named",
    "storage": "studies/s.journal",
    "sampler": "random",
    "pruner": "none",
    "seed": 3,
    "startup_trials": 2,
    "objectives": "accuracy,params",
    "warm_start_from": ["runs/a", "runs/b"],
    "warm_start_top": 2,
    "final": False,
    "progress": True,
    "heartbeat": 30,
}
FLAGS = [
    "--trials", "7", "--study-dir", "somewhere", "--study-name", "named",
    "--storage", "studies/s.journal", "--sampler", "random", "--pruner", "none",
    "--seed", "3", "--startup-trials", "2", "--objectives", "accuracy,params",
    "--warm-start-top", "2", "--no-final", "--bars", "--heartbeat", "30",
    "--warm-start-from", "runs/a", "runs/b",
]  # fmt: skip


def write_yaml(path: Path, tune: Any = None, search: dict | None = None) -> Path:
    data: dict = {"learner": {"name": "protonet"}, "search": search or TINY_SEARCH}
    if tune is not None:
        data["tune"] = tune
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def settings_of(argv: list[str]) -> TuneSection:
    """The settings `metalm tune ARGV` would run with (the CLI's own parsing)."""
    args = build_parser().parse_args(["tune", *argv])
    return load_tune(args.config, args.overrides, _tune_flags(args))[2]


def test_section_and_flags_give_the_same_settings(tmp_path):
    from_yaml = settings_of(["-c", str(write_yaml(tmp_path / "a.yaml", SECTION))])
    from_flags = settings_of(["-c", str(write_yaml(tmp_path / "b.yaml")), *FLAGS])
    assert from_yaml == from_flags
    assert from_yaml.trials == 7 and from_yaml.final is False and from_yaml.progress is True
    assert from_yaml.objectives == ["accuracy", "params"]


def test_defaults_follow_the_config_file_and_arch(tmp_path):
    settings = settings_of(["-c", str(write_yaml(tmp_path / "study.yaml", {"trials": 2}))])
    assert settings == TuneSection(study_name="study", trials=2)
    assert settings_of(["tune.arch=true"]).objectives == ["accuracy", "latency"]
    assert settings_of(["--arch"]).study_name == "metalm"


def test_flags_win_over_overrides_over_the_yaml(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", {"trials": 30, "sampler": "tpe", "heartbeat": 9})
    settings = settings_of(["-c", str(path), "tune.trials=5", "tune.sampler=gp", "--trials", "2"])
    assert (settings.trials, settings.sampler, settings.heartbeat) == (2, "gp", 9)
    # the run config takes the other overrides, as without a tune: section
    base, _ = load_tune_config(path, ["tune.trials=5", "train.steps=7"])
    assert base.train.steps == 7


@pytest.mark.parametrize(
    ("section", "overrides", "message"),
    [
        ({"trails": 3}, [], "tune: unknown key 'trails'; valid keys are [^\n]*'trials'"),
        ({}, ["tune.samplr=random"], "tune: unknown key 'samplr'; valid keys are"),
        ({"trials": "many"}, [], "tune.trials: expected int, got 'many'"),
        ({"trials": 0}, [], r"tune.trials \(--trials\) must be >= 1"),
        ({}, ["tune.sampler=bayes"], "unknown sampler 'bayes'"),
        ({}, ["tune.warm_start_top=0"], "tune.warm_start_top"),
        ({}, [], "how many trials"),
        ("thirty", [], "tune: expected a mapping"),
    ],
)
def test_bad_tune_settings_are_one_clear_line(section, overrides, message, tmp_path, capsys):
    path = write_yaml(tmp_path / "bad.yaml", section)
    assert main(["tune", "-c", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err, err
    if "how many" not in message:
        with pytest.raises(MetalmError):
            load_tune_config(path, overrides)  # the library checks the section as well


def test_train_skips_the_tuning_sections(tmp_path, capsys):
    path = write_yaml(tmp_path / "t.yaml", {"trials": 2})
    plain = tmp_path / "plain.yaml"
    plain.write_text("learner: {name: protonet}\n", encoding="utf-8")
    assert load_config(path, ["train.steps=3"]) == load_config(plain, ["train.steps=3"])
    assert load_config(path) == load_tune_config(path)[0]
    # on the command line, a tune. key is not a run's: an error, not ignored
    assert main(["train", "-c", str(path), "tune.trials=3"]) == 2
    assert "unknown key 'tune'" in capsys.readouterr().err


def test_readme_tune_section_is_valid():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```yaml\n(tune:\n.*?)```", readme, re.DOTALL)
    assert parse_tune_section(yaml.safe_load(block)["tune"]) == TuneSection(trials=30)


def study_trials(study_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = journal_storage(study_dir / JOURNAL_FILE)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


@pytest.mark.slow
def test_a_tune_section_runs_a_study_as_the_flags_do(tiny_model_dir, tmp_path, capsys):
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "runs", **{"train.steps": 2})
    settings = {"trials": 2, "sampler": "random", "seed": 1, "pruner": "none", "final": False}
    by_yaml = write_yaml(tmp_path / "by_yaml.yaml", settings)
    assert main(["-q", "tune", "-c", str(by_yaml), *overrides]) == 0
    by_flags = write_yaml(tmp_path / "by_flags.yaml")
    flags = ["--trials", "2", "--sampler", "random", "--seed", "1", "--pruner", "none"]
    assert main(["-q", "tune", "-c", str(by_flags), *flags, "--no-final", *overrides]) == 0
    capsys.readouterr()
    yaml_trials = study_trials(tmp_path / "runs" / "by_yaml", "by_yaml")
    flag_trials = study_trials(tmp_path / "runs" / "by_flags", "by_flags")
    assert [t.params for t in yaml_trials] == [t.params for t in flag_trials]
    assert [t.value for t in yaml_trials] == pytest.approx([t.value for t in flag_trials])
    assert len(yaml_trials) == 2 and not (tmp_path / "runs" / "by_yaml" / "best").exists()
    # a flag wins over the YAML's trials: the study continues to 3
    assert main(["-q", "tune", "-c", str(by_yaml), "--trials", "3", *overrides]) == 0
    assert len(study_trials(tmp_path / "runs" / "by_yaml", "by_yaml")) == 3
    # and `metalm train` runs the same file's base config
    assert main(["-q", "train", "-c", str(by_yaml), *overrides]) == 0
    assert load_config(tmp_path / "runs" / "run" / "config.yaml") == load_config(by_yaml, overrides)
