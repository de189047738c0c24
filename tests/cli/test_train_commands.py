"""`metalm.cli.train_commands`: `datasets`, `sample`, `train` and `eval` runs (and their
bad input: one line, no run directory), on the tiny random BERT of conftest, except one
end-to-end test of `metalm demo` on the real all-MiniLM-L6-v2 and the real CLINC150 ->
BANKING77 data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from run_tools import assert_one_line_error, read_log, write_csv

from metalm.cli import main
from metalm.config import load_config, set_dotted

RUN_FILES = (
    "config.yaml",
    "report.json",
    "report.md",
    "accuracy.png",
    "training.png",
    "log.jsonl",
    "best.safetensors",
)

# Twenty intents x ten templates: short, real-looking texts, every one distinct.
INTENTS = {
    "alarm": "set an alarm for six tomorrow",
    "weather": "check the weather in paris",
    "music": "play some jazz music",
    "timer": "start a ten minute timer",
    "recipe": "find a recipe for pancakes",
    "traffic": "check the traffic on my way to work",
    "news": "read me the latest news",
    "joke": "tell me a funny joke",
    "translate": "translate hello into spanish",
    "calendar": "add a meeting to my calendar",
    "balance": "check my bank account balance",
    "transfer": "transfer fifty dollars to my savings",
    "card_lost": "report my credit card as lost",
    "pin": "change the pin on my card",
    "flight": "book a flight to new york",
    "hotel": "reserve a hotel room for two nights",
    "taxi": "call a taxi to the airport",
    "restaurant": "book a table for four tonight",
    "reminder": "remind me to call my mother",
    "shopping": "add milk to my shopping list",
}
TEMPLATES = (
    "{}",
    "please {}",
    "can you {}",
    "i want to {}",
    "i need you to {}",
    "could you {} for me",
    "help me {}",
    "is it possible to {}",
    "hey, {} please",
    "i would like to {} right now",
)


def intent_rows(classes: int = 20, per_class: int = 10) -> list[tuple[str, str]]:
    rows = []
    for label, phrase in list(INTENTS.items())[:classes]:
        rows += [(template.format(phrase), label) for template in TEMPLATES[:per_class]]
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8"
    )
    return path


def csv_overrides(source: Path, **extra: object) -> dict[str, object]:
    """Overrides that make a file the only data source, split 60/20/20 by class."""
    values: dict[str, object] = {
        "data.train.source": str(source),
        "data.test": "null",
        "data.classes.fractions": "[0.6,0.2,0.2]",
    }
    values.update(extra)
    return values


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "metalm.cli", "-q", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: content hash and modification time."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def results_by_key(report: dict) -> dict[tuple[str, str], dict]:
    keys = [(r["method"], r["protocol"]) for r in report["results"]]
    assert len(keys) == len(set(keys)), f"duplicate results: {keys}"
    return {(r["method"], r["protocol"]): r for r in report["results"]}


# --------------------------------------------------------------------------- datasets / sample


def test_datasets_lists_builtins_with_sizes_and_licenses(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.count("|") > 3}
    assert "license" in lines["dataset"]
    banking, clinc = lines["banking77"], lines["clinc150"]
    for size in ("77", "8622", "1540", "3080", "385", "770"):
        assert f" {size} " in banking
    for size in ("150", "15000", "3000", "4500", "750", "1500"):
        assert f" {size} " in clinc
    assert "CC BY 4.0" in banking
    assert "CC BY 3.0" in clinc
    assert "NOTICE.md" in out


def count_episode_lines(out: str) -> tuple[int, int, int]:
    lines = out.splitlines()
    headers = sum(1 for line in lines if line.startswith("[") and "] " in line)
    support = sum(1 for line in lines if line.startswith("  support: "))
    query = sum(1 for line in lines if line.startswith("  query:   "))
    return headers, support, query


@pytest.mark.parametrize(
    ("pool", "n", "k", "q"),
    [("train", 4, 2, 3), ("val", 3, 1, 2), ("test", 5, 3, 1), ("train", 2, 1, 1)],
)
def test_sample_prints_episode_shape(capsys, pool, n, k, q):
    args = ["sample", "--pool", pool, "--index", "3"]
    args += ["--n-way", str(n), "--k-shot", str(k), "--q-queries", str(q)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{pool} episode 3: {n}-way {k}-shot, {q} queries per class")
    assert count_episode_lines(out) == (n, n * k, n * q)
    assert ("banking77" in out.splitlines()[0]) == (pool == "test")


def test_sample_default_shape_from_config(capsys):
    assert main(["sample", "episode.n_way=3", "episode.k_shot=2", "episode.q_queries=4"]) == 0
    assert count_episode_lines(capsys.readouterr().out) == (3, 6, 12)


def test_sample_is_deterministic(capsys):
    main(["sample", "--index", "7"])
    first = capsys.readouterr().out
    main(["sample", "--index", "7"])
    assert capsys.readouterr().out == first
    main(["sample", "--index", "8"])
    assert capsys.readouterr().out != first


def test_sample_from_csv(tmp_path, capsys):
    source = write_csv(tmp_path / "intents.csv", intent_rows())
    overrides = [f"{k}={v}" for k, v in csv_overrides(source).items()]
    args = ["sample", *overrides, "--pool", "test", "--n-way", "3", "--k-shot", "2"]
    assert main([*args, "--q-queries", "3"]) == 0
    out = capsys.readouterr().out
    assert "intents.csv[meta-test]" in out
    assert count_episode_lines(out) == (3, 6, 9)


# --------------------------------------------------------------------------- train / eval


@pytest.fixture(scope="module")
def trained(tiny_train):
    """conftest's tiny `metalm -q train` run: (run_dir, overrides, report.json, what it
    printed)."""
    report = json.loads((tiny_train.run_dir / "report.json").read_text())
    return tiny_train.run_dir, tiny_train.overrides, report, tiny_train.printed


def test_train_writes_a_complete_run(trained):
    run_dir, _, _, printed = trained
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "checkpoint").is_dir()
    assert any((run_dir / "checkpoint").iterdir())
    assert not (run_dir / "tensorboard").exists()  # train.tensorboard=False
    # the table is printed
    assert "| protonet | 3-way 1-shot |" in printed
    assert "| frozen | 3-way 1-shot |" in printed
    assert str(run_dir / "report.md") in printed


def test_train_report_contents(trained):
    run_dir, overrides, report, _ = trained
    config = load_config(None, overrides)
    protocols = [f"{s.n_way}-way {s.k_shot}-shot" for s in config.eval.settings]
    protocols += [f"full-way {k}-shot" for k in config.eval.full_way_shots]
    methods = [config.learner.name] + [b.name for b in config.eval.baselines]
    results = results_by_key(report)
    assert set(results) == {(m, p) for m in methods for p in protocols}
    for (method, _protocol), row in results.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["ci95"] >= 0.0
        assert row["episodes"] == config.eval.episodes
        assert len(row["per_episode"]) == config.eval.episodes
        assert all(0.0 <= a <= 1.0 for a in row["per_episode"])
        assert row["accuracy"] == pytest.approx(sum(row["per_episode"]) / config.eval.episodes)
        assert row["n_way"] == 3 and row["k_shot"] == 1
        assert row["dataset"] == "banking77/test"
        assert (row["vs_frozen"] is None) == (method == "frozen")
    assert report["train"]["steps"] == config.train.steps
    assert report["train"]["best_step"] in (3, 6)
    assert report["run_dir"] == str(run_dir)
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, config.train.steps + 1))
    assert [r["step"] for r in log if "val_accuracy" in r] == [3, 6]
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# metalm report")
    assert "| protonet | 3-way 1-shot | banking77/test |" in markdown


def test_saved_config_reloads_to_the_same_config(trained):
    run_dir, overrides, _, _ = trained
    assert load_config(run_dir / "config.yaml") == load_config(None, overrides)


@pytest.mark.slow
def test_run_dir_that_holds_a_run_is_left_alone(trained, capsys):
    run_dir, overrides, _, _ = trained
    before = snapshot(run_dir)
    result = run_cli("train", *overrides, cwd=run_dir.parent)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "already holds a run", str(run_dir), "--resume")
    assert snapshot(run_dir) == before
    for command in ("train", "eval", "demo"):
        assert main(["-q", command, *overrides]) == 2
        assert_one_line_error(capsys.readouterr().err, "already holds a run", str(run_dir))
        assert snapshot(run_dir) == before


@pytest.mark.slow
def test_eval_run_reproduces_the_report(trained):
    run_dir, _, report, _ = trained
    before = results_by_key(report)
    result = run_cli("eval", "--run", str(run_dir), "--name", "again", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert str(run_dir / "evals" / "again" / "report.md") in result.stdout
    again = results_by_key(json.loads((run_dir / "evals" / "again" / "report.json").read_text()))
    assert set(again) == set(before)
    for key, row in before.items():
        assert again[key]["accuracy"] == pytest.approx(row["accuracy"], abs=1e-6), key
        assert again[key]["per_episode"] == pytest.approx(row["per_episode"], abs=1e-6), key
        assert again[key]["ci95"] == pytest.approx(row["ci95"], abs=1e-6), key
    assert "| protonet | 3-way 1-shot |" in result.stdout


def test_eval_run_with_overrides(trained, capsys):
    run_dir, _, _, _ = trained
    args = ["-q", "eval", "--run", str(run_dir), "--name", "three", "eval.episodes=3"]
    assert main(args) == 0
    assert "| frozen | 3-way 1-shot |" in capsys.readouterr().out
    report = json.loads((run_dir / "evals" / "three" / "report.json").read_text())
    assert {r["episodes"] for r in report["results"]} == {3}
    assert all(len(r["per_episode"]) == 3 for r in report["results"])


def test_eval_run_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["-q", "eval", "--run", str(tmp_path / "nothing")]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a run directory")
    assert main(["-q", "eval", "--run", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a run directory", "config.yaml")


def test_eval_with_config_file_without_training(tiny_model_dir, tmp_path, capsys):
    overrides = tiny_overrides(
        tiny_model_dir, tmp_path / "runs", run_name="evalonly", **{"eval.episodes": 4}
    )
    nested: dict = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        set_dotted(nested, key, yaml.safe_load(raw))
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump(nested), encoding="utf-8")
    assert main(["-q", "eval", "-c", str(config_file)]) == 0
    assert "| protonet | 3-way 1-shot |" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "evalonly"
    for name in ("config.yaml", "report.json", "report.md", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    for name in ("log.jsonl", "best.safetensors", "checkpoint", "training.png"):
        assert not (run_dir / name).exists(), name
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == 0
    assert saved.eval.episodes == 4
    report = json.loads((run_dir / "report.json").read_text())
    assert report["train"] == {}
    results = results_by_key(report)
    assert set(results) == {("protonet", "3-way 1-shot"), ("frozen", "3-way 1-shot")}
    for row in results.values():
        assert len(row["per_episode"]) == 4
        assert 0.0 <= row["accuracy"] <= 1.0 and row["ci95"] >= 0.0
    # untrained protonet and frozen are the same nearest-centroid rule on the same tasks
    assert results[("protonet", "3-way 1-shot")]["per_episode"] == pytest.approx(
        results[("frozen", "3-way 1-shot")]["per_episode"]
    )


@pytest.mark.slow
def test_train_on_csv_with_small_class_dropped(tiny_model_dir, tmp_path):
    rows = intent_rows()
    rows = [r for r in rows if r[1] != "alarm"] + [r for r in rows if r[1] == "alarm"][:3]
    source = write_csv(tmp_path / "intents.csv", rows)
    extra = csv_overrides(source, **{"data.drop_small_classes": "true"})
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "runs", **extra)
    assert main(["-q", "train", *overrides]) == 0
    report = json.loads((tmp_path / "runs" / "run" / "report.json").read_text())
    assert {r["dataset"] for r in report["results"]} == {"intents.csv"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["results"])


@pytest.mark.slow
def test_train_resume_of_a_finished_run(tiny_model_dir, tmp_path, capsys):
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "runs", **{"train.steps": 4})
    assert main(["-q", "train", *overrides]) == 0
    run_dir = tmp_path / "runs" / "run"
    first = results_by_key(json.loads((run_dir / "report.json").read_text()))
    log = (run_dir / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["-q", "train", "--resume", str(run_dir)]) == 0
    assert "| protonet | 3-way 1-shot |" in capsys.readouterr().out
    assert (run_dir / "log.jsonl").read_text() == log  # nothing left to train
    report = json.loads((run_dir / "report.json").read_text())
    assert report["train"]["steps"] == 4
    again = results_by_key(report)
    for key, row in first.items():
        assert again[key]["per_episode"] == pytest.approx(row["per_episode"], abs=1e-6), key


# --------------------------------------------------------------------------- bad input


def small_class_csv(tmp_path: Path) -> Path:
    rows = intent_rows()
    rows = [r for r in rows if r[1] != "alarm"] + [r for r in rows if r[1] == "alarm"][:3]
    return write_csv(tmp_path / "small.csv", rows)


def blank_text_csv(tmp_path: Path, blank: str) -> Path:
    rows = intent_rows()
    rows[17] = (blank, rows[17][1])
    return write_csv(tmp_path / "blank.csv", rows)


def non_utf8_csv(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.csv"
    text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in intent_rows())
    text += "book a table at the caf\xe9,restaurant\n"
    path.write_bytes(text.encode("latin-1"))
    return path


def broken_jsonl(tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "broken.jsonl", intent_rows())
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(41, '{"text": "play some music", "label": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_INPUTS = {
    # name: (builds the extra overrides from tmp_path, fragments the message must hold)
    "class-smaller-than-k-plus-q": (
        lambda d: csv_overrides(small_class_csv(d)),
        ["'alarm'", "3 examples", "data.drop_small_classes=true"],
    ),
    "empty-text": (
        lambda d: csv_overrides(blank_text_csv(d, "")),
        ["blank.csv", "row 17", "empty"],
    ),
    "whitespace-text": (
        lambda d: csv_overrides(blank_text_csv(d, "   \t ")),
        ["blank.csv", "row 17", "whitespace-only"],
    ),
    "missing-column": (
        lambda d: csv_overrides(write_csv(d / "cols.csv", intent_rows(), ("utterance", "label"))),
        ["cols.csv", "no column 'text'", "utterance", "text_column"],
    ),
    "wrong-text-column-name": (
        lambda d: csv_overrides(
            write_csv(d / "cols.csv", intent_rows()), **{"data.train.text_column": "sentence"}
        ),
        ["cols.csv", "no column 'sentence'", "text_column"],
    ),
    "non-utf8-file": (
        lambda d: csv_overrides(non_utf8_csv(d)),
        ["latin1.csv", "not valid UTF-8", "UTF-8"],
    ),
    "broken-jsonl-line": (
        lambda d: csv_overrides(broken_jsonl(d)),
        ["broken.jsonl:42", "not valid JSON"],
    ),
    "missing-data-file": (
        lambda d: csv_overrides(d / "absent.csv"),
        ["absent.csv", "no such file"],
    ),
    "unknown-learner": (
        lambda d: {"learner.name": "maml9"},
        ["unknown learner 'maml9'", "protonet", "frozen", "finetune"],
    ),
    "unknown-baseline": (
        lambda d: {"eval.baselines": "[{name: maml9}]"},
        ["unknown learner 'maml9'", "protonet"],
    ),
    "unknown-dataset": (
        lambda d: {"data.train.source": "clinc151"},
        ["unknown dataset 'clinc151'", "banking77", "clinc150"],
    ),
    "unknown-test-dataset": (
        lambda d: {"data.test.source": "banking78"},
        ["unknown dataset 'banking78'"],
    ),
    "wrong-type-str-for-int": (
        lambda d: {"train.steps": "many"},
        ["train.steps", "expected int", "'many'"],
    ),
    "wrong-type-bool-for-int": (
        lambda d: {"episode.k_shot": "true"},
        ["episode.k_shot", "expected int"],
    ),
    "wrong-type-list-for-mapping": (
        lambda d: {"eval.settings": "[[3, 1]]"},
        ["eval.settings[0]", "expected a mapping"],
    ),
    "unknown-key": (
        lambda d: {"train.stepz": 3},
        ["train", "unknown key 'stepz'", "valid keys", "'steps'"],
    ),
    "unknown-nested-key": (
        lambda d: {"eval.settings": "[{n_way: 3, shots: 1}]"},
        ["unknown key 'shots'", "k_shot"],
    ),
    "eval-n-way-above-test-classes": (
        lambda d: csv_overrides(
            write_csv(d / "intents.csv", intent_rows()),
            **{"eval.settings": "[{n_way: 5, k_shot: 1}]"},
        ),
        ["intents.csv[meta-test]", "5-way", "4", "n_way"],
    ),
    "episode-n-way-above-train-classes": (
        lambda d: csv_overrides(
            write_csv(d / "intents.csv", intent_rows()), **{"episode.n_way": 13}
        ),
        ["intents.csv[meta-train]", "13-way", "12", "n_way"],
    ),
    "builtin-eval-n-way-above-test-classes": (
        lambda d: {"eval.settings": "[{n_way: 78, k_shot: 1}]"},
        ["banking77/test", "78-way", "77", "n_way"],
    ),
    "bad-fractions": (
        lambda d: csv_overrides(
            write_csv(d / "intents.csv", intent_rows()),
            **{"data.classes.fractions": "[0.6,0.2,0.3]"},
        ),
        ["fractions", "sum to 1"],
    ),
    "bad-schedule": (
        lambda d: {"train.schedule": "exponential"},
        ["train.schedule", "'exponential'"],
    ),
    "bad-eval-every": (
        lambda d: {"train.eval_every": 0},
        ["train.eval_every"],
    ),
    "bad-model-path": (
        lambda d: {"model.name_or_path": str(d / "no-model")},
        ["cannot load encoder", "no-model"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_no_run_dir(case, tiny_model_dir, tmp_path, capsys):
    make_extra, fragments = BAD_INPUTS[case]
    output_dir = tmp_path / "runs"
    overrides = tiny_overrides(tiny_model_dir, output_dir, **make_extra(tmp_path))
    capsys.readouterr()
    assert main(["-q", "train", *overrides]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *fragments)
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["class-smaller-than-k-plus-q", "unknown-key"])
def test_bad_input_as_subprocess(case, tiny_model_dir, tmp_path):
    make_extra, fragments = BAD_INPUTS[case]
    output_dir = tmp_path / "runs"
    overrides = tiny_overrides(tiny_model_dir, output_dir, **make_extra(tmp_path))
    result = run_cli("train", *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, *fragments)
    assert result.stdout == ""
    assert not output_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_resume_rejects_overrides_and_non_runs(tmp_path, capsys):
    assert main(["-q", "train", "--resume", str(tmp_path), "train.steps=3"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--resume", "overrides")
    assert main(["-q", "train", "--resume", str(tmp_path / "none")]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a run directory")


# --------------------------------------------------------------------------- real model

# the floor measured for frozen all-MiniLM-L6-v2 (shared data README): logistic regression,
# the default head
FROZEN_FULL_WAY_5_SHOT = 80.75


@pytest.mark.slow
def test_demo_on_real_minilm_and_real_data(tmp_path):
    result = run_cli(
        "demo",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=demo",
        "train.steps=4",
        "train.eval_every=2",
        "train.val_episodes=3",
        "train.tensorboard=false",
        "data.unlabeled.max_texts=500",
        "eval.episodes=4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "CLINC150" in out and "BANKING77" in out
    protocols = ("5-way 1-shot", "5-way 5-shot", "full-way 5-shot", "full-way 10-shot")
    for method in ("protonet", "protonet (strict split)", "frozen", "frozen/centroid"):
        for protocol in protocols:
            assert f"| {method} | {protocol} | banking77/test |" in out, (method, protocol)
    report = json.loads((tmp_path / "runs" / "demo" / "report.json").read_text())
    results = results_by_key(report)
    assert len(results) == 16
    # the strict run left out the CLINC150 intents named like BANKING77's, and says so
    removed = {o["train_class"] for o in report["removed_overlap"]}
    assert {"exchange_rate", "pin_change", "transfer"} <= removed
    strict = load_config(tmp_path / "runs" / "demo-strict" / "config.yaml")
    assert strict.data.classes.strict and strict.eval.baselines == []
    frozen = results[("frozen", "full-way 5-shot")]
    assert frozen["n_way"] == 77 and frozen["k_shot"] == 5 and frozen["episodes"] == 1
    assert 0.70 <= frozen["accuracy"] <= 0.85
    assert 100 * frozen["accuracy"] == pytest.approx(FROZEN_FULL_WAY_5_SHOT, abs=1.5)
    # the meta-trained encoder was trained on the unlabeled BANKING77 texts' clusters
    saved = tmp_path / "runs" / "demo" / "checkpoint" / "samplers.safetensors"
    assert saved.exists()
    assert results[("protonet", "5-way 1-shot")]["episodes"] == 4
    assert report["train"]["steps"] == 4
