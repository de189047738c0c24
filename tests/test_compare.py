"""`metalm compare`: several learners on the same tasks, one report; resumable; clear
errors. On the tiny BERT (the real leaderboard's commands are in BENCHMARKS.md)."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from run_tools import logged_steps, one_thread_env

from metalm.cli import main
from metalm.compare import CompareEntry, compare, load_compare_config
from metalm.errors import MetalmError
from metalm.models.base import EncoderConfig

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def shared(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values = {"eval.full_way_shots": "[5]", "data.classes.name_similarity": "null", **extra}
    return tiny_overrides(model_dir, out, **values)


def no_full_way(model_dir: Path, out: Path, **extra: object) -> list[str]:
    """`shared` without the full-way protocol (all of BANKING77's test texts), for tests
    that look at something else."""
    return shared(model_dir, out, **{"eval.full_way_shots": "[]", **extra})


def brief(model_dir: Path, out: Path, **extra: object) -> list[str]:
    """`no_full_way` with 2 training steps, 1 validation episode and 2 test episodes, for
    tests that look at neither the numbers nor the steps."""
    fewer = {"train.steps": 2, "train.eval_every": 2, "train.val_episodes": 1}
    return no_full_way(model_dir, out, **{**fewer, "eval.episodes": 2, **extra})


def run_benchmark(monkeypatch, capsys, script: str, *args: str) -> str:
    """`python benchmarks/<script> args` in this process (its folder first on sys.path,
    as the interpreter puts it); what it printed."""
    path = BENCHMARKS / script
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    capsys.readouterr()
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


FULL_WAY = ["[]", pytest.param("[5]", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=FULL_WAY, ids=["3-way", "full-way"])
def full_way(request) -> str:
    """`eval.full_way_shots` of the shared comparison: none in the fast lane (full-way
    tests on all of BANKING77's test texts: seconds per learner), 5-shot in the slow tests."""
    return request.param


def protocols(full_way: str) -> list[str]:
    return ["3-way 1-shot"] + (["full-way 5-shot"] if full_way == "[5]" else [])


@pytest.fixture(scope="module")
def compared(full_way, tiny_model_dir, tmp_path_factory):
    """protonet (head logreg) and anil (its own head) compared once."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    overrides = shared(tiny_model_dir, out.parent / "runs", **{"eval.full_way_shots": full_way})
    assert (
        main(["-q", "compare", "--learners", "protonet", "anil", "--out", str(out), *overrides])
        == 0
    )
    return out


def test_every_learner_is_tested_on_the_same_tasks_beside_its_baselines(compared, full_way):
    report = json.loads((compared / "compare.json").read_text())
    rows = {(r["label"], r["head"], r["result"]["protocol"]): r for r in report["rows"]}
    # protonet's own head is the logreg head: no second row; anil has both
    heads = [("anil", "logreg"), ("anil", "own"), ("protonet", "own")]
    assert sorted(rows) == [(*head, protocol) for head in heads for protocol in protocols(full_way)]
    frozen = {r["protocol"]: r for r in report["baselines"]["frozen"]}
    untrained = {r["protocol"]: r for r in report["baselines"]["anil"]}
    for (label, head, protocol), row in rows.items():
        base = (untrained if (label, head) == ("anil", "own") else frozen)[protocol]
        if label == "protonet":
            base = {r["protocol"]: r for r in report["baselines"]["protonet"]}[protocol]
        mine, theirs = row["result"]["per_episode"], base["per_episode"]
        assert len(mine) == len(theirs)  # the very same episodes / test texts
        expected = sum(a - b for a, b in zip(mine, theirs, strict=True)) / len(mine)
        assert row["vs_same_head"]["mean"] == pytest.approx(expected)
        reference = sum(a - b for a, b in zip(mine, frozen[protocol]["per_episode"], strict=True))
        assert row["vs_frozen"]["mean"] == pytest.approx(reference / len(mine))
        assert row["train_steps"] == 6 and row["meta_train_seconds"] > 0
    # untrained protonet under the logreg head is frozen under it: the same predictions
    assert (
        report["baselines"]["protonet"][0]["per_episode"] == frozen["3-way 1-shot"]["per_episode"]
    )
    assert report["settings"]["anil"]["learner"]["name"] == "anil"
    assert {"test_class": "change_pin", "train_class": "pin_change", "reason": "same words",
            "similarity": None} in report["overlap"]  # fmt: skip
    text = (compared / "compare.md").read_text()
    assert "| anil | own |" in text and "## Settings" in text
    assert all(f"## {protocol}" in text for protocol in protocols(full_way))
    assert (compared / "compare.png").stat().st_size > 0
    for label in ("protonet", "anil"):
        assert (compared / "learners" / label / "report.json").exists()


def test_a_finished_comparison_is_read_back_not_run_again(compared, full_way, tiny_model_dir):
    before = {p: p.stat().st_mtime_ns for p in compared.rglob("*.safetensors")}
    reports = {p: p.read_bytes() for p in (compared / "learners").rglob("report.json")}
    overrides = shared(
        tiny_model_dir, compared.parent / "runs", **{"eval.full_way_shots": full_way}
    )
    assert (
        main(
            ["-q", "compare", "--learners", "protonet", "anil", "--out", str(compared), *overrides]
        )
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in compared.rglob("*.safetensors")} == before
    assert {p: p.read_bytes() for p in reports} == reports


def test_another_shared_config_in_the_same_folder_is_refused(compared, full_way, tiny_model_dir):
    same_but = {"eval.full_way_shots": full_way, "eval.episodes": 3}
    overrides = shared(tiny_model_dir, compared.parent / "runs", **same_but)
    with pytest.raises(MetalmError, match="holds another comparison"):
        config, entries = load_compare_config(None, overrides, ["protonet"])
        compare(config, entries, compared, progress=False)


def test_a_compare_section_gives_each_learner_its_own_settings(tiny_model_dir, tmp_path):
    config_file = tmp_path / "cmp.yaml"
    anil = {"name": "anil", "label": "anil-3", "learner": {"inner_steps": 3},
            "overrides": ["train.steps=2"]}  # fmt: skip
    config_file.write_text(yaml.safe_dump({"compare": {"learners": ["protonet", anil]}}))
    fewer = {"train.val_episodes": 1, "eval.episodes": 2}  # 6 steps but anil-3's 2
    overrides = no_full_way(tiny_model_dir, tmp_path / "runs", **fewer)
    config, entries = load_compare_config(config_file, overrides)
    assert [e.label for e in entries] == ["protonet", "anil-3"]
    report = compare(config, entries[1:], tmp_path / "out", progress=False)
    assert report.settings["anil-3"]["learner"]["inner_steps"] == 3
    assert {row.train_steps for row in report.rows} == {2}
    assert "inner_steps=3" in (tmp_path / "out" / "compare.md").read_text()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"learners": ["protonet", "protonet"]}, "used twice"),
        ({"learners": ["nosuch"]}, "unknown learner 'nosuch'"),
        ({"learners": [{"name": "anil", "overrides": ["eval.episodes=3"]}]}, "not change data"),
        ({"learners": ["anil"], "heads": ["own"]}, "one key, learners"),
        ({"learners": [{"name": "anil", "learner": {"inner_steps": -1}}]}, "inner_steps"),
    ],
)
def test_bad_compare_sections_are_clear_errors_before_anything_is_written(
    tiny_model_dir, tmp_path, section, message
):
    config_file = tmp_path / "cmp.yaml"
    config_file.write_text(yaml.safe_dump({"compare": section}))
    overrides = shared(tiny_model_dir, tmp_path / "runs")
    out = tmp_path / "out"
    with pytest.raises(MetalmError, match=message):
        config, entries = load_compare_config(config_file, overrides)
        compare(config, entries, out, progress=False)
    assert not out.exists()


def test_no_learners_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    overrides = shared(tiny_model_dir, tmp_path / "runs")
    assert main(["compare", "--out", str(tmp_path / "out"), *overrides]) == 2
    assert "no learners" in capsys.readouterr().err


@pytest.mark.slow
def test_one_failing_learner_does_not_stop_the_others(tiny_model_dir, tmp_path, capsys):
    """A learner that fails at run time (here: a NaN loss) is reported on one line; the
    others are run and in the report."""
    entries = [
        CompareEntry("protonet"),
        CompareEntry("anil", label="bad", learner={"head_lr": float("nan")}),
    ]
    overrides = brief(tiny_model_dir, tmp_path / "runs")
    config, _ = load_compare_config(None, overrides, ["frozen"])
    with pytest.raises(MetalmError, match=r"1 of 2 learners failed \(bad\)"):
        compare(config, entries, tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert err.count("bad: error:") == 1
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert {r["label"] for r in report["rows"]} == {"protonet"}
    assert "bad" in report["errors"]
    assert (tmp_path / "out" / "learners" / "bad" / "error.txt").exists()


@pytest.mark.slow
def test_an_interrupted_learner_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    """SIGKILL `metalm compare` in the middle of a learner's meta-training; the same
    command again resumes it from its checkpoint (no step trained twice) and finishes."""
    out = tmp_path / "out"
    overrides = shared(
        tiny_model_dir, tmp_path / "runs", **{"train.steps": 40, "train.checkpoint_every": 4}
    )
    command = [sys.executable, "-m", "metalm", "-q", "compare", "--learners", "anil",
               "--out", str(out), *overrides]  # fmt: skip
    log = out / "learners" / "anil" / "log.jsonl"
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            command, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    deadline = time.monotonic() + 300
    while max(logged_steps(log), default=0) < 10:
        assert proc.poll() is None, (tmp_path / "err").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(logged_steps(log))
    assert killed_at < 40 and not (out / "learners" / "anil" / "report.json").exists()
    resumed = subprocess.run(command[:3] + command[4:], env=one_thread_env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    steps = logged_steps(log)
    assert steps == list(range(1, 41))  # each step once: resumed, not restarted
    assert (out / "compare.json").exists()


def test_trained_learners_are_tested_again_without_training(
    compared, full_way, tiny_model_dir, tmp_path
):
    """`--trained-in`: the learners of another comparison, trained the same way, are
    tested on other test tasks (here `valid`) with other test-time settings."""
    valid = {"data.test.split": "valid", "eval.full_way_shots": full_way}
    valid = shared(tiny_model_dir, tmp_path / "runs", **valid)
    config, _ = load_compare_config(None, valid, ["protonet"])
    entries = [CompareEntry("anil", learner={"eval_inner_steps": 2})]
    out = tmp_path / "valid"
    report = compare(config, entries, out, progress=False, trained_in=compared)
    run_dir = out / "learners" / "anil"
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "best.safetensors").exists()
    assert (run_dir / "trained_in.txt").read_text() == str(
        (compared / "learners" / "anil").resolve()
    )
    assert {row.result.dataset for row in report.rows} == {"banking77/valid"}
    assert {row.train_steps for row in report.rows} == {6}  # the trained run's log
    first = json.loads((compared / "compare.json").read_text())["rows"][0]["result"]
    assert report.rows[0].result.per_episode != first["per_episode"]
    other = [CompareEntry("anil", learner={"inner_steps": 2})]  # another training
    with pytest.raises(MetalmError, match="trained with other settings"):
        compare(config, other, tmp_path / "other", progress=False, trained_in=compared)


@pytest.mark.slow
def test_an_untrained_baseline_is_shared_by_labels_that_differ_in_training(
    compared, full_way, tiny_model_dir, tmp_path
):
    """`anil` trained longer under another label: its untrained self is `anil`'s,
    copied (timings and all), not evaluated again."""
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    same = shared(tiny_model_dir, compared.parent / "runs", **{"eval.full_way_shots": full_way})
    config, _ = load_compare_config(None, same, [])
    longer = CompareEntry("anil", label="anil-long", overrides=["train.steps=3"])
    report = compare(config, [longer], out, progress=False)
    twin, copy = out / "baselines" / "anil", out / "baselines" / "anil-long"
    assert (copy / "report.json").read_bytes() == (twin / "report.json").read_bytes()
    assert yaml.safe_load((copy / "config.yaml").read_text())["run_name"] == "anil-long"
    assert {row.train_steps for row in report.rows} == {3}
    other = CompareEntry("anil", label="anil-2", learner={"eval_inner_steps": 2})
    compare(config, [other], out, progress=False)  # another untrained learner: evaluated
    own = json.loads((out / "baselines" / "anil-2" / "report.json").read_text())
    assert own != json.loads((twin / "report.json").read_text())


def test_learners_named_on_the_command_line_keep_their_compare_settings(tmp_path):
    config_file = tmp_path / "cmp.yaml"
    anil = {"name": "anil", "label": "anil-3", "learner": {"inner_steps": 3}}
    config_file.write_text(yaml.safe_dump({"compare": {"learners": ["protonet", anil]}}))
    _, entries = load_compare_config(config_file, [], ["anil-3", "maml"])
    assert [(e.label, e.name, e.learner) for e in entries] == [
        ("anil-3", "anil", {"inner_steps": 3}),
        ("maml", "maml", {}),
    ]


@pytest.mark.slow
def test_overrides_after_the_learner_names_are_overrides(tiny_model_dir, tmp_path):
    """`--learners protonet train.steps=4`: argparse gives `train.steps=4` to --learners;
    it is an override, not a learner named `train.steps=4`."""
    out = tmp_path / "cmp"
    overrides = shared(tiny_model_dir, tmp_path / "runs", **{"train.steps": 4})
    assert main(["-q", "compare", "--out", str(out), "--learners", "protonet", *overrides]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert {r["label"] for r in report["rows"]} == {"protonet"}
    assert {r["train_steps"] for r in report["rows"]} == {4}


@pytest.mark.slow
def test_a_strict_comparison_reports_the_classes_it_removed(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    overrides = brief(tiny_model_dir, tmp_path / "runs", **{"data.classes.strict": "true"})
    assert main(["-q", "compare", "--out", str(out), "--learners", "protonet", *overrides]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["strict"] is True
    removed = {o["train_class"] for o in report["overlap"]}
    assert "pin_change" in removed
    learner = json.loads((out / "learners" / "protonet" / "report.json").read_text())
    assert removed == {o["train_class"] for o in learner["removed_overlap"]}
    text = (out / "compare.md").read_text()
    assert f"Strict split: {len(removed)} meta-train/meta-val classes removed" in text
    assert "* change_pin ~ pin_change (same words)" in text


@pytest.mark.slow
def test_in_context_learners_are_compared_beside_frozen_minilm(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """On a causal LM: `metaicl` beside itself untrained (`icl` with the same scoring),
    `icl` as its own baseline (evaluated once), `frozen` on the shipped MiniLM."""
    module = importlib.import_module("metalm.compare")
    shipped_model, chosen = module.baseline_model, []

    def baseline_model(config, kind):
        model = shipped_model(config, kind)
        chosen.append((kind, model))
        return model

    monkeypatch.setattr(module, "baseline_model", baseline_model)
    # each episode scores every label's tokens over the tiny Llama's 30k-word vocabulary:
    # one validation of one episode, two test episodes
    causal = {"model.kind": "causal", "model.max_length": 64, "train.eval_every": 6,
              "train.val_episodes": 1, "eval.episodes": 2}  # fmt: skip
    overrides = no_full_way(tiny_llama_dir, tmp_path / "runs", **causal)
    config, entries = load_compare_config(None, overrides, ["icl", "metaicl"])
    report = compare(config, entries, tmp_path / "out", progress=False)
    assert {(r.label, r.head) for r in report.rows} == {("icl", "own"), ("metaicl", "own")}
    icl = next(r for r in report.rows if r.label == "icl")
    assert icl.vs_same_head == pytest.approx((0.0, 0.0), abs=1e-12)  # itself
    assert not (tmp_path / "out" / "baselines" / "icl").exists()
    saved = yaml.safe_load((tmp_path / "out" / "baselines" / "frozen" / "config.yaml").read_text())
    assert saved["model"]["kind"] == "encoder"
    shipped = EncoderConfig().name_or_path  # all-MiniLM-L6-v2
    assert [m.name_or_path for kind, m in chosen if kind == "encoder"] == [shipped]
    untrained = yaml.safe_load(
        (tmp_path / "out" / "baselines" / "metaicl" / "config.yaml").read_text()
    )
    assert untrained["learner"]["name"] == "metaicl" and untrained["train"]["steps"] == 0
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "* **icl**: learner `icl`; no meta-training" in text
    assert "* **metaicl**: learner `metaicl`; 6 steps × meta-batch 1" in text


def test_leaderboard_tables_use_the_heads_chosen_on_valid(
    compared, full_way, tmp_path, monkeypatch, capsys
):
    """benchmarks/leaderboard.py: --choose keeps the better head per learner and protocol;
    --readme prints its accuracy and paired Δ per report, `not run` where a report lacks it."""
    report = json.loads((compared / "compare.json").read_text())
    choices = tmp_path / "choices.json"
    run = [monkeypatch, capsys, "leaderboard.py"]
    run_benchmark(*run, "--choose", str(compared / "compare.json"), str(choices))
    heads = json.loads(choices.read_text())["heads"]
    for label, protocol_heads in heads.items():
        for protocol, head in protocol_heads.items():
            accuracies = {
                r["head"]: r["result"]["accuracy"]
                for r in report["rows"]
                if r["label"] == label and r["result"]["protocol"] == protocol
            }
            assert accuracies[head] == max(accuracies.values())
    partial = tmp_path / "partial.json"  # a second report where anil was not run
    partial.write_text(
        json.dumps({**report, "rows": [r for r in report["rows"] if r["label"] != "anil"]})
    )
    printed = run_benchmark(
        *run, "--readme", str(compared / "compare.json"), str(partial), "--targets", str(choices)
    )
    lines = {line.split(" | ")[0]: line for line in printed.splitlines()}
    anil = [
        r
        for r in report["rows"]
        if r["label"] == "anil" and r["head"] == heads["anil"]["3-way 1-shot"]
    ]
    first = next(r for r in anil if r["result"]["protocol"] == "3-way 1-shot")
    assert f"| anil | {100 * first['result']['accuracy']:.2f} (" in lines["| anil"]
    n = len(protocols(full_way))
    assert lines["| anil"].count("not run") == n and "not run" not in lines["| protonet"]
    assert lines["| frozen (logreg)"].count("|") == 2 * n + 2  # 2 reports × n protocols
    printed = run_benchmark(
        *run, str(compared / "compare.json"), "--paired", "anil", "baseline:frozen"
    )
    own = next(
        r["vs_frozen"]
        for r in report["rows"]
        if (r["label"], r["head"], r["result"]["protocol"]) == ("anil", "own", "3-way 1-shot")
    )
    mean, ci = 100 * own["mean"], 100 * own["ci95"]
    expected = f"anil − baseline:frozen (3-way 1-shot, 5): {mean:+.2f} ± {ci:.2f}"
    assert expected in printed


def test_a_fix_is_paired_with_its_original_on_the_same_episodes(
    compared, tmp_path, monkeypatch, capsys
):
    """benchmarks/leaderboard_fix_ablation.py on anil against itself: no difference, and
    its difference to frozen is the one compare reports."""
    out = tmp_path / "ablation.json"
    run_benchmark(
        monkeypatch, capsys, "leaderboard_fix_ablation.py", "--fix", str(compared), "anil",
        "--original", str(compared), "anil", "--out", str(out),
    )  # fmt: skip
    rows = {(r["head"], r["protocol"]): r for r in json.loads(out.read_text())["rows"]}
    report = json.loads((compared / "compare.json").read_text())
    for r in (r for r in report["rows"] if r["label"] == "anil"):
        row = rows[(r["head"], r["result"]["protocol"])]
        assert row["fix_minus_original"]["mean"] == 0.0
        assert row["fix_minus_frozen"]["mean"] == pytest.approx(r["vs_frozen"]["mean"])
