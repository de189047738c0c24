"""`metalm.tune.tuner`: the search end to end from the command line, warm starts."""

from __future__ import annotations

import optuna
import pytest
from conftest import tiny_overrides
from optuna.trial import TrialState
from tuning import SPACE, write_tune_yaml

from metalm.cli import main
from metalm.config import RunConfig, load_config
from metalm.errors import MetalmError
from metalm.tune import TuneOptions, parse_space
from metalm.tune.study import JOURNAL_FILE, journal_storage, open_study, warm_start


@pytest.mark.slow
def test_tune_cli_outputs_and_continue(tiny_model_dir, tmp_path, capsys):
    path = write_tune_yaml(tmp_path / "tiny.yaml")
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "runs")
    args = ["-q", "tune", "-c", str(path), "--trials", "3", "--sampler", "random", "--seed", "1"]
    assert main([*args, *overrides]) == 0
    out = capsys.readouterr().out
    study_dir = tmp_path / "runs" / "tiny"
    lines = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3 and all("best" in line and "ETA" in line for line in lines)
    for name in ("best_config.yaml", "summary.md", "trials.csv", "history.png", JOURNAL_FILE):
        assert (study_dir / name).exists(), name
    assert (study_dir / "best" / "report.json").exists()  # the best config, tested on meta-test
    best = load_config(study_dir / "best_config.yaml")
    # Optuna's own tools read the study file
    study = optuna.load_study(study_name="tiny", storage=journal_storage(study_dir / JOURNAL_FILE))
    assert best.train.lr == pytest.approx(study.best_params["train.lr"])
    assert len(study.trials) == 3
    # run again with a higher target: the study continues
    assert main([*args, "--no-final", *overrides]) == 0  # already 3: nothing to do
    assert main([*args[:4], "--trials", "4", *args[6:], "--no-final", *overrides]) == 0
    study = optuna.load_study(study_name="tiny", storage=journal_storage(study_dir / JOURNAL_FILE))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]


def test_tune_cli_errors_are_one_line(tmp_path, capsys):
    path = write_tune_yaml(tmp_path / "bad.yaml", {"train.lr": {"low": 1, "high": 0}})
    assert main(["tune", "-c", str(path), "--trials", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: search.train.lr: low must be below high") and "\n" not in err
    plain = tmp_path / "plain.yaml"
    plain.write_text("learner: {name: protonet}\n")
    assert main(["tune", "-c", str(plain), "--trials", "2"]) == 2
    assert "no search space" in capsys.readouterr().err


def test_warm_start_enqueues_earlier_best(tmp_path):
    space = parse_space(SPACE, RunConfig())
    earlier = open_study(tmp_path / "earlier", TuneOptions("earlier", sampler="random", seed=0))
    study = earlier  # a toy objective: the higher the rate, the better

    def toy(trial):
        return space.suggest(trial)["train.lr"] * 1000

    study.optimize(toy, n_trials=6)
    ranked = sorted(study.trials, key=lambda t: -t.value)
    new = open_study(tmp_path / "new", TuneOptions("new", sampler="tpe", seed=0))
    queued = warm_start(new, [str(tmp_path / "earlier")], space.names, top_k=2)
    assert queued == [ranked[0].params, ranked[1].params]
    waiting = new.get_trials(states=(TrialState.WAITING,))
    fixed = [t.system_attrs["fixed_params"] for t in waiting]
    assert fixed == [ranked[0].params, ranked[1].params]
    # the first trials the new study runs are exactly the earlier best configurations
    new.optimize(toy, n_trials=2)
    assert [t.params for t in new.trials[:2]] == [ranked[0].params, ranked[1].params]
    assert new.trials[0].user_attrs["warm_start_from"].endswith(f":{ranked[0].number}")
    # warm-starting again does not queue the same configurations twice
    warm_start(new, [str(tmp_path / "earlier")], space.names, top_k=2)
    assert not new.get_trials(states=(TrialState.WAITING,))
    with pytest.raises(MetalmError, match="no study there"):
        warm_start(new, [str(tmp_path / "nowhere")], space.names)
