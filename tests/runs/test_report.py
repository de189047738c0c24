"""`metalm.runs.report`: method labels, paired differences and the report's files."""

from __future__ import annotations

import numpy as np
import pytest

from metalm.config import load_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.learners import (
    HEADS,
    Finetune,
    FinetuneConfig,
    FrozenCentroids,
    FrozenConfig,
    ProtoNetConfig,
    build_learner,
    method_label,
)
from metalm.runs.accuracy import Z95, MethodResult, evaluate_episodes, mean_ci95
from metalm.runs.report import EvalReport


def test_report_paired_difference_and_files(tiny_encoder, tmp_path):
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 1, 4, seed=2)
    episodes = [sampler.sample(i) for i in range(8)]
    frozen = evaluate_episodes(
        FrozenCentroids(tiny_encoder, FrozenConfig()), episodes, "frozen", "3-way 1-shot", "d"
    )
    tuned = evaluate_episodes(
        Finetune(tiny_encoder, FinetuneConfig(head_steps=20, steps=0)),
        episodes,
        "finetune",
        "3-way 1-shot",
        "d",
    )
    report = EvalReport([tuned, frozen])
    diff = report.paired_difference(tuned)
    expected = [a - b for a, b in zip(tuned.per_episode, frozen.per_episode, strict=True)]
    assert diff == pytest.approx(mean_ci95(expected))
    report.write(tmp_path)
    for name in ("report.json", "report.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "finetune" in (tmp_path / "report.md").read_text()


# -- report labels -----------------------------------------------------------------------
def test_method_label_names_non_default_heads():
    for config_class in (FrozenConfig, ProtoNetConfig):
        name, default = config_class().name, config_class().head
        assert method_label(config_class()) == name
        for head in HEADS:
            expected = name if head == default else f"{name}/{head}"
            assert method_label(config_class(head=head)) == expected
    finetune = load_config(None, ["learner.name=finetune"]).learner
    assert method_label(finetune) == "finetune"  # no head setting: its name


# -- paired intervals on full-way rows ---------------------------------------------------
def test_full_way_rows_keep_each_text_and_get_a_paired_difference(tiny_encoder):
    episode = EpisodeSampler(builtin_dataset("banking77", "test"), 6, 3, 10, seed=4).sample(0)
    results = []
    for config in (FrozenConfig(head="centroid"), FrozenConfig(head="logreg")):
        learner = build_learner(tiny_encoder, config)
        results.append(
            evaluate_episodes(learner, [episode], method_label(config), "full-way 3-shot", "d")
        )
    for result in results:
        assert len(result.per_episode) == len(episode.query_texts) == 60
        assert set(result.per_episode) <= {0.0, 1.0}
        p = result.accuracy
        assert p == pytest.approx(np.mean(result.per_episode))
        assert result.ci95 == pytest.approx(Z95 * np.sqrt(max(p * (1 - p), 1e-12) / 60))
    base, other = results
    base.method = "frozen"  # the report's baseline label
    other.method = "frozen/logreg"
    report = EvalReport([base, other])
    diff = report.paired_difference(other)
    expected = np.asarray(other.per_episode) - np.asarray(base.per_episode)
    assert diff == pytest.approx(mean_ci95(expected))
    assert report.paired_difference(base) is None
    row = report.as_dict()["results"][1]
    assert row["vs_frozen"] == {"mean": pytest.approx(diff[0]), "ci95": pytest.approx(diff[1])}
    assert f"{100 * diff[0]:+.2f} ± {100 * diff[1]:.2f}" in report.to_markdown()


def test_paired_difference_needs_the_same_units():
    def result(method: str, episodes: int, values: list[float]) -> MethodResult:
        mean = float(np.mean(values))
        return MethodResult(method, "p", "d", 3, 1, episodes, mean, 0.1, 0.0, 1.0, values)

    frozen = result("frozen", 1, [1.0, 0.0, 1.0, 1.0])
    fewer = result("x", 1, [1.0, 1.0, 1.0])  # not the same query texts
    assert EvalReport([frozen, fewer]).paired_difference(fewer) is None
    episodic = result("x", 4, [0.5, 0.2, 0.9, 1.0])  # episodes against texts
    assert EvalReport([frozen, episodic]).paired_difference(episodic) is None
    same = result("x", 1, [1.0, 1.0, 0.0, 1.0])
    assert EvalReport([frozen, same]).paired_difference(same) == pytest.approx(
        mean_ci95([0.0, 1.0, -1.0, 0.0])
    )
