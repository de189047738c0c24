"""The gradient-based family (functional inner loops, MAML, FOMAML, ANIL, Meta-SGD,
Reptile, proximal/iMAML): exact checks on toy functions and the tiny random BERT, and one
end-to-end run per learner on the real MiniLM and real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_real_minilm_briefly
from torch import nn

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
    inner_loop,
    select_params,
)
from metalm.learners.functional import conjugate_gradient, vmap_safe_layer_norm
from metalm.learners.gradient import GradientLearner
from metalm.learners.optim import adam, proximal, sgd
from metalm.learners.reptile import reptile_surrogate
from metalm.models import EncoderConfig, TextEncoder
from metalm.trainer import MetaTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
NEW_LEARNERS = {
    "maml": MAMLConfig,
    "fomaml": FOMAMLConfig,
    "anil": ANILConfig,
    "metasgd": MetaSGDConfig,
    "reptile": ReptileConfig,
    "proximal": ProximalConfig,
}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), max_length=16))


@pytest.fixture
def fresh_encoder(tiny_model_dir) -> TextEncoder:
    """An encoder of its own, for tests that change it (dtype, LoRA)."""
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), max_length=16))


@pytest.fixture(scope="module")
def episodes():
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 2, 2, seed=5)
    return [sampler.sample(i) for i in range(3)]


def learner_for(encoder: TextEncoder, **spec) -> GradientLearner:
    learner = build_learner(encoder, parse_learner_config(spec))
    learner.eval()  # no dropout: exact comparisons
    return learner  # type: ignore[return-value]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grads_of(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in params.items()}


def quadratic(_model, params, batch):
    target, scale = batch
    return (scale * (params["w"] - target) ** 2).sum() + (params["b"] ** 3).sum()


# -- inner_loop on toy functions --------------------------------------------------------
def test_inner_loop_equals_hand_written_sgd():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.rand(4) + 0.5
    new = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, sgd(0.1))
    w1, b1 = w - 0.1 * 2 * scale * (w - target), b - 0.1 * 3 * b**2
    w2, b2 = w1 - 0.1 * 2 * scale * (w1 - target), b1 - 0.1 * 3 * b1**2
    assert torch.allclose(new["w"], w2) and torch.allclose(new["b"], b2)
    # second order by default: the result is differentiable like the hand-written one
    (g_auto,) = torch.autograd.grad(new["b"].sum(), b)
    (g_hand,) = torch.autograd.grad(b2.sum(), b)
    assert torch.allclose(g_auto, g_hand)


def test_inner_loop_per_tensor_rates_and_zero_steps():
    w, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    batch = (torch.zeros(3), torch.ones(3))
    new = inner_loop(None, {"w": w, "b": b}, quadratic, batch, 1, sgd({"w": 0.5, "b": 0.0}))
    assert torch.allclose(new["w"], torch.zeros(3)) and torch.equal(new["b"], b)
    same = inner_loop(None, {"w": w, "b": b}, quadratic, batch, 0, sgd(0.1))
    assert same["w"] is w and same["b"] is b
    with pytest.raises(MetalmError, match="inner steps"):
        inner_loop(None, {"w": w}, quadratic, batch, -1, sgd(0.1))


def test_adam_inner_step_equals_formula():
    torch.manual_seed(1)
    w, b = torch.randn(4, requires_grad=True), torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.ones(4)
    new = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, adam(0.01))
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    g1 = 2 * (w - target)
    m, v = (1 - b1_) * g1, (1 - b2_) * g1**2
    w1 = w - 0.01 * (m / (1 - b1_)) / torch.sqrt(v / (1 - b2_) + eps**2)
    g2 = 2 * (w1 - target)
    m, v = b1_ * m + (1 - b1_) * g2, b2_ * v + (1 - b2_) * g2**2
    w2 = w1 - 0.01 * (m / (1 - b1_**2)) / torch.sqrt(v / (1 - b2_**2) + eps**2)
    assert torch.allclose(new["w"], w2, atol=1e-6)
    optimizer = adam(0.1)
    step, state = optimizer.update({"w": torch.zeros(4)}, optimizer.init({"w": w}), {"w": w})
    assert torch.equal(step["w"], w) and torch.isfinite(state.v["w"]).all()
    assert state.count == 1


def test_first_order_carries_no_second_order_terms():
    # inner: 0.5 * a * w^2 -> w' = (1 - lr a) w ; outer: sum(c * w')
    a, c, lr = torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]), 0.1
    for first_order, expected in ((False, c * (1 - lr * a)), (True, c)):
        w = torch.tensor([0.5, -0.2], requires_grad=True)
        new = inner_loop(
            None,
            {"w": w},
            lambda _m, p, _b: 0.5 * (a * p["w"] ** 2).sum(),
            None,
            3,
            sgd(lr),
            first_order,
        )
        (grad,) = torch.autograd.grad((c * new["w"]).sum(), w)
        factor = 1 if first_order else (1 - lr * a) ** 2  # two more steps
        assert torch.allclose(grad, expected * factor)
        if first_order:
            assert new["w"].grad_fn is not None  # identity path kept
            assert torch.allclose(new["w"], w * (1 - lr * a) ** 3)


def test_proximal_term_changes_adapted_params_as_the_formula_says():
    torch.manual_seed(2)
    w, b = torch.randn(4), torch.randn(2)
    target, scale, lr, lam = torch.randn(4), torch.rand(4) + 0.5, 0.1, 0.7
    new = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, proximal(sgd(lr), lam))
    # step 1: the penalty's gradient is zero at the anchor; step 2: 2 * lam * (p1 - p0)
    w1, b1 = w - lr * 2 * scale * (w - target), b - lr * 3 * b**2
    w2 = w1 - lr * (2 * scale * (w1 - target) + 2 * lam * (w1 - w))
    b2 = b1 - lr * (3 * b1**2 + 2 * lam * (b1 - b))
    assert torch.allclose(new["w"], w2) and torch.allclose(new["b"], b2)
    plain = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, sgd(lr))
    assert (new["w"] - w).norm() < (plain["w"] - w).norm()  # pulled toward the anchor


def test_conjugate_gradient_solves_and_truncates():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=torch.float64)
    spd = m @ m.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    (x,) = conjugate_gradient(lambda v: [spd @ v[0]], [b], 5)
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-8)
    (y,) = conjugate_gradient(lambda v: [-v[0]], [b], 5)  # negative curvature: first order
    assert torch.equal(y, b)


def test_vmap_safe_layer_norm_is_exact_and_scoped():
    x, w, bias = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    expected = nn.functional.layer_norm(x, (8,), w, bias, 1e-12)
    original = nn.functional.layer_norm
    with vmap_safe_layer_norm():
        assert nn.functional.layer_norm is not original
        assert torch.allclose(
            nn.functional.layer_norm(x, (8,), w, bias, 1e-12), expected, atol=1e-5
        )
    assert nn.functional.layer_norm is original


# -- which parameters adapt --------------------------------------------------------------
def test_select_params_modes(tiny_encoder):
    names = [n for n, _ in tiny_encoder.model.named_parameters()]
    everything = select_params(tiny_encoder, "all")
    assert set(everything) == {n for n in names if "pooler" not in n}
    assert select_params(tiny_encoder, "head") == {}
    last = select_params(tiny_encoder, "last_n", 1)
    assert last and all(n.startswith("encoder.layer.1.") for n in last)
    assert len(select_params(tiny_encoder, "last_n", 2)) == 2 * len(last)
    assert all(n.endswith("bias") for n in select_params(tiny_encoder, "bias"))
    with pytest.raises(MetalmError, match=r"last_n must be in 1\.\.2"):
        select_params(tiny_encoder, "last_n", 3)
    with pytest.raises(MetalmError, match="no LoRA tensors"):
        select_params(tiny_encoder, "lora")
    with pytest.raises(MetalmError, match=r"learner\.adapt must be one of"):
        select_params(tiny_encoder, "odd")


def test_embedding_tables_adapt_only_when_asked(tiny_encoder):
    tables = {
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
    }
    without = select_params(tiny_encoder, "all", embeddings=False)
    assert tables <= set(select_params(tiny_encoder, "all"))
    assert not tables & set(without)
    assert "embeddings.LayerNorm.weight" in without
    default = build_learner(tiny_encoder, FOMAMLConfig(adapt="all"))
    assert not tables & set(default.adapted_names)
    opted_in = build_learner(tiny_encoder, FOMAMLConfig(adapt="all", adapt_embeddings=True))
    assert tables <= set(opted_in.adapted_names)


def test_bad_learner_settings_are_clear_errors(tiny_encoder):
    for spec, message in (
        ({"name": "maml", "head_init": "random"}, "head_init"),
        ({"name": "maml", "inner_optimizer": "lbfgs"}, "inner_optimizer"),
        ({"name": "maml", "adapt": "some"}, "learner.adapt"),
        ({"name": "anil", "inner_steps": -1}, "inner_steps"),
        ({"name": "metasgd", "lr_shape": "row"}, "lr_shape"),
        ({"name": "reptile", "adapt": "head"}, "must adapt encoder tensors"),
        ({"name": "proximal", "implicit": True, "prox_lambda": 0.0}, "prox_lambda"),
    ):
        with pytest.raises(MetalmError, match=message):
            build_learner(tiny_encoder, parse_learner_config(spec))


# -- learners on the tiny model ------------------------------------------------------------
def test_zero_inner_steps_gives_the_plain_query_loss(tiny_encoder, episodes):
    episode = episodes[0]
    for name in ("maml", "anil"):
        learner = learner_for(tiny_encoder, name=name, inner_steps=0, logit_scale=7.0)
        with torch.no_grad():
            support = tiny_encoder(episode.support_texts)
            query = tiny_encoder(episode.query_texts)
            means = torch.stack(
                [support[torch.tensor(episode.support_labels) == c].mean(0) for c in range(3)]
            )
            logits = 7.0 * (query @ (2 * means).T - means.pow(2).sum(-1))  # prototype head
            expected = nn.functional.cross_entropy(logits, torch.tensor(episode.query_labels))
            assert torch.allclose(learner.meta_loss(episode), expected, atol=1e-5), name
    zero = learner_for(tiny_encoder, name="maml", inner_steps=0, head_init="zero")
    assert zero.meta_loss(episode).item() == pytest.approx(math.log(3))


def test_fomaml_meta_gradient_is_the_query_gradient_at_the_adapted_params(tiny_encoder, episodes):
    episode = episodes[0]
    learner = learner_for(
        tiny_encoder, name="fomaml", adapt="last_n", last_n=1, head_init="zero", inner_steps=2
    )
    meta = learner.meta_params()
    learner.zero_grad()
    learner.meta_loss(episode).backward()
    got = grads_of(meta)
    learner.zero_grad()
    # the same adaptation, then the plain query gradient w.r.t. the adapted tensors
    state = learner.adapt(episode.support_texts, episode.support_labels)
    adapted = {k: state[k].clone().requires_grad_() for k in meta}
    ids, mask = learner._tokens([episode.query_texts])[0]
    features = learner._features(ids, mask, adapted, False)
    loss = nn.functional.cross_entropy(
        learner.logits(state, features), torch.tensor(episode.query_labels)
    )
    expected = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values())), strict=True))
    for key in meta:
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-6), key


def test_second_order_meta_gradient_matches_finite_differences(fresh_encoder, episodes):
    episode = episodes[0]
    fresh_encoder.model.double()
    # an inner rate big enough that the second-order terms matter
    spec = {"adapt": "last_n", "last_n": 1, "inner_steps": 2, "inner_lr": 0.5}
    learner = learner_for(fresh_encoder, name="maml", **spec)
    meta = learner.meta_params()
    learner.meta_loss(episode).backward()
    torch.manual_seed(0)
    direction = {k: torch.randn_like(p) for k, p in meta.items()}
    analytic = sum((meta[k].grad * d).sum() for k, d in direction.items()).item()

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for k, p in meta.items():
                p.add_(sign * 1e-6 * direction[k])
        value = learner.meta_loss(episode).item()
        with torch.no_grad():
            for k, p in meta.items():
                p.sub_(sign * 1e-6 * direction[k])
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / 2e-6
    assert analytic == pytest.approx(numeric, rel=1e-5)
    # and the first-order gradient differs from it: it lacks those terms
    fomaml = learner_for(fresh_encoder, name="fomaml", **spec)
    learner.zero_grad()
    fomaml.meta_loss(episode).backward()
    first = sum((meta[k].grad * d).sum() for k, d in direction.items()).item()
    assert abs(first - numeric) > 1e-3 * abs(numeric)


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


def test_metasgd_learning_rates_receive_gradients_and_change(tiny_encoder, episodes):
    learner = learner_for(tiny_encoder, name="metasgd", adapt="last_n", last_n=1, inner_steps=2)
    rates = dict(learner.inner_lrs.items())
    assert set(rates) >= {"head__weight", "head__bias"} and len(rates) > 2
    before = {k: v.detach().clone() for k, v in rates.items()}
    groups = learner.optimizer_groups(1e-5, 0.01)
    assert groups[1]["lr"] == learner.config.lr_meta_lr and groups[1]["weight_decay"] == 0
    optimizer = torch.optim.AdamW(groups)
    learner.meta_loss(episodes[0]).backward()
    for key, rate in rates.items():
        assert rate.grad is not None and rate.grad.abs().sum() > 0, key
    optimizer.step()
    optimizer.zero_grad()
    for key, rate in rates.items():
        if "key__bias" not in key:  # attention key biases have exactly zero gradient
            assert not torch.equal(rate.detach(), before[key]), key
    element = learner_for(tiny_encoder, name="metasgd", adapt="bias", lr_shape="element")
    weight = tiny_encoder.model.get_parameter("encoder.layer.0.output.dense.bias")
    assert (
        element.inner_lrs["encoder__encoder__layer__0__output__dense__bias"].shape == weight.shape
    )


def test_reptile_update_equals_its_formula(tiny_encoder, episodes):
    episode = episodes[0]
    learner = learner_for(
        tiny_encoder, name="reptile", adapt="last_n", last_n=1, inner_steps=3, inner_lr=0.1
    )
    meta = learner.meta_params()
    start = {k: v.detach().clone() for k, v in meta.items()}
    learner.zero_grad()
    loss = learner.meta_loss(episode)
    loss.backward()
    # θ′ by hand: 3 plain SGD steps on support + query, head from their class means
    texts = episode.support_texts + episode.query_texts
    labels = torch.tensor(episode.support_labels + episode.query_labels)
    with torch.no_grad():
        features = tiny_encoder(texts)
    fast = {k: v.clone().requires_grad_() for k, v in start.items()}
    fast |= {k: v.requires_grad_() for k, v in learner.init_head(features, labels, 3).items()}
    for _ in range(3):
        enc = {k[len("encoder.") :]: v for k, v in fast.items() if k.startswith("encoder.")}
        out = learner.logits(fast, tiny_encoder(texts, enc))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, labels), list(fast.values()))
        lrs = {k: (0.1 if k.startswith("encoder.") else learner.config.head_lr) for k in fast}
        fast = {
            k: (v - lrs[k] * g).detach().requires_grad_()
            for (k, v), g in zip(fast.items(), grads, strict=True)
        }
    distance = sum(((start[k] - fast[k]) ** 2).sum() for k in start)
    assert loss.item() == pytest.approx(0.5 * distance.item(), rel=1e-4)
    for key in start:
        assert torch.allclose(meta[key].grad, start[key] - fast[key], atol=1e-6), key
    # with plain SGD at rate ε the outer step is θ ← θ + ε (θ′ − θ)
    theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    reptile_surrogate(theta, {"w": torch.tensor([3.0, 0.0])}).backward()
    torch.optim.SGD(theta.values(), lr=0.25).step()
    assert torch.allclose(theta["w"].detach(), torch.tensor([1.5, 1.5]))
    learner.zero_grad()


def test_proximal_learner_adapts_closer_to_the_meta_parameters(tiny_encoder, episodes):
    episode = episodes[0]
    spec = {"adapt": "bias", "inner_steps": 3, "inner_lr": 0.5}
    plain = learner_for(tiny_encoder, name="proximal", prox_lambda=0.0, **spec)
    maml = learner_for(tiny_encoder, name="maml", **spec)
    strong = learner_for(tiny_encoder, name="proximal", prox_lambda=0.5, **spec)
    a = plain.adapt(episode.support_texts, episode.support_labels)
    b = maml.adapt(episode.support_texts, episode.support_labels)
    c = strong.adapt(episode.support_texts, episode.support_labels)
    meta = {k: v.detach() for k, v in plain.meta_params().items()}
    assert all(torch.allclose(a[k], b[k]) for k in a)  # λ = 0 is MAML's inner loop

    def distance(state):
        return sum((state[k] - meta[k]).norm() ** 2 for k in meta)

    assert distance(c) < distance(a)


@pytest.mark.slow
def test_implicit_gradient_matches_the_unrolled_one_at_convergence(fresh_encoder, episodes):
    fresh_encoder.model.double()
    # a strong pull and small steps: the 60-step inner loop converges to its fixed point,
    # where the unrolled second-order gradient equals the implicit one
    spec = {"name": "proximal", "adapt": "bias", "head_init": "zero", "prox_lambda": 10.0}
    spec |= {"inner_steps": 60, "head_lr": 0.02, "inner_lr": 0.02}
    flat = {}
    for kind, extra in (
        ("unrolled", {}),
        ("implicit", {"implicit": True, "cg_steps": 20}),
        ("first_order", {"first_order": True}),
    ):
        learner = learner_for(fresh_encoder, **spec, **extra)
        meta = learner.meta_params()
        learner.meta_loss(episodes[0]).backward()
        flat[kind] = torch.cat([p.grad.flatten() for p in meta.values()])
        learner.zero_grad()
    scale = flat["unrolled"].norm()
    assert (flat["implicit"] - flat["unrolled"]).norm() < 1e-6 * scale
    assert (flat["first_order"] - flat["unrolled"]).norm() > 0.1 * scale  # not trivially equal
    implicit = learner_for(fresh_encoder, **spec, implicit=True, vectorize=True)
    assert implicit.meta_loss_batch(episodes) is None  # iMAML loops over episodes


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


# -- end to end on the real MiniLM and real data --------------------------------------------
E2E = {
    "maml": ["learner.adapt=last_n", "learner.last_n=1"],
    "fomaml": ["learner.adapt=lora", "learner.lora_r=4", "learner.vectorize=true"],
    "anil": ["learner.vectorize=true"],
    "metasgd": ["learner.adapt=bias"],
    "reptile": ["learner.adapt=last_n", "learner.last_n=1", "learner.vectorize=true"],
    "proximal": ["learner.adapt=bias", "learner.implicit=true", "learner.prox_lambda=1.0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_real_minilm_end_to_end(name, tmp_path):
    run_real_minilm_briefly(name, ["learner.inner_steps=2", *E2E[name]], tmp_path)
