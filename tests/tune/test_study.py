"""`metalm.tune.study`: storages, samplers and pruners by name, local workers on one study."""

from __future__ import annotations

import signal
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState
from run_tools import one_thread_env
from tuning import (
    SPACE,
    check_study_consistent,
    run_workers,
    worker_command,
    write_tune_yaml,
)

from metalm.config import RunConfig
from metalm.errors import MetalmError
from metalm.tune import TuneOptions, parse_space
from metalm.tune.study import JOURNAL_FILE, journal_storage


@pytest.mark.slow
def test_embedded_storage_two_local_workers(tiny_model_dir, tmp_path):
    path = write_tune_yaml(tmp_path / "shared.yaml")
    run_workers([worker_command(path, tiny_model_dir, tmp_path / "runs", 4) for _ in range(2)])
    storage = journal_storage(tmp_path / "runs" / "shared" / JOURNAL_FILE)
    study = optuna.load_study(study_name="shared", storage=storage)
    check_study_consistent(study, 4)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers took trials


@pytest.mark.slow
def test_killed_local_worker_leaves_study_usable(tiny_model_dir, tmp_path):
    path = write_tune_yaml(tmp_path / "killed.yaml")
    journal = tmp_path / "runs" / "killed" / JOURNAL_FILE
    cmd = worker_command(path, tiny_model_dir, tmp_path / "runs", 50)
    proc = subprocess.Popen(
        cmd, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if journal.exists():
                study = optuna.load_study(study_name="killed", storage=journal_storage(journal))
                running = study.get_trials(states=(TrialState.RUNNING,))
                if running and running[0].params:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("no trial started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = running[0].number
    cmd[cmd.index("--trials") + 1] = "2"
    subprocess.run(cmd, env=one_thread_env(), check=True, timeout=600, capture_output=True)
    study = optuna.load_study(study_name="killed", storage=journal_storage(journal))
    assert study.trials[killed].state == TrialState.FAIL
    check_study_consistent(study, 2)
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    # the retry starts from what the dead trial had stored (the kill may land between two
    # of its suggestions, so that can be a part of the space); the rest is sampled anew
    stored = study.trials[killed].params
    assert stored and retried and stored.items() <= retried[0].params.items()


@pytest.mark.parametrize("name", ["random", "tpe", "gp", "cmaes", "nsga2"])
def test_samplers_by_name_run_the_conditional_space(name, tmp_path):
    from metalm.tune.study import make_sampler

    space = parse_space(SPACE, RunConfig())
    study = optuna.create_study(direction="maximize", sampler=make_sampler(name, seed=0))
    study.optimize(lambda t: space.suggest(t)["train.lr"] * 1000, n_trials=12)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 12


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_startup_trials_hand_over_to_the_model_sooner(name):
    from metalm.tune.study import make_sampler

    def xs(startup):
        sampler = make_sampler(name, seed=0, startup_trials=startup)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(lambda t: -((t.suggest_float("x", 0, 1) - 0.9) ** 2), n_trials=4)
        return [t.params["x"] for t in study.trials]

    default, early = xs(None), xs(2)
    assert default[:2] == early[:2]  # the same seeded random start
    assert default[2:] != early[2:]  # then the model proposes, not the random stream
    with pytest.raises(MetalmError, match="startup-trials"):
        make_sampler(name, startup_trials=-1)


def test_bad_names_and_storages(tmp_path):
    from metalm.tune.study import make_pruner, make_sampler, make_storage

    with pytest.raises(MetalmError, match="unknown sampler"):
        make_sampler("bayes")
    with pytest.raises(MetalmError, match="single-objective"):
        make_sampler("cmaes", multi_objective=True)
    with pytest.raises(MetalmError, match="unknown pruner"):
        make_pruner("never")
    # the options check the same names (and the rest of their values) when made
    for bad, match in (
        ({"sampler": "bayes"}, "unknown sampler"),
        ({"pruner": "never"}, "unknown pruner"),
        ({"startup_trials": -1}, "startup-trials"),
        ({"objectives": "latency"}, "start with accuracy"),
        ({"warm_start_top": 0}, "warm-start-top"),
        ({"heartbeat": 0}, "heartbeat"),
    ):
        with pytest.raises(MetalmError, match=match):
            TuneOptions(**bad)
    for name in ("none", "median", "asha", "hyperband"):
        assert isinstance(make_pruner(name, 100, 10), optuna.pruners.BasePruner)
    with pytest.raises(MetalmError, match="give an RDB URL"):
        make_storage("somewhere", tmp_path)
    with pytest.raises(MetalmError, match="cannot open storage"):
        make_storage("postgresql://nobody@127.0.0.1:1/none", tmp_path)
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)
    assert isinstance(storage, optuna.storages.RDBStorage)
    journal = make_storage(f"journal:{tmp_path / 'x.journal'}", tmp_path)
    assert isinstance(journal, optuna.storages.JournalStorage)
