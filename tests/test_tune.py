"""Tests for `metalm tune`: search-space parsing (and clear errors for bad spaces),
pruning that really stops training, the embedded journal storage shared by two worker
processes, a killed worker, warm start, and the multi-objective architecture search.

Trials run on the tiny random BERT of conftest (a second or two each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import tiny_overrides
from optuna.trial import TrialState

from metalm.cli import main
from metalm.config import RunConfig, load_config
from metalm.errors import MetalmError
from metalm.tune import TuneOptions, load_tune_config, parse_space, tune
from metalm.tune.arch import arch_space
from metalm.tune.objective import Objective
from metalm.tune.study import JOURNAL_FILE, journal_storage, open_study, warm_start

SPACE = {
    "learner.name": {"choices": ["protonet", "fomaml"]},
    "train.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    "episode.k_shot": {"low": 1, "high": 3, "type": "int"},
    "learner.inner_lr": {
        "low": 1e-4,
        "high": 1e-2,
        "log": True,
        "when": {"learner.name": ["fomaml"]},
    },
}
TINY_SEARCH = {
    "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "episode.k_shot": {"low": 1, "high": 2},
    "learner.distance": {"choices": ["euclidean", "cosine"]},
}


def write_tune_yaml(path: Path, search: dict | None = None) -> Path:
    data = {"learner": {"name": "protonet"}, "search": search or TINY_SEARCH}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_base(model_dir: Path, out: Path, **extra) -> RunConfig:
    return load_config(None, tiny_overrides(model_dir, out, **extra))


# --------------------------------------------------------------------------- space


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
    with pytest.raises(MetalmError, match="unknown key 'search'"):
        load_config(path)  # a plain run does not take a search section


# --------------------------------------------------------------------------- pruning


class _PruneAtFirstReport(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return bool(trial.intermediate_values)


def test_pruning_stops_training(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 9, "train.eval_every": 3})
    space = parse_space(TINY_SEARCH, base)
    study = optuna.create_study(direction="maximize", pruner=_PruneAtFirstReport())
    study.optimize(Objective(base, space, tmp_path / "study"), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [3]  # reported at the first validation...
    log = tmp_path / "study" / "trials" / "trial-0000" / "log.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert max(steps) < 9  # ...and training stopped there, long before step 9
    assert not (log.parent / "checkpoint").exists()  # pruned trials keep no weights


def test_median_pruner_reports_every_validation(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 4, "train.eval_every": 2})
    space = parse_space(TINY_SEARCH, base)
    study = open_study(tmp_path / "s", TuneOptions(sampler="random", pruner="median", seed=0))
    study.optimize(Objective(base, space, tmp_path / "s"), n_trials=2)
    for trial in study.trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert set(trial.intermediate_values) <= {2, 4} and trial.intermediate_values


# --------------------------------------------------------------------------- CLI, outputs


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


# --------------------------------------------------------------------------- workers


def _worker(path: Path, model_dir: Path, out: Path, trials: int, *extra: str) -> list[str]:
    overrides = tiny_overrides(model_dir, out, **{"train.steps": 4, "train.eval_every": 2})
    return [
        sys.executable, "-m", "metalm.cli", "-q", "tune", "-c", str(path),
        "--trials", str(trials), "--sampler", "random", "--no-final", *extra, *overrides,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_workers(commands: list[list[str]]) -> None:
    """Start every worker command at once and wait: each must exit 0."""
    procs = [
        subprocess.Popen(
            command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs


def check_study_consistent(study: optuna.Study, trials: int) -> None:
    """No lost, duplicated or half-written trials."""
    all_trials = study.get_trials()
    numbers = [t.number for t in all_trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= trials
    assert not [t for t in all_trials if t.state == TrialState.RUNNING]
    for t in all_trials:
        if t.state == TrialState.COMPLETE:
            assert t.value is not None and 0.0 <= t.value <= 1.0
            assert set(t.params) == set(TINY_SEARCH)
            assert t.datetime_complete is not None


@pytest.mark.slow
def test_embedded_storage_two_local_workers(tiny_model_dir, tmp_path):
    path = write_tune_yaml(tmp_path / "shared.yaml")
    run_workers([_worker(path, tiny_model_dir, tmp_path / "runs", 4) for _ in range(2)])
    storage = journal_storage(tmp_path / "runs" / "shared" / JOURNAL_FILE)
    study = optuna.load_study(study_name="shared", storage=storage)
    check_study_consistent(study, 4)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers took trials


@pytest.mark.slow
def test_killed_local_worker_leaves_study_usable(tiny_model_dir, tmp_path):
    path = write_tune_yaml(tmp_path / "killed.yaml")
    journal = tmp_path / "runs" / "killed" / JOURNAL_FILE
    cmd = _worker(path, tiny_model_dir, tmp_path / "runs", 50)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    subprocess.run(cmd, env=_env(), check=True, timeout=600, capture_output=True)
    study = optuna.load_study(study_name="killed", storage=journal_storage(journal))
    assert study.trials[killed].state == TrialState.FAIL
    check_study_consistent(study, 2)
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    # the retry starts from what the dead trial had stored (the kill may land between two
    # of its suggestions, so that can be a part of the space); the rest is sampled anew
    stored = study.trials[killed].params
    assert stored and retried and stored.items() <= retried[0].params.items()


# --------------------------------------------------------------------------- warm start


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


# --------------------------------------------------------------------------- architecture


def test_arch_search_returns_pareto_set(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 2, "train.eval_every": 2})
    space = arch_space(base, lengths=(8, 16))
    assert space.names == [
        "model.num_layers",
        "model.num_heads",
        "model.pooling",
        "model.max_length",
    ]
    options = TuneOptions(sampler="random", seed=0, objectives="accuracy,params")
    result = tune(base, space, 4, tmp_path / "arch", options, printer=lambda *a, **k: None)
    assert result.pareto and "pareto_front.png" in result.outputs
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    front = {row["trial"] for row in result.pareto}
    for t in trials:
        # nobody dominates a Pareto trial; each trial off the front is dominated
        dominated = any(
            o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
            for o in trials
        )
        assert dominated == (t.number not in front)
    params = {t.params["model.num_layers"]: t.user_attrs["params"] for t in trials}
    if len(params) == 2:
        assert params[1] < params[2]  # fewer layers kept, fewer parameters
    assert "Pareto front" in (tmp_path / "arch" / "summary.md").read_text()


# --------------------------------------------------------------------------- by name


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


def test_prune_heads_keeps_the_strongest_heads_and_reloads(tiny_model_dir, tmp_path):
    from metalm import from_pretrained, save_pretrained
    from metalm.learners import build_learner
    from metalm.learners.protonet import ProtoNetConfig
    from metalm.models.encoder import EncoderConfig, TextEncoder, prune_heads

    config = EncoderConfig(name_or_path=str(tiny_model_dir), device="cpu")
    full = TextEncoder.from_config(config)
    texts = ["hello there", "how are you", "good bye"]
    same = TextEncoder.from_config(config)
    prune_heads(same.model, 2)  # all heads kept: nothing changes
    assert torch.equal(same.embed(texts), full.embed(texts))
    cut = TextEncoder.from_config(EncoderConfig(**{**config.__dict__, "num_heads": 1}))
    attention, original = cut.model.encoder.layer[0].attention, full.model.encoder.layer[0]
    dense = original.attention.output.dense.weight
    strongest = int(dense.view(32, 2, 16).norm(dim=(0, 2)).argmax())
    rows = slice(16 * strongest, 16 * (strongest + 1))
    assert torch.equal(attention.self.query.weight, original.attention.self.query.weight[rows])
    assert torch.equal(attention.output.dense.weight, dense[:, rows])
    count = sum(p.numel() for p in cut.parameters())
    assert count < sum(p.numel() for p in full.parameters())
    assert cut.embed(texts).shape == (3, 32)
    # the pruned shapes survive save_pretrained -> from_pretrained, predictions identical
    learner = build_learner(cut, ProtoNetConfig())
    save_pretrained(learner, tmp_path / "pruned")
    again = from_pretrained(tmp_path / "pruned", device="cpu")
    assert sum(p.numel() for p in again.encoder.parameters()) == count
    state = learner.adapt(texts, [0, 1, 1])
    assert torch.equal(again.predict(state, texts), learner.predict(state, texts))
    with pytest.raises(MetalmError, match=r"num_heads must be in 1\.\.2"):
        prune_heads(full.model, 3)


def test_prune_heads_on_the_real_minilm():
    from metalm.models.encoder import EncoderConfig, TextEncoder

    full = TextEncoder.from_config(EncoderConfig(device="cpu"))
    cut = TextEncoder.from_config(EncoderConfig(device="cpu", num_heads=4))
    assert cut.model.encoder.layer[5].attention.self.query.weight.shape == (128, 384)
    texts = ["I lost my card", "what is my balance", "book a flight to paris"]
    a, b = full.embed(texts), cut.embed(texts)
    assert b.shape == a.shape == (3, 384)
    # a third of the heads still gives a sentence embedding close to the full model's
    assert float((a * b).sum(-1).min()) > 0.5


def test_num_layers_keeps_first_layers(tiny_model_dir):
    from metalm.models.encoder import EncoderConfig, TextEncoder

    full = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    cut = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), num_layers=1))
    assert len(cut.model.encoder.layer) == 1 and len(full.model.encoder.layer) == 2
    first = full.model.encoder.layer[0].state_dict()
    for key, value in cut.model.encoder.layer[0].state_dict().items():
        assert torch.equal(value, first[key])  # the kept layer is the pretrained one
    assert cut.embed(["hello there"]).shape == (1, 32)
    with pytest.raises(MetalmError, match=r"num_layers must be in 1\.\.2"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), num_layers=3))
