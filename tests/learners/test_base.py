"""`metalm.learners.base`: the registry, the interface every learner keeps (parametrized
over all of them), config checks and the shared head helpers."""

from __future__ import annotations

import pytest
import torch
from learner_tools import sampler

from metalm.config import load_config, parse_learner_config
from metalm.errors import MetalmError
from metalm.learners import (
    LEARNERS,
    FrozenCentroids,
    FrozenConfig,
    build_learner,
)
from metalm.learners.base import encoder_params, head_loss, prototype_head
from metalm.models import EncoderConfig
from metalm.models.base import build_model


@pytest.fixture(scope="module")
def episode():
    return sampler(4, 2, 3).sample(0)


# a few steps where a learner's default takes many (finetune: 300 head steps)
FAST = {"finetune": {"head_steps": 5, "steps": 2}}


# -- learners ----------------------------------------------------------------------
def test_registry_has_each_learner_once():
    assert {"frozen", "protonet", "finetune"} <= set(LEARNERS)
    for name, registered in LEARNERS.items():
        assert registered.config_class().name == name
    with pytest.raises(MetalmError, match="valid learners"):
        build_learner(None, FrozenConfig(name="nope"))  # type: ignore[arg-type]


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


def test_support_labels_must_cover_every_class(tiny_encoder):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig())
    with pytest.raises(MetalmError, match="missing"):
        learner.adapt(["a", "b"], [0, 2])


BAD_VALUES = [
    ({"name": "maml", "head_init": "random"}, "head_init must be one of prototype, zero; got"),
    ({"name": "maml", "inner_optimizer": "lbfgs"}, "inner_optimizer must be one of sgd, adam"),
    ({"name": "maml", "eval_head_init": "x"}, "eval_head_init must be one of .*logreg, null"),
    ({"name": "maml", "first_order": True}, "learner.name=fomaml"),
    ({"name": "fomaml", "first_order": False}, "learner.name=maml"),
    ({"name": "reptile", "first_order": False}, "Reptile is first order"),
    ({"name": "maml", "adapt": "some"}, r"learner\.adapt must be one of"),
    ({"name": "maml", "logit_scale": 0.0}, "logit_scale must be > 0"),
    ({"name": "fomaml", "adapt": "lora", "lora_r": 0}, "lora_r must be >= 1"),
    ({"name": "anil", "inner_steps": -1}, "inner_steps"),
    ({"name": "anil", "eval_inner_steps": -2}, "eval_inner_steps must be >= 0"),
    ({"name": "metasgd", "lr_shape": "row"}, "lr_shape must be one of tensor, element"),
    ({"name": "reptile", "adapt": "head"}, "must adapt encoder tensors"),
    ({"name": "proximal", "implicit": True, "prox_lambda": 0.0}, "prox_lambda"),
    ({"name": "proximal", "prox_lambda": -1.0}, "prox_lambda must be >= 0"),
    ({"name": "proximal", "cg_steps": 0}, "cg_steps must be >= 1"),
    ({"name": "metanet", "layers": 0}, "layers must be >= 1"),
    ({"name": "metanet", "finetune_steps": 2, "inner_lr": 0.0}, "inner_lr must be > 0"),
    ({"name": "metanet", "meta_lr": 0.0}, "meta_lr must be > 0"),
    ({"name": "lstm_meta", "init_forget_gate": 1.0}, r"init_forget_gate must be in \(0, 1\)"),
    ({"name": "lstm_meta", "adapter_dim": -1}, "adapter_dim must be >= 0"),
    ({"name": "lstm_meta", "head_init": "ones"}, "head_init must be one of prototype, zero"),
    ({"name": "protonet", "distance": "manhattan"}, "distance must be one of euclidean, cosine"),
    ({"name": "protonet", "init_scale": 0.0}, "init_scale must be > 0"),
    ({"name": "protonet", "train_head": "svm"}, "train_head must be one of"),
    ({"name": "protonet", "ridge_lambda": 0.0}, "ridge_lambda must be > 0"),
    ({"name": "frozen", "head": "knn"}, "head must be one of centroid, logreg, lpft"),
    ({"name": "frozen", "logreg_l2": -1.0}, "logreg_l2 must be >= 0"),
    ({"name": "finetune", "head_init": "ones"}, "head_init must be one of zero, prototype"),
    ({"name": "finetune", "steps": -1}, "head_steps and learner.steps must be >= 0"),
]


def test_shared_head_helpers():
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    head = prototype_head(means)
    x = torch.tensor([[0.9, 0.1], [0.2, 1.5]])
    # the prototype head ranks classes as the nearest centroid does
    nearest = torch.cdist(x, means).argmin(-1)
    assert torch.equal((x @ head["head.weight"].T + head["head.bias"]).argmax(-1), nearest)
    labels = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(
        3.0 * (x @ head["head.weight"].T + head["head.bias"]), labels
    )
    assert torch.equal(head_loss(head, x, labels, 3.0), expected)
    state = {"encoder.layer.bias": torch.ones(1), "head.bias": torch.ones(2)}
    assert encoder_params(state) == {"layer.bias": state["encoder.layer.bias"]}
    assert encoder_params({"head.bias": torch.ones(2)}) is None


@pytest.mark.parametrize("spec, message", BAD_VALUES, ids=lambda v: str(v)[:40])
def test_a_bad_learner_value_fails_when_the_config_is_built(spec, message):
    with pytest.raises(MetalmError, match=message):
        parse_learner_config(spec)
    overrides = [f"learner.{k}={v}" for k, v in spec.items()]
    with pytest.raises(MetalmError, match=message):
        load_config(None, overrides)


def test_every_learner_config_default_is_valid():
    for name, cls in LEARNERS.items():
        assert cls.config_class().name == name


def test_choice_fields_are_checked_in_python_too_and_registration_checks_the_name():
    from dataclasses import dataclass

    from metalm.learners import LearnerConfig, MetaLearner, register_learner

    with pytest.raises(MetalmError, match=r"learner\.head must be one of .*; got 'knn'"):
        FrozenConfig(head="knn")  # not through the parser

    @dataclass
    class OddConfig(LearnerConfig):
        name: str = "odd"

    with pytest.raises(ValueError, match=r"OddConfig\.name is 'odd', not 'even'"):
        register_learner("even", OddConfig)(type("Even", (MetaLearner,), {}))
    assert "even" not in LEARNERS


def test_a_choice_stays_a_choice_where_a_subclass_changes_its_default():
    """A config that overrides a choice field's default keeps its `Literal` type (a plain
    `str` there would silently accept any value)."""
    import typing

    from metalm.choices import literal_values

    for name, cls in LEARNERS.items():
        hints = typing.get_type_hints(cls.config_class)
        for base in cls.config_class.__mro__[1:]:
            if base is object or not hasattr(base, "__dataclass_fields__"):
                continue
            inherited = typing.get_type_hints(base)
            for field, tp in inherited.items():
                if literal_values(tp) is not None:
                    assert literal_values(hints[field]) is not None, (name, field)
