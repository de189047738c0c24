"""`learner.label_names`: class names as support examples or as a prior, the detection
of names that are ids, and meta-training that reads them."""

from __future__ import annotations

import warnings

import pytest
import torch
from learner_tools import learner_for, sampler

from metalm.classifier import FewShotClassifier
from metalm.config import parse_learner_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.label_names import is_meaningless, meaningless_names, usable_names
from metalm.learners import FrozenCentroids, FrozenConfig, ProtoNet, ProtoNetConfig, build_learner
from metalm.learners.heads import fit_logreg
from metalm.learners.protonet import weighted_means
from metalm.models import EncoderConfig, TextEncoder
from metalm.runs.accuracy import episode_correct


@pytest.fixture(scope="module")
def episode() -> Episode:
    return sampler(4, 2, 2).sample(0)


@pytest.mark.parametrize(
    "name", ["0", "12", "class_3", "LABEL_2", "label 7", "cluster-4", "unlabeled-9", "B", "w2", ""]
)
def test_ids_are_meaningless(name):
    assert is_meaningless(name)


@pytest.mark.parametrize(
    "name", ["card_arrival", "Book-Flight", "pos", "cat", "text", "label_sports", "PIN"]
)
def test_words_are_meaningful(name):
    assert not is_meaningless(name)


def test_usable_names_warn_once_per_call_and_switch_off_on_ids():
    assert usable_names(["card_arrival", "top_up"]) == ["card arrival", "top up"]
    with pytest.warns(UserWarning, match="'0', '1'.*look like ids"):
        assert usable_names(["0", "1", "top_up"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert usable_names(["cluster-1", "cluster-2"], warn=False) is None
    assert meaningless_names(["top_up", "id_3"]) == ["id_3"]
    # a few ids among words: those names alone are left out, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert usable_names(["w2", "top_up", "text"]) == [None, "top up", "text"]


def test_embedding_heads_read_names_by_default_and_old_models_do_not(tmp_path, tiny_encoder):
    """`example` is the default of frozen/protonet (chosen on valid); a model saved
    before the option existed loads without it; the other learners default to off."""
    import json

    from metalm.pretrained import METADATA, from_pretrained, save_pretrained

    assert FrozenConfig().label_names == ProtoNetConfig().label_names == "example"
    assert parse_learner_config({"name": "anil"}).label_names == "off"
    save_pretrained(build_learner(tiny_encoder, FrozenConfig()), tmp_path / "m")
    assert from_pretrained(tmp_path / "m").config.label_names == "example"
    metadata = json.loads((tmp_path / "m" / METADATA).read_text())
    del metadata["learner"]["label_names"]
    (tmp_path / "m" / METADATA).write_text(json.dumps(metadata))
    assert from_pretrained(tmp_path / "m").config.label_names == "off"


def test_config_checks_say_what_to_fix():
    with pytest.raises(MetalmError, match="label_names must be one of off, example, prior"):
        FrozenConfig(label_names="names")
    with pytest.raises(MetalmError, match="label_name_weight must be > 0"):
        ProtoNetConfig(label_names="example", label_name_weight=0)
    with pytest.raises(MetalmError, match=r"use learner\.label_names=example"):
        parse_learner_config({"name": "anil", "label_names": "prior"})
    with pytest.raises(MetalmError, match="label_name_weight=1"):
        parse_learner_config({"name": "metanet", "label_names": "example", "label_name_weight": 2})
    assert parse_learner_config({"name": "maml", "label_names": "example"}).label_names == "example"


def test_off_reads_no_names(tiny_encoder, episode):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig(label_names="off"))
    named = learner.adapt_named(episode.support_texts, episode.support_labels, episode.label_names)
    plain = learner.adapt(episode.support_texts, episode.support_labels)
    assert torch.equal(named["head.weight"], plain["head.weight"])


def test_centroid_counts_each_name_as_weighted_examples(tiny_encoder, episode):
    config = FrozenConfig(head="centroid", label_names="example", label_name_weight=3.0)
    state = FrozenCentroids(tiny_encoder, config).adapt_named(
        episode.support_texts, episode.support_labels, episode.label_names
    )
    support = tiny_encoder.embed(episode.support_texts)
    names = tiny_encoder.embed([n.replace("_", " ") for n in episode.label_names])
    labels = torch.tensor(episode.support_labels)
    expected = torch.stack(
        [(support[labels == c].sum(0) + 3.0 * names[c]) / (2 + 3.0) for c in range(4)]
    )
    assert torch.allclose(state["prototypes"], expected, atol=1e-5)


def test_weighted_means_is_differentiable_and_plain_without_weights():
    x = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    plain = weighted_means(x, y, 3)
    assert torch.allclose(plain, torch.stack([x[y == c].mean(0) for c in range(3)]))
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 2.0])
    means = weighted_means(x, y, 3, weights)
    assert torch.allclose(means[0], (x[0] + 3 * x[1]) / 4)
    means.sum().backward()
    assert torch.allclose(x.grad[:2, 0], torch.tensor([0.25, 0.75]))


def test_logreg_example_weight_equals_repeating_the_name(tiny_encoder, episode):
    """A name of weight 2 is fitted as two copies of it."""
    features = tiny_encoder.embed(episode.support_texts)
    names = tiny_encoder.embed([n.replace("_", " ") for n in episode.label_names])
    labels = torch.tensor(episode.support_labels)
    classes = torch.arange(4)
    weighted = fit_logreg(
        torch.cat([features, names]),
        torch.cat([labels, classes]),
        4,
        l2=1e-3,
        sample_weight=torch.cat([torch.ones(len(labels)), torch.full((4,), 2.0)]),
    )
    repeated = fit_logreg(
        torch.cat([features, names, names]), torch.cat([labels, classes, classes]), 4, l2=1e-3
    )
    once = fit_logreg(torch.cat([features, names]), torch.cat([labels, classes]), 4, l2=1e-3)
    gap = (weighted["head.weight"] - repeated["head.weight"]).abs().max()
    assert gap < 1e-2 < (once["head.weight"] - repeated["head.weight"]).abs().max()


def test_prior_pulls_the_head_towards_the_names(tiny_encoder, episode):
    features = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    names = torch.nn.functional.normalize(torch.randn(4, features.shape[1]), dim=-1)
    plain = fit_logreg(features, labels, 4, l2=1e-2)["head.weight"]
    weak = fit_logreg(features, labels, 4, l2=1e-2, prior=names, prior_weight=0.5)["head.weight"]
    strong = fit_logreg(features, labels, 4, l2=1e-2, prior=names, prior_weight=50)["head.weight"]

    def alignment(weight):
        return torch.nn.functional.cosine_similarity(weight, names, dim=-1).mean()

    assert alignment(plain) < alignment(weak) < alignment(strong)
    with pytest.raises(ValueError, match="prior must be"):
        fit_logreg(features, labels, 4, prior=names[:2])


def test_logreg_modes_change_the_head_and_ids_leave_it_as_off(tiny_encoder, episode):
    args = (episode.support_texts, episode.support_labels)
    off = FrozenCentroids(tiny_encoder, FrozenConfig()).adapt(*args)
    for mode in ("example", "prior"):
        learner = FrozenCentroids(tiny_encoder, FrozenConfig(label_names=mode))
        named = learner.adapt_named(*args, episode.label_names)
        assert not torch.allclose(named["head.weight"], off["head.weight"], atol=1e-4), mode
        with pytest.warns(UserWarning, match="look like ids"):
            ids = learner.adapt_named(*args, [str(i) for i in range(4)])
        assert torch.equal(ids["head.weight"], off["head.weight"])
    with pytest.raises(MetalmError, match="4 classes but 3 label names"):
        learner.adapt_named(*args, episode.label_names[:3])


def test_a_name_that_is_an_id_is_left_out_alone(tiny_encoder, episode):
    config = FrozenConfig(head="centroid", label_names="example")
    names = ["w2", *episode.label_names[1:]]
    state = FrozenCentroids(tiny_encoder, config).adapt_named(
        episode.support_texts, episode.support_labels, names
    )
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    assert torch.allclose(state["prototypes"][0], support[labels == 0].mean(0), atol=1e-6)
    named = tiny_encoder.embed([names[1].replace("_", " ")])[0]
    assert torch.allclose(
        state["prototypes"][1], (support[labels == 1].sum(0) + named) / 3, atol=1e-5
    )
    prior = FrozenCentroids(tiny_encoder, FrozenConfig(label_names="prior"))
    assert torch.isfinite(
        prior.adapt_named(episode.support_texts, episode.support_labels, names)["head.weight"]
    ).all()


def test_other_learners_add_each_name_as_one_support_example(tiny_encoder, episode):
    args = (episode.support_texts, episode.support_labels)
    learner = learner_for(tiny_encoder, name="anil", label_names="example", inner_steps=2)
    named = learner.adapt_named(*args, episode.label_names)
    by_hand = learner.adapt(
        episode.support_texts + [n.replace("_", " ") for n in episode.label_names],
        [*episode.support_labels, 0, 1, 2, 3],
    )
    assert torch.allclose(named["head.weight"], by_hand["head.weight"])
    plain = learner_for(tiny_encoder, name="anil", inner_steps=2).adapt_named(
        *args, episode.label_names
    )
    assert not torch.allclose(named["head.weight"], plain["head.weight"])


def test_meta_loss_reads_names_of_labeled_sources_only(tiny_encoder, episode):
    torch.manual_seed(0)
    off = ProtoNet(tiny_encoder, ProtoNetConfig(label_names="off")).eval()
    on = ProtoNet(tiny_encoder, ProtoNetConfig(label_names="example")).eval()
    assert not torch.allclose(on.meta_loss(episode), off.meta_loss(episode))
    clusters = Episode(
        episode.support_texts,
        episode.support_labels,
        episode.query_texts,
        episode.query_labels,
        [f"cluster-{i}" for i in range(4)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cluster tasks are nameless by design: no warning
        assert torch.equal(on.meta_loss(clusters), off.meta_loss(clusters))
    ridge = ProtoNet(tiny_encoder, ProtoNetConfig(label_names="example", train_head="ridge"))
    assert torch.isfinite(ridge.eval().meta_loss(episode))


def test_classifier_uses_and_saves_the_option(tiny_encoder, tmp_path):
    from metalm.pretrained import save_pretrained

    learner = build_learner(tiny_encoder, FrozenConfig(label_names="example"))
    save_pretrained(learner, tmp_path / "model")
    clf = FewShotClassifier.from_pretrained(tmp_path / "model")
    assert clf.learner.config.label_names == "example"
    texts = ["my card has not arrived", "where is my card", "top up failed", "top-up declined"]
    labels = ["card_arrival", "card_arrival", "top_up_failed", "top_up_failed"]
    named = clf.adapt(texts, labels).state_["head.weight"]
    plain = FewShotClassifier(
        build_learner(tiny_encoder, FrozenConfig(label_names="off")), "m", "f"
    )
    assert not torch.allclose(named, plain.adapt(texts, labels).state_["head.weight"])
    with pytest.warns(UserWarning, match="look like ids"):
        clf.unfitted().adapt(texts, [0, 0, 1, 1])


# -- the real MiniLM -----------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_names_help_one_shot_banking77():
    """On 40 BANKING77 validation episodes (5-way 1-shot), the names as examples lift
    the frozen MiniLM's accuracy (+6 points over 600 episodes in the benchmark)."""
    encoder = TextEncoder.from_config(EncoderConfig())
    episodes = EpisodeSampler(builtin_dataset("banking77", "valid"), 5, 1, 5, seed=0)
    chosen = [episodes.sample(i) for i in range(40)]
    plain = FrozenCentroids(encoder, FrozenConfig(label_names="off"))
    named = FrozenCentroids(encoder, FrozenConfig())
    with_names = sum(episode_correct(named, e).mean() for e in chosen) / 40
    without = sum(episode_correct(plain, e).mean() for e in chosen) / 40
    assert with_names > without + 0.02
