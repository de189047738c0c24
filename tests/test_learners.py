"""Encoder, learners and evaluation on a tiny random BERT (fast), plus the real MiniLM."""

from __future__ import annotations

import math

import pytest
import torch

from metalm.config import parse_learner_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.evaluate import Z95, evaluate_episodes, mean_ci95
from metalm.learners import (
    LEARNERS,
    Finetune,
    FinetuneConfig,
    FrozenCentroids,
    FrozenConfig,
    ProtoNet,
    ProtoNetConfig,
    build_learner,
)
from metalm.models import EncoderConfig, TextEncoder
from metalm.models.causal import build_model
from metalm.report import EvalReport


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), max_length=16))


@pytest.fixture(scope="module")
def episode():
    return EpisodeSampler(builtin_dataset("banking77", "test"), 4, 2, 3, seed=5).sample(0)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# -- encoder -----------------------------------------------------------------------
def test_embed_matches_forward_and_is_normalized(tiny_encoder):
    texts = ["short", "a somewhat longer sentence about cards", "mid length text"]
    tiny_encoder.eval()
    with torch.no_grad():
        direct = tiny_encoder(texts)
    batched = tiny_encoder.embed(texts, batch_size=2)  # sorted by length, re-ordered back
    assert torch.allclose(direct, batched, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_padding_does_not_change_embeddings(tiny_encoder):
    tiny_encoder.eval()
    alone = tiny_encoder.embed(["hi"])
    with_long = tiny_encoder.embed(["hi", "a much longer text that forces padding of hi"])
    assert torch.allclose(alone[0], with_long[0], atol=1e-5)


def test_truncation_and_token_cache(tiny_encoder):
    long_text = " ".join(["word"] * 100)
    batch = tiny_encoder.tokenize([long_text])
    assert batch["input_ids"].shape[1] == 16
    assert long_text in tiny_encoder._token_cache


def test_cls_pooling_and_bad_pooling(tiny_model_dir):
    cls = TextEncoder.from_config(
        EncoderConfig(name_or_path=str(tiny_model_dir), pooling="cls", normalize=False)
    )
    cls.eval()
    batch = cls.tokenize(["hello world"])
    with torch.no_grad():
        hidden = cls.model(**batch).last_hidden_state
    assert torch.allclose(cls.embed(["hello world"])[0], hidden[0, 0], atol=1e-5)
    with pytest.raises(MetalmError, match="pooling"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), pooling="max"))


def test_functional_params_leave_model_untouched(tiny_encoder):
    before = snapshot(tiny_encoder)
    params = {k: v.detach().clone() + 0.5 for k, v in tiny_encoder.model.named_parameters()}
    shifted = tiny_encoder.embed(["hello"], params=params)
    plain = tiny_encoder.embed(["hello"])
    assert not torch.allclose(shifted, plain)
    assert_unchanged(before, tiny_encoder)


def test_embedding_cache_is_used_and_scoped(tiny_encoder):
    texts = ["alpha", "beta"]
    with tiny_encoder.cached_embeddings(texts):
        tiny_encoder._embedding_cache["alpha"] = torch.full((tiny_encoder.dim,), 7.0)
        assert torch.all(tiny_encoder.embed(["alpha"]) == 7.0)
    assert not torch.all(tiny_encoder.embed(["alpha"]) == 7.0)
    assert tiny_encoder._embedding_cache is None


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(MetalmError, match="cannot load encoder"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tmp_path / "nope")))


# -- learners ----------------------------------------------------------------------
def test_registry_has_each_learner_once():
    assert {"frozen", "protonet", "finetune"} <= set(LEARNERS)
    for name, registered in LEARNERS.items():
        assert registered.config_class().name == name
    with pytest.raises(MetalmError, match="valid learners"):
        build_learner(None, FrozenConfig(name="nope"))  # type: ignore[arg-type]


# a few steps where a learner's default takes many (finetune: 300 head steps)
FAST = {"finetune": {"head_steps": 5, "steps": 2}}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_adapts_predicts_and_meta_trains(
    name, tiny_model_dir, tiny_llama_dir, episode
):
    """Each registered learner on its kind of model (a tiny BERT, or a tiny Llama for the
    in-context learners): finite [queries, N] logits; a meta-trainable one also gives a
    finite meta-loss with a gradient."""
    kind = LEARNERS[name].model_kind
    model_dir = tiny_llama_dir if kind == "causal" else tiny_model_dir
    model = build_model(EncoderConfig(kind=kind, name_or_path=str(model_dir), max_length=16))
    learner = build_learner(model, parse_learner_config({"name": name, **FAST.get(name, {})}))
    torch.manual_seed(0)
    state = learner.adapt_named(episode.support_texts, episode.support_labels, episode.label_names)
    logits = learner.predict(state, episode.query_texts)
    assert logits.shape == (len(episode.query_texts), episode.n_way)
    assert torch.isfinite(logits).all()
    if learner.meta_trainable:
        loss = learner.meta_loss(episode)
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in learner.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_frozen_is_nearest_centroid(tiny_encoder, episode):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig(head="centroid"))
    state = learner.adapt(episode.support_texts, episode.support_labels)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    expected = torch.stack([support[labels == c].mean(0) for c in range(episode.n_way)])
    assert torch.allclose(state["prototypes"], expected, atol=1e-6)
    query = tiny_encoder.embed(episode.query_texts)
    nearest = torch.cdist(query, expected).argmin(-1)
    assert torch.equal(learner.predict(state, episode.query_texts).argmax(-1), nearest)


def test_support_labels_must_cover_every_class(tiny_encoder):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig())
    with pytest.raises(MetalmError, match="missing"):
        learner.adapt(["a", "b"], [0, 2])


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_meta_loss_trains_encoder_and_temperature(tiny_encoder, episode, distance):
    learner = ProtoNet(tiny_encoder, ProtoNetConfig(distance=distance))
    learner.train()
    loss = learner.meta_loss(episode)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert learner.log_scale.grad is not None and learner.log_scale.grad != 0
    grads = [p.grad for p in tiny_encoder.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    learner.zero_grad()


def test_protonet_fixed_temperature_and_bad_distance(tiny_encoder):
    fixed = ProtoNet(tiny_encoder, ProtoNetConfig(learn_scale=False))
    assert not fixed.log_scale.requires_grad
    with pytest.raises(MetalmError, match="distance"):
        ProtoNet(tiny_encoder, ProtoNetConfig(distance="manhattan"))


@pytest.mark.parametrize("train_encoder", [False, True])
def test_finetune_never_changes_the_model_and_fits_support(tiny_encoder, episode, train_encoder):
    before = snapshot(tiny_encoder)
    learner = Finetune(
        tiny_encoder,
        FinetuneConfig(head_steps=100, steps=3, head_lr=0.1, lr=1e-3, train_encoder=train_encoder),
    )
    state = learner.adapt(episode.support_texts, episode.support_labels)
    assert_unchanged(before, tiny_encoder)
    assert any(k.startswith("encoder.") for k in state) == train_encoder
    support_logits = learner.predict(state, episode.support_texts)
    accuracy = (support_logits.argmax(-1) == torch.tensor(episode.support_labels)).float().mean()
    assert accuracy == 1.0  # a linear head on 8 distinct texts separates them


def test_finetune_is_deterministic(tiny_encoder, episode):
    learner = Finetune(tiny_encoder, FinetuneConfig(head_steps=5, steps=2))
    a = learner.predict(learner.adapt(episode.support_texts, episode.support_labels), ["x"])
    b = learner.predict(learner.adapt(episode.support_texts, episode.support_labels), ["x"])
    assert torch.equal(a, b)


def test_finetune_bad_config_fails_at_construction(tiny_encoder):
    with pytest.raises(MetalmError, match="head_init"):
        Finetune(tiny_encoder, FinetuneConfig(head_init="random"))
    with pytest.raises(MetalmError, match="steps"):
        Finetune(tiny_encoder, FinetuneConfig(steps=-1))


# -- evaluation ----------------------------------------------------------------------
def test_mean_ci95_formula():
    values = [0.2, 0.4, 0.9, 0.5]
    mean, ci = mean_ci95(values)
    std = torch.tensor(values, dtype=torch.float64).std().item()
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(Z95 * std / 2)


def test_evaluation_cached_equals_uncached(tiny_encoder):
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 1, 4, seed=2)
    episodes = [sampler.sample(i) for i in range(6)]
    learner = FrozenCentroids(tiny_encoder, FrozenConfig())
    uncached = evaluate_episodes(learner, episodes, "frozen", "p", "d", timing_episodes=6)
    cached = evaluate_episodes(learner, episodes, "frozen", "p", "d", timing_episodes=0)
    assert cached.per_episode == pytest.approx(uncached.per_episode)
    assert uncached.adapt_seconds > 0 and uncached.predict_texts_per_second > 0


def test_full_way_interval_is_over_queries(tiny_encoder):
    episode = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 20, seed=3).sample(0)
    result = evaluate_episodes(
        FrozenCentroids(tiny_encoder, FrozenConfig()), [episode], "frozen", "full", "d"
    )
    p = result.accuracy
    assert result.ci95 == pytest.approx(Z95 * math.sqrt(max(p * (1 - p), 1e-12) / 100))


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


# -- the real MiniLM -----------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_frozen_beats_chance_clearly_on_banking77():
    encoder = TextEncoder.from_config(EncoderConfig())
    assert encoder.dim == 384
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 5, seed=0)
    episodes = [sampler.sample(i) for i in range(20)]
    result = evaluate_episodes(
        FrozenCentroids(encoder, FrozenConfig()),
        episodes,
        "frozen",
        "5-way 1-shot",
        "banking77",
        timing_episodes=2,
        progress=False,
    )
    # published floor for this protocol: 87.09 ± 0.67 over 600 episodes
    assert 0.75 < result.accuracy <= 1.0
