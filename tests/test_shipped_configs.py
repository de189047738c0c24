"""Every shipped config, and every README command that trains, runs end to end.

Each YAML under `configs/` (and the `metalm demo` recipe) is run through the CLI as a
user would (`metalm train -c ...`, `metalm tune -c ...` for tune_*.yaml) on the data it
names, with the tiny random BERT of conftest and a budget of a few steps and episodes
given as key=value overrides; nothing else of the config is changed. The `metalm train`
lines of README.md run the same way, from a folder holding the files they name.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from pathlib import Path

import pytest
from run_tools import read_log

from metalm.cli import main
from metalm.config import load_config, read_yaml, save_config
from metalm.data import builtin_dataset
from metalm.learners import FinetuneConfig, learner_class, method_label
from metalm.tune import load_tune_config

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(
    p
    for p in (REPO_ROOT / "configs").glob("*.yaml")
    if "search" not in read_yaml(p) and "compare" not in read_yaml(p)
)
COMPARE_CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs").glob("*.yaml") if "compare" in read_yaml(p)
)
TUNE_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if "search" in read_yaml(p))
RECIPES = sorted((REPO_ROOT / "src" / "metalm" / "recipes").glob("*.yaml"))


def budget(model_dir: Path, output_dir: Path) -> list[str]:
    """A few steps and episodes on the tiny model; every other setting stays the config's."""
    return [
        f"model.name_or_path={model_dir}",
        "model.max_length=16",
        f"output_dir={output_dir}",
        "run_name=run",
        "train.steps=2",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.val_episodes=2",
        "train.checkpoint_every=2",
        "train.tensorboard=false",
        "eval.episodes=3",
        "eval.episodes_by_method={}",
    ]


def fewer_finetune_steps(config_path: Path | None, overrides: list[str]) -> list[str]:
    """Per-task fine-tuning (the learner or a baseline) for 2 steps instead of ~100."""
    if config_path is not None and "search" in read_yaml(config_path):
        config, _ = load_tune_config(config_path, overrides)
    else:
        config = load_config(config_path, overrides)
    extra = ["learner.steps=2"] if isinstance(config.learner, FinetuneConfig) else []
    extra += [
        f"eval.baselines.{i}.steps=2"
        for i, baseline in enumerate(config.eval.baselines)
        if isinstance(baseline, FinetuneConfig)
    ]
    return extra


def check_run(run_dir: Path, config_path: Path | None, overrides: list[str]) -> None:
    """The run finished with the rows its config asks for, each one sound."""
    config = load_config(run_dir / "config.yaml")
    assert config == load_config(config_path, overrides)
    report = json.loads((run_dir / "report.json").read_text())
    protocols = {f"{s.n_way}-way {s.k_shot}-shot" for s in config.eval.settings}
    test = config.data.test
    if (test.query_source() if test else config.data.train_sources[0]).is_builtin:
        protocols |= {f"full-way {k}-shot" for k in config.eval.full_way_shots}
    rows = {(r["method"], r["protocol"]): r for r in report["results"]}
    assert {p for _, p in rows} == protocols
    assert len(rows) == len(report["results"])  # no duplicate rows
    for (_, protocol), row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["episodes"] == (1 if protocol.startswith("full-way") else 3)
    methods = {method_label(b) for b in config.eval.baselines} | {method_label(config.learner)}
    assert {m for m, _ in rows} == methods
    if config.train.steps and learner_class(config.learner.name).meta_trainable:
        log = read_log(run_dir)
        assert [r["step"] for r in log] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in log)


# the configs whose tiny run still takes over ~5 s (the causal ones, implicit gradients)
SLOW_CONFIGS = {"icl.yaml", "metaicl.yaml", "proximal.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=p.name, marks=[pytest.mark.slow] * (p.name in SLOW_CONFIGS))
        for p in RUN_CONFIGS + RECIPES
    ],
)
def test_shipped_config_runs(path, tiny_model_dir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs name their files relative to the repository
    config = load_config(path)
    command = "eval" if config.train.steps == 0 else "train"
    model_dir = tiny_llama_dir if config.model.kind == "causal" else tiny_model_dir
    overrides = budget(model_dir, tmp_path / "runs")
    if command == "eval":  # `metalm eval` trains nothing (train.steps=0)
        overrides.remove("train.steps=2")
    overrides += fewer_finetune_steps(path, overrides)
    assert main(["-q", command, "-c", str(path), *overrides]) == 0
    check_run(tmp_path / "runs" / "run", path, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_shipped_tune_config_runs(path, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    overrides = budget(tiny_model_dir, tmp_path / "runs")
    overrides += fewer_finetune_steps(path, overrides)
    args = ["-q", "tune", "-c", str(path), "--trials", "2", "--sampler", "random"]
    assert main([*args, "--study-dir", str(tmp_path / "study"), *overrides]) == 0
    study = tmp_path / "study"
    assert (study / "best_config.yaml").is_file() and (study / "summary.md").is_file()
    with open(study / "trials.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2
    best = json.loads((study / "best" / "report.json").read_text())
    assert best["results"] and all(0.0 <= r["accuracy"] <= 1.0 for r in best["results"])


@pytest.mark.slow
@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_shipped_compare_config_runs(path, tiny_model_dir, tiny_llama_dir, tmp_path, monkeypatch):
    """Every learner of the comparison, with its own settings, for 2 steps."""
    monkeypatch.chdir(REPO_ROOT)
    causal = read_yaml(path).get("model", {}).get("kind") == "causal"
    overrides = budget(tiny_llama_dir if causal else tiny_model_dir, tmp_path / "runs")
    if "unlabeled" in read_yaml(path)["data"]:
        overrides.append("data.unlabeled.max_texts=300")
    out = tmp_path / "compare"
    assert main(["-q", "compare", "-c", str(path), "--out", str(out), *overrides]) == 0
    report = json.loads((out / "compare.json").read_text())
    labels = [e if isinstance(e, str) else e.get("label", e["name"])
              for e in read_yaml(path)["compare"]["learners"]]  # fmt: skip
    assert list(dict.fromkeys(r["label"] for r in report["rows"])) == labels
    assert not report["errors"]
    assert all(0.0 <= r["result"]["accuracy"] <= 1.0 for r in report["rows"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # the shipped custom_csv.yaml once left eval.q_queries at 15 for 6-example classes
        (
            "eval.q_queries=15",
            "intents.csv[meta-test]: class 'alarm' has 6 examples but 1-shot with 15 "
            "queries needs 16 (3 classes are short: every class has fewer than 16 examples); "
            "lower eval.q_queries (15) or eval.settings.0.k_shot (1)",
        ),
        ("eval.settings=[{n_way: 4, k_shot: 1}]", "lower eval.settings.0.n_way"),
        ("episode.q_queries=5", "lower episode.q_queries (5) or episode.k_shot (2)"),
        ("train.val_q_queries=6", "lower train.val_q_queries (6) or train.val_k_shot (1)"),
    ],
)
def test_too_small_classes_name_the_setting_to_lower(
    extra, message, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO_ROOT)
    overrides = [*budget(tiny_model_dir, tmp_path / "runs"), extra]
    assert main(["-q", "train", "-c", "configs/custom_csv.yaml", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists()  # refused before anything is written


# -- README commands ---------------------------------------------------------------------
def readme_train_commands() -> list[list[str]]:
    """The arguments after `metalm` of each `metalm train` line in README.md's code blocks
    (continuation lines joined, comments dropped), except `--resume` of a named run."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith(".venv/bin/metalm train"):
                continue
            words = shlex.split(line, comments=True)
            if words[:2] == [".venv/bin/metalm", "train"] and "--resume" not in words:
                commands.append(words[1:])
    return commands


README_COMMANDS = readme_train_commands()


def write_placeholder_files(folder: Path) -> None:
    """The files README commands name (`my_intents.csv`, `tickets.txt`, `tickets.csv`),
    made from BANKING77 training texts."""
    data = builtin_dataset("banking77", "train")
    rows = data.by_class()
    with open(folder / "my_intents.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label in data.classes[:12]:
            writer.writerows((data.texts[i], label) for i in rows[label][:12])
    texts = data.texts[::5][:2000]
    (folder / "tickets.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(folder / "tickets.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body"])
        writer.writerows(enumerate(texts))


def test_readme_has_train_commands():
    assert len(README_COMMANDS) >= 10, README_COMMANDS
    assert ["train", "-c", "configs/custom_csv.yaml"] in [c[:3] for c in README_COMMANDS]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [  # the torchrun ones start 2 ranks
        pytest.param(a, id=" ".join(a[1:])[:60], marks=[pytest.mark.slow] * ("--nproc" in a))
        for a in README_COMMANDS
    ],
)
def test_readme_train_command_runs(args, tiny_model_dir, tiny_llama_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "examples"):
        (work / name).symlink_to(REPO_ROOT / name)
    write_placeholder_files(work)
    monkeypatch.chdir(work)
    config_path = Path(args[args.index("-c") + 1]) if "-c" in args else None
    readme_overrides = [a for a in args[1:] if "=" in a]
    causal = load_config(config_path, readme_overrides).model.kind == "causal"
    # the README's own settings, then the budget; no full-way protocol, no baselines
    overrides = [
        *readme_overrides,
        *budget(tiny_llama_dir if causal else tiny_model_dir, tmp_path / "runs"),
        "eval.full_way_shots=[]",
        "eval.baselines=[]",
    ]
    overrides += fewer_finetune_steps(config_path, overrides)
    assert main(["-q", *args, *overrides[len(readme_overrides) :]]) == 0
    check_run(tmp_path / "runs" / "run", config_path, overrides)


def test_empty_mapping_survives_save_and_load(tmp_path):
    """A run saved with `eval.episodes_by_method={}` reloads with it empty (not with the
    default {finetune: 30}), so `eval --run` evaluates as the run did."""
    config = load_config(None, ["eval.episodes_by_method={}"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").eval.episodes_by_method == {}


def test_the_leaderboard_fixes_share_the_leaderboards_tasks_and_budget():
    """benchmarks/leaderboard_fixes.yaml copies configs/compare_intents.yaml's shared part:
    its variants are measured on the same data, episodes, budget and test protocol."""
    fixes = read_yaml(REPO_ROOT / "benchmarks" / "leaderboard_fixes.yaml")
    leaderboard = read_yaml(REPO_ROOT / "configs" / "compare_intents.yaml")
    fixes.pop("compare"), leaderboard.pop("compare")
    assert fixes == leaderboard
