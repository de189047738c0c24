"""Self-training at adapt time (`adapt_unlabeled`, `FewShotClassifier.adapt(unlabeled=)`,
`metalm adapt --unlabeled`): the most confident texts of each class join the support."""

from __future__ import annotations

import json

import pytest
import torch
from learner_tools import learner_for, sampler
from run_tools import LABELS, QUERIES, TEXTS, write_csv

from metalm import FewShotClassifier, MetalmError
from metalm.cli import main
from metalm.learners import FrozenCentroids, FrozenConfig
from metalm.learners.protonet import weighted_means


@pytest.fixture(scope="module")
def episode():
    return sampler(3, 2, 4).sample(0)


def test_an_empty_pool_is_plain_adapt(tiny_encoder, episode):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig())
    args = (episode.support_texts, episode.support_labels)
    plain = learner.adapt(*args)
    state = learner.adapt_unlabeled(*args, None, [])
    assert torch.equal(state["head.weight"], plain["head.weight"])


def test_centroid_adds_the_most_confident_texts_of_each_class(tiny_encoder, episode):
    config = FrozenConfig(head="centroid", self_train_per_class=1, self_train_weight=0.5)
    learner = FrozenCentroids(tiny_encoder, config)
    args = (episode.support_texts, episode.support_labels)
    pool = episode.query_texts
    first = learner.adapt(*args)
    probs = learner.predict(first, pool).softmax(-1)
    confidence, guess = probs.max(-1)
    chosen = [
        int(max((i for i in range(len(pool)) if guess[i] == c), key=lambda i: confidence[i]))
        for c in range(3)
        if (guess == c).any()
    ]
    state = learner.adapt_unlabeled(*args, None, pool)
    support = tiny_encoder.embed(episode.support_texts)
    rows = torch.cat([support, tiny_encoder.embed([pool[i] for i in chosen])])
    labels = torch.cat([torch.tensor(episode.support_labels), guess[chosen]])
    weights = torch.cat([torch.ones(len(support)), torch.full((len(chosen),), 0.5)])
    expected = weighted_means(rows, labels, 3, weights)
    assert torch.allclose(state["prototypes"], expected, atol=1e-5)


def test_min_prob_can_leave_every_text_out(tiny_encoder, episode):
    args = (episode.support_texts, episode.support_labels)
    picky = FrozenCentroids(tiny_encoder, FrozenConfig(self_train_min_prob=0.999999))
    state = picky.adapt_unlabeled(*args, None, episode.query_texts)
    plain = picky.adapt(*args)
    assert torch.equal(state["head.weight"], plain["head.weight"])
    eager = FrozenCentroids(tiny_encoder, FrozenConfig(self_train_per_class=3))
    changed = eager.adapt_unlabeled(*args, None, episode.query_texts)
    assert not torch.allclose(changed["head.weight"], plain["head.weight"], atol=1e-4)


def test_bad_options_and_learners_without_self_training_say_so(tiny_encoder, episode):
    with pytest.raises(MetalmError, match="self_train_per_class must be >= 1"):
        FrozenConfig(self_train_per_class=0)
    with pytest.raises(MetalmError, match=r"self_train_min_prob must be in \[0, 1\)"):
        FrozenConfig(self_train_min_prob=1.0)
    anil = learner_for(tiny_encoder, name="anil")
    with pytest.raises(MetalmError, match="does not self-train"):
        anil.adapt_unlabeled(episode.support_texts, episode.support_labels, None, ["x"])


def test_classifier_and_cli_adapt_with_unlabeled_texts(frozen_dir, tmp_path, capsys):
    pool = [*QUERIES, "snooze the alarm", "sunny or rainy tomorrow"]
    plain = FewShotClassifier.from_pretrained(frozen_dir).adapt(TEXTS, LABELS)
    clf = FewShotClassifier.from_pretrained(frozen_dir).adapt(TEXTS, LABELS, unlabeled=pool)
    assert clf.classes_ == plain.classes_
    assert not torch.allclose(clf.state_["head.weight"], plain.state_["head.weight"], atol=1e-4)
    with pytest.raises(MetalmError, match="unlabeled texts"):
        FewShotClassifier.from_pretrained(frozen_dir).adapt(TEXTS, LABELS, unlabeled=[""])
    support = write_csv(tmp_path / "support.csv", zip(TEXTS, LABELS, strict=True))
    unlabeled = tmp_path / "pool.txt"
    unlabeled.write_text("\n".join(pool) + "\n")
    task = tmp_path / "task"
    args = ["adapt", "--model", str(frozen_dir), "--support", str(support), "--out", str(task)]
    assert main([*args, "--unlabeled", str(unlabeled)]) == 0
    assert f"and {len(pool)} unlabeled texts" in capsys.readouterr().out
    assert json.loads((task / "task.json").read_text())["classes"] == clf.classes_
    loaded = FewShotClassifier.load_task(task)
    assert torch.allclose(loaded.state_["head.weight"], clf.state_["head.weight"])
