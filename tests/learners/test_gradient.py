"""`metalm.learners.gradient`: what every gradient-based learner shares: settings,
vmapped meta-batches, LoRA, never changing the model, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_real_minilm_briefly
from learner_tools import learner_for, snapshot

from metalm.config import load_config, parse_learner_config, save_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.learners import (
    ANILConfig,
    FOMAMLConfig,
    MAMLConfig,
    MetaSGDConfig,
    ProximalConfig,
    ReptileConfig,
    build_learner,
)
from metalm.models import TextEncoder
from metalm.trainer import MetaTrainer

REPO_ROOT = Path(__file__).resolve().parents[2]


NEW_LEARNERS = {
    "maml": MAMLConfig,
    "fomaml": FOMAMLConfig,
    "anil": ANILConfig,
    "metasgd": MetaSGDConfig,
    "reptile": ReptileConfig,
    "proximal": ProximalConfig,
}


# -- end to end on the real MiniLM and real data --------------------------------------------
E2E = {
    "maml": ["learner.adapt=last_n", "learner.last_n=1"],
    "fomaml": ["learner.adapt=lora", "learner.lora_r=4", "learner.vectorize=true"],
    "anil": ["learner.vectorize=true"],
    "metasgd": ["learner.adapt=bias"],
    "reptile": ["learner.adapt=last_n", "learner.last_n=1", "learner.vectorize=true"],
    "proximal": ["learner.adapt=bias", "learner.implicit=true", "learner.prox_lambda=1.0"],
}


def test_bad_learner_settings_are_clear_errors(tiny_encoder):
    for spec, message in (
        ({"name": "maml", "head_init": "random"}, "head_init"),
        ({"name": "maml", "inner_optimizer": "lbfgs"}, "inner_optimizer"),
        ({"name": "maml", "adapt": "some"}, "learner.adapt"),
        ({"name": "anil", "inner_steps": -1}, "inner_steps"),
        ({"name": "metasgd", "lr_shape": "row"}, "lr_shape"),
        ({"name": "reptile", "adapt": "head"}, "must adapt encoder tensors"),
        ({"name": "proximal", "implicit": True, "prox_lambda": 0.0}, "prox_lambda"),
        ({"name": "maml", "eval_head_init": "ridge"}, "eval_head_init"),
        ({"name": "fomaml", "eval_adapt": "all"}, "eval_adapt"),
    ):
        with pytest.raises(MetalmError, match=message):
            build_learner(tiny_encoder, parse_learner_config(spec))


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "maml", "adapt": "last_n", "last_n": 1},
        {"name": "fomaml", "adapt": "bias"},
        {"name": "anil"},
        {"name": "metasgd", "adapt": "bias", "lr_shape": "element"},
        {"name": "reptile", "adapt": "last_n", "last_n": 1},
        {"name": "proximal", "adapt": "bias", "prox_lambda": 0.5},
    ],
    ids=lambda s: s["name"],
)
def test_vmapped_meta_batch_equals_the_loop(fresh_encoder, episodes, spec):
    fresh_encoder.model.double()  # exact comparison, free of float32 rounding
    learner = learner_for(fresh_encoder, **spec, inner_steps=2, vectorize=True)
    params = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    loop = sum(learner.meta_loss(ep) for ep in episodes) / len(episodes)
    loop.backward()
    expected = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    learner.zero_grad()
    batched = learner.meta_loss_batch(episodes)
    assert batched is not None
    assert batched.item() == pytest.approx(loop.item(), rel=1e-9)
    batched.backward()
    assert expected
    for name, grad in expected.items():
        assert torch.allclose(params[name].grad, grad, rtol=1e-7, atol=1e-10), name


def test_meta_batch_falls_back_to_the_loop(tiny_encoder, episodes):
    learner = learner_for(tiny_encoder, name="anil", vectorize=True)
    other = EpisodeSampler(builtin_dataset("banking77", "test"), 4, 1, 2, seed=1).sample(0)
    assert learner.meta_loss_batch([episodes[0], other]) is None  # shapes differ
    assert learner.meta_loss_batch(episodes[:1]) is None
    assert learner_for(tiny_encoder, name="anil").meta_loss_batch(episodes) is None  # default


def test_lora_adapts_only_the_adapters(fresh_encoder, episodes):
    episode = episodes[0]
    before = fresh_encoder.embed(episode.query_texts)
    learner = learner_for(
        fresh_encoder, name="maml", adapt="lora", lora_r=2, inner_steps=2, inner_lr=0.5
    )
    assert all("lora_" in n for n in learner.adapted_names) and learner.adapted_names
    assert all(p.requires_grad for p in fresh_encoder.model.parameters())  # base meta-trained
    assert torch.allclose(fresh_encoder.embed(episode.query_texts), before, atol=1e-6)  # B = 0
    state = learner.adapt(episode.support_texts, episode.support_labels)
    assert {k for k in state if k.startswith("encoder.")} == {
        "encoder." + n for n in learner.adapted_names
    }
    assert not torch.allclose(
        learner.predict(state, episode.query_texts), learner.logits(state, before)
    )
    learner.meta_loss(episode).backward()
    assert any(
        fresh_encoder.model.get_parameter(n).grad.abs().sum() > 0 for n in learner.adapted_names
    )
    # a second learner on the same encoder does not wrap it twice
    again = learner_for(fresh_encoder, name="maml", adapt="lora", lora_r=2)
    assert again.adapted_names == learner.adapted_names


@pytest.mark.parametrize("name", list(NEW_LEARNERS))
def test_adaptation_never_changes_the_model(tiny_encoder, episodes, name):
    learner = learner_for(tiny_encoder, name=name, inner_steps=2, vectorize=True)
    before = snapshot(learner)
    learner.meta_loss(episodes[0])
    learner.meta_loss_batch(episodes)
    for training in (True, False):
        learner.train(training)
        state = learner.adapt(episodes[0].support_texts, episodes[0].support_labels)
        logits = learner.predict(state, episodes[0].query_texts)
        assert logits.shape == (len(episodes[0].query_texts), 3)
    after = learner.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(not v.requires_grad for v in state.values())


def test_trainer_uses_the_batched_meta_loss(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import tiny_overrides

    from metalm.tasks import build_pools

    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{"learner.name": "metasgd", "learner.vectorize": True, "train.meta_batch_size": 2},
        ),
    )
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    calls = []
    original = learner.meta_loss_batch
    monkeypatch.setattr(
        learner, "meta_loss_batch", lambda eps: calls.append(len(eps)) or original(eps)
    )
    pools = build_pools(config.data, [])
    train = pools.sampler("train", config.episode, 0)
    trainer = MetaTrainer(learner, train, None, config.train, tmp_path / "run", progress=False)
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-3, learner.config.lr_meta_lr]
    rates = [p.detach().clone() for p in learner.inner_lrs.parameters()]
    loss = trainer._step(0)
    assert calls == [2] and math.isfinite(loss)
    assert any(
        not torch.equal(a, b.detach())
        for a, b in zip(rates, learner.inner_lrs.parameters(), strict=True)
    )


@pytest.mark.slow
def test_gradient_learner_resumes_exactly(tiny_model_dir, tmp_path):
    """Interrupted at a checkpoint and resumed = uninterrupted, bitwise (vmap with dropout,
    Meta-SGD's second optimizer group)."""
    from conftest import tiny_overrides

    from metalm.tasks import build_pools

    def trainer(out: Path, steps: int) -> MetaTrainer:
        extra = {
            "learner.name": "metasgd",
            "learner.vectorize": True,
            "learner.inner_steps": 2,
            "train.meta_batch_size": 2,
            "train.steps": steps,
            "train.schedule": "constant",
            "train.warmup_steps": 0,
            "train.checkpoint_every": 2,
            "train.eval_every": 100,
        }
        config = load_config(None, tiny_overrides(tiny_model_dir, out, **extra))
        torch.manual_seed(config.seed)
        learner = build_learner(TextEncoder.from_config(config.model), config.learner)
        train = build_pools(config.data, []).sampler("train", config.episode, config.seed)
        return MetaTrainer(learner, train, None, config.train, out / "run", progress=False)

    whole = trainer(tmp_path / "a", 4)
    whole.fit()
    trainer(tmp_path / "b", 2).fit()
    resumed = trainer(tmp_path / "b", 4)
    resumed.fit(resume=True)
    a, b = whole.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")


# -- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NEW_LEARNERS))
def test_learner_config_loads_by_name(name, tmp_path):
    config = load_config(None, [f"learner.name={name}", "learner.inner_steps=3"])
    assert type(config.learner) is NEW_LEARNERS[name] and config.learner.inner_steps == 3
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize("name", list(NEW_LEARNERS))
def test_shipped_learner_yaml_loads(name):
    config = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert type(config.learner) is NEW_LEARNERS[name]
    assert config.train.steps > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_real_minilm_end_to_end(name, tmp_path):
    run_real_minilm_briefly(name, ["learner.inner_steps=2", *E2E[name]], tmp_path)


# -- test-time adaptation: the head a task starts from, what adapts ------------------------
def test_a_logreg_start_without_steps_is_the_logreg_head(tiny_encoder, episodes):
    """`eval_head_init=logreg` with no test-time steps predicts exactly what `frozen`'s
    logistic-regression head predicts on the same encoder."""
    episode = episodes[0]
    maml = learner_for(
        tiny_encoder, name="maml", adapt="last_n", last_n=1, eval_head_init="logreg",
        eval_inner_steps=0,
    )  # fmt: skip
    frozen = build_learner(tiny_encoder, parse_learner_config({"name": "frozen"}))
    mine = maml.predict(
        maml.adapt(episode.support_texts, episode.support_labels), episode.query_texts
    )
    theirs = frozen.predict(
        frozen.adapt(episode.support_texts, episode.support_labels), episode.query_texts
    )
    torch.testing.assert_close(mine, theirs)


def test_a_logreg_start_then_steps_moves_away_from_it(tiny_encoder, episodes):
    episode = episodes[0]
    spec = {"name": "anil", "eval_head_init": "logreg", "head_lr": 0.5}
    still = learner_for(tiny_encoder, **spec, eval_inner_steps=0)
    moved = learner_for(tiny_encoder, **spec, eval_inner_steps=3)
    a = still.adapt(episode.support_texts, episode.support_labels)
    b = moved.adapt(episode.support_texts, episode.support_labels)
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_eval_adapt_head_adapts_the_head_alone_at_test_time(tiny_encoder, episodes):
    """`eval_adapt=head`: the task state has no encoder tensors, and the head equals ANIL's
    inner loop from the same start on the same embeddings."""
    episode = episodes[0]
    fomaml = learner_for(
        tiny_encoder, name="fomaml", adapt="last_n", last_n=1, eval_adapt="head",
        inner_steps=3, head_lr=0.3,
    )  # fmt: skip
    anil = learner_for(tiny_encoder, name="anil", inner_steps=3, head_lr=0.3)
    state = fomaml.adapt(episode.support_texts, episode.support_labels)
    assert sorted(state) == ["head.bias", "head.weight"]
    expected = anil.adapt(episode.support_texts, episode.support_labels)
    for key in state:
        torch.testing.assert_close(state[key], expected[key])
    trained_like = learner_for(tiny_encoder, name="fomaml", adapt="last_n", last_n=1)
    assert any(
        k.startswith("encoder.")
        for k in trained_like.adapt(episode.support_texts, episode.support_labels)
    )
