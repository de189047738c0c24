"""The model-based learners (`metanet`, `lstm_meta`): symmetry, exact update rules and
save/reload on the tiny random BERT, meta-training through `run`/the CLI on an easy
task, and one end-to-end run per learner on the real MiniLM and real data."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_real_minilm_briefly, tiny_overrides
from torch import nn

from metalm.checkpoint import load_weights, save_weights_atomic
from metalm.cli import main
from metalm.config import load_config, parse_learner_config, save_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.learners import LSTMMetaConfig, MetaNetConfig, build_learner
from metalm.learners.base import head_logits
from metalm.learners.lstm_meta import MetaLSTMCell, preprocess
from metalm.learners.model_based import FeatureLearner
from metalm.models import EncoderConfig, TextEncoder
from metalm.runs import load_trained_learner
from metalm.tasks import build_pools
from metalm.trainer import MetaTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"metanet": MetaNetConfig, "lstm_meta": LSTMMetaConfig}
# every option on, so that save/reload covers every meta-parameter
FULL = {
    "metanet": {"name": "metanet", "layers": 3, "hidden": 16, "film": True, "finetune_steps": 2},
    "lstm_meta": {"name": "lstm_meta", "inner_steps": 3, "hidden": 8, "adapter_dim": 4},
}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), max_length=16))


def sampler(n_way: int, k_shot: int, q: int = 2, seed: int = 5) -> EpisodeSampler:
    return EpisodeSampler(builtin_dataset("banking77", "test"), n_way, k_shot, q, seed=seed)


@pytest.fixture(scope="module")
def episode():
    return sampler(3, 3).sample(0)


def learner_for(encoder: TextEncoder, seed: int = 0, perturb: bool = True, **spec):
    """A learner in eval mode; `perturb`: random meta-parameters instead of the
    zero-initialised last layers (an untrained metanet is exactly a prototype head)."""
    torch.manual_seed(seed)
    learner = build_learner(encoder, parse_learner_config(spec))
    if perturb:
        with torch.no_grad():
            for name, p in learner.named_parameters():
                if not name.startswith("encoder."):
                    p.add_(0.3 * torch.randn_like(p))
    learner.eval()
    return learner


def meta_params(learner) -> dict[str, torch.Tensor]:
    return {n: p for n, p in learner.named_parameters() if not n.startswith("encoder.")}


def shuffled(texts: list[str], labels: list[int], seed: int) -> tuple[list[str], list[int]]:
    pairs = list(zip(texts, labels, strict=True))
    random.Random(seed).shuffle(pairs)
    return [t for t, _ in pairs], [y for _, y in pairs]


# -- metanet -------------------------------------------------------------------------------
def test_metanet_is_invariant_to_support_order_and_equivariant_to_classes(tiny_encoder, episode):
    learner = learner_for(tiny_encoder, name="metanet", layers=2, hidden=16, film=True)
    texts, labels = episode.support_texts, episode.support_labels
    state = learner.adapt(texts, labels)
    logits = learner.predict(state, episode.query_texts)
    assert not torch.allclose(state["head.weight"][0], state["head.weight"][1])
    # the examples of each class in another order: the same head, the same predictions
    texts2, labels2 = shuffled(texts, labels, seed=1)
    assert texts2 != texts
    again = learner.adapt(texts2, labels2)
    for key, value in state.items():
        assert torch.allclose(again[key], value, atol=1e-6), key
    assert torch.allclose(learner.predict(again, episode.query_texts), logits, atol=1e-5)
    # classes renamed by a permutation: the head rows and the logits follow it
    perm = [2, 0, 1]
    renamed = learner.adapt(texts, [perm[y] for y in labels])
    assert torch.allclose(renamed["head.weight"][perm], state["head.weight"], atol=1e-6)
    assert torch.allclose(learner.predict(renamed, episode.query_texts)[:, perm], logits, atol=1e-5)
    assert not torch.allclose(learner.predict(renamed, episode.query_texts), logits)


@pytest.mark.parametrize("layers", [1, 3])
def test_metanet_trained_on_3_way_2_shot_handles_7_way_5_shot(tiny_encoder, layers):
    learner = learner_for(
        tiny_encoder, perturb=False, name="metanet", layers=layers, hidden=16, context=True
    )
    linears = [m for m in [*learner.phi, learner.rho] if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert learner.rho.out_features == tiny_encoder.dim + 1
    params = meta_params(learner)
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    train = sampler(3, 2, seed=1)
    for step in range(3):
        optimizer.zero_grad()
        learner.meta_loss(train.sample(step)).backward()
        optimizer.step()
    assert learner.rho.weight.abs().sum() > 0  # it did train
    big = sampler(7, 5, q=2, seed=2).sample(0)
    state = learner.adapt(big.support_texts, big.support_labels)
    assert state["head.weight"].shape == (7, tiny_encoder.dim) and state["head.bias"].shape == (7,)
    logits = learner.predict(state, big.query_texts)
    assert logits.shape == (14, 7) and torch.isfinite(logits).all()
    assert math.isfinite(learner.meta_loss(big).item())


def test_untrained_metanet_is_the_prototype_classifier(tiny_encoder, episode):
    learner = learner_for(tiny_encoder, perturb=False, name="metanet", film=True)
    state = learner.adapt(episode.support_texts, episode.support_labels)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    means = torch.stack([support[labels == c].mean(0) for c in range(3)])
    query = tiny_encoder.embed(episode.query_texts)
    expected = 10.0 * (query @ (2 * means).T - means.pow(2).sum(-1))
    assert torch.allclose(learner.predict(state, episode.query_texts), expected, atol=1e-5)
    assert torch.equal(state["film.scale"], torch.ones(tiny_encoder.dim))


def test_metanet_finetune_steps_are_sgd_on_the_generated_head(tiny_encoder, episode):
    spec = {"name": "metanet", "layers": 2, "hidden": 16, "inner_lr": 0.5}
    generated = learner_for(tiny_encoder, **spec)
    tuned = learner_for(tiny_encoder, **spec, finetune_steps=2)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    head = generated.adapt(episode.support_texts, episode.support_labels)
    for _ in range(2):  # by hand
        leaf = {k: v.clone().requires_grad_() for k, v in head.items()}
        loss = nn.functional.cross_entropy(head_logits(leaf, support, 10.0), labels)
        grads = torch.autograd.grad(loss, list(leaf.values()))
        head = {k: v.detach() - 0.5 * g for (k, v), g in zip(leaf.items(), grads, strict=True)}
    state = tuned.adapt(episode.support_texts, episode.support_labels)
    for key in head:
        assert torch.allclose(state[key], head[key], atol=1e-5), key
    # meta-training differentiates through the fine-tuning steps (second order)
    tuned.meta_loss(episode).backward()
    support, s_labels, query, q_labels = tuned.episode_tensors(episode)
    expected = {}
    for second_order in (True, False):
        head = tuned.generate(support, s_labels, 3)
        for _ in range(2):
            loss = nn.functional.cross_entropy(head_logits(head, support, 10.0), s_labels)
            grads = torch.autograd.grad(loss, list(head.values()), create_graph=second_order)
            head = {k: v - 0.5 * g for (k, v), g in zip(head.items(), grads, strict=True)}
        outer = nn.functional.cross_entropy(head_logits(head, query, 10.0), q_labels)
        (expected[second_order],) = torch.autograd.grad(outer, tuned.rho.weight)
    assert torch.allclose(tuned.rho.weight.grad, expected[True], atol=1e-6)
    assert not torch.allclose(expected[False], expected[True], atol=1e-4)


# -- lstm_meta -------------------------------------------------------------------------------
def test_preprocessing_follows_the_paper():
    got = preprocess(torch.tensor([1e-5, 2.0, -3.0]))
    expected = torch.tensor(
        [[-1.0, math.exp(10) * 1e-5], [math.log(2) / 10, 1.0], [math.log(3) / 10, -1.0]]
    )
    assert torch.allclose(got, expected, atol=1e-6)


def set_gates(cell: MetaLSTMCell, forget: float, step: float) -> None:
    with torch.no_grad():
        for gate, value in ((cell.forget_gate, forget), (cell.input_gate, step)):
            gate.weight.zero_()
            gate.bias.fill_(math.log(value / (1 - value)))


def test_lstm_update_with_hand_set_gates_equals_the_formula(tiny_encoder, episode):
    cell = MetaLSTMCell(4, 0.05, 0.99)
    set_gates(cell, 0.9, 0.2)
    theta, grad = torch.randn(6), torch.randn(6)
    new, (_, _, f, i) = cell(grad, torch.tensor(1.3), theta, None)
    assert torch.allclose(new, 0.9 * theta - 0.2 * grad)
    assert torch.allclose(f, torch.full((6,), 0.9)) and torch.allclose(i, torch.full((6,), 0.2))
    # the learner's inner loop: two updates θ_t = f θ_{t-1} - i ∇L(θ_{t-1}) from θ_0
    learner = learner_for(tiny_encoder, name="lstm_meta", inner_steps=2, adapter_dim=3)
    set_gates(learner.cell, 0.9, 0.2)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    with torch.no_grad():
        params = {k: v.clone() for k, v in learner.initial_params(support, labels, 3).items()}
    for _ in range(2):
        leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = learner.support_loss(leaf, support, labels)
        grads = torch.autograd.grad(loss, list(leaf.values()))
        params = {
            k: 0.9 * v.detach() - 0.2 * g for (k, v), g in zip(leaf.items(), grads, strict=True)
        }
    state = learner.adapt(episode.support_texts, episode.support_labels)
    assert set(state) == {"head.weight", "head.bias", "adapter.down", "adapter.up"}
    for key in params:
        assert torch.allclose(state[key], params[key], atol=1e-6), key
    assert not torch.allclose(state["adapter.up"], torch.zeros_like(state["adapter.up"]))


def test_lstm_meta_head_fits_any_n_from_one_shared_init(tiny_encoder):
    learner = learner_for(tiny_encoder, name="lstm_meta", inner_steps=1, head_init="zero")
    for n_way in (2, 6):
        ep = sampler(n_way, 2, seed=n_way).sample(0)
        state = learner.adapt(ep.support_texts, ep.support_labels)
        assert state["head.weight"].shape == (n_way, tiny_encoder.dim)
        assert learner.predict(state, ep.query_texts).shape == (2 * n_way, n_way)


def test_lstm_meta_parameters_get_gradients_and_change_in_training(tiny_model_dir, tmp_path):
    extra = {"learner.name": "lstm_meta", "learner.adapter_dim": 4, "learner.inner_steps": 2}
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra))
    torch.manual_seed(0)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    params = meta_params(learner)
    assert any(n.startswith("cell.lstm.") for n in params) and any("theta0" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    encoder_before = {n: p.detach().clone() for n, p in learner.encoder.named_parameters()}
    train = build_pools(config.data, []).sampler("train", config.episode, 0)
    learner.meta_loss(train.sample(0)).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in learner.encoder.parameters())  # frozen: no graph
    learner.zero_grad()
    trainer = MetaTrainer(learner, train, None, config.train, tmp_path / "run", progress=False)
    (group,) = trainer.optimizer.param_groups  # the meta-parameters only, at meta_lr
    assert group["initial_lr"] == learner.config.meta_lr and group["weight_decay"] == 0.0
    for step in range(3):
        trainer._step(step)
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), name
    for name, p in learner.encoder.named_parameters():
        assert torch.equal(p.detach(), encoder_before[name]), name


# -- both ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_and_reload_gives_identical_predictions(tiny_model_dir, tmp_path, episode, name):
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = learner_for(encoder, **FULL[name])
    state = learner.adapt(episode.support_texts, episode.support_labels)
    logits = learner.predict(state, episode.query_texts)
    save_weights_atomic(learner, tmp_path / "w.safetensors")
    fresh = learner_for(
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir))),
        perturb=False,
        seed=1,
        **FULL[name],
    )
    before = fresh.predict(
        fresh.adapt(episode.support_texts, episode.support_labels), episode.query_texts
    )
    assert not torch.allclose(before, logits)
    load_weights(fresh, tmp_path / "w.safetensors")
    again = fresh.adapt(episode.support_texts, episode.support_labels)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert torch.equal(fresh.predict(again, episode.query_texts), logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adaptation_never_changes_the_learner(tiny_encoder, episode, name):
    learner = learner_for(tiny_encoder, **FULL[name])
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.meta_loss(episode)
    for training in (True, False):
        learner.train(training)
        state = learner.adapt(episode.support_texts, episode.support_labels)
        assert learner.predict(state, episode.query_texts).shape == (6, 3)
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    assert all(not v.requires_grad and v.is_contiguous() for v in state.values())


PHRASES = [
    "set an alarm for six tomorrow",
    "check the weather in paris",
    "play some jazz music",
    "start a ten minute timer",
    "find a recipe for pancakes",
    "check the traffic on my way to work",
    "read me the latest news",
    "tell me a funny joke",
    "translate hello into spanish",
    "add a meeting to my calendar",
    "check my bank account balance",
    "transfer fifty dollars to my savings",
    "report my credit card as lost",
    "change the pin on my card",
    "book a flight to new york",
]
TEMPLATES = ["{}", "please {}", "can you {}", "i want to {}", "help me {}", "hey, {} please"]


def easy_csv(path: Path) -> Path:
    """Fifteen intents, each one phrase in six templates: an easy task."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, phrase in enumerate(PHRASES):
            writer.writerows([t.format(phrase), f"intent{i}"] for t in TEMPLATES)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("name", "meta_lr"), [("metanet", 0.01), ("lstm_meta", 0.05)])
def test_cli_meta_training_lowers_the_loss_and_reloads(tiny_model_dir, tmp_path, name, meta_lr):
    source = easy_csv(tmp_path / "intents.csv")
    extra = {
        "train.steps": 40,
        "train.warmup_steps": 0,
        "train.eval_every": 20,
        "train.checkpoint_every": 20,
        "learner.meta_lr": meta_lr,
        "data.train.source": source,
        "data.test": "null",
        "data.classes.fractions": "[0.6,0.2,0.2]",
    }
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **extra)
    assert main(["-q", "train", "-c", str(REPO_ROOT / "configs" / f"{name}.yaml"), *overrides]) == 0
    run_dir = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    report = json.loads((run_dir / "report.json").read_text())
    assert {r["method"] for r in report["results"]} == {name, "frozen"}
    # the best weights come back into a freshly built learner
    config, learner = load_trained_learner(run_dir)
    fresh = build_learner(TextEncoder.from_config(config.model), config.learner)
    trained, init = meta_params(learner), meta_params(fresh)
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k]) for k in trained)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "metanet", "layers": 0}, "layers must be >= 1"),
        ({"name": "metanet", "hidden": 0}, "hidden must be >= 1"),
        ({"name": "metanet", "finetune_steps": -1}, "finetune_steps"),
        ({"name": "metanet", "finetune_steps": 1, "inner_lr": 0.0}, "inner_lr must be > 0"),
        ({"name": "metanet", "meta_lr": 0.0}, "meta_lr must be > 0"),
        ({"name": "metanet", "logit_scale": -1.0}, "logit_scale must be > 0"),
        ({"name": "lstm_meta", "inner_steps": -1}, "inner_steps"),
        ({"name": "lstm_meta", "eval_inner_steps": -2}, "eval_inner_steps"),
        ({"name": "lstm_meta", "hidden": 0}, "hidden must be >= 1"),
        ({"name": "lstm_meta", "adapter_dim": -1}, "adapter_dim"),
        ({"name": "lstm_meta", "init_input_gate": 1.0}, r"init_input_gate must be in \(0, 1\)"),
        ({"name": "lstm_meta", "init_forget_gate": 0.0}, "init_forget_gate"),
        ({"name": "lstm_meta", "head_init": "random"}, "head_init"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_bad_settings_are_clear_errors(tiny_encoder, spec, message):
    with pytest.raises(MetalmError, match=message):
        build_learner(tiny_encoder, parse_learner_config(spec))


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(MetalmError, match=r"valid keys are .*film"):
        load_config(None, ["learner.name=metanet", "learner.depth=2"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_loads_by_name_and_shipped_yaml(name, tmp_path):
    config = load_config(None, [f"learner.name={name}", "learner.meta_lr=0.02"])
    assert type(config.learner) is CONFIGS[name] and config.learner.meta_lr == 0.02
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    shipped = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert type(shipped.learner) is CONFIGS[name] and shipped.train.steps > 0


def test_train_encoder_meta_trains_the_encoder(tiny_encoder, episode):
    for name in CONFIGS:
        learner = learner_for(tiny_encoder, name=name, train_encoder=True)
        assert isinstance(learner, FeatureLearner)
        learner.train()
        learner.zero_grad()
        learner.meta_loss(episode).backward()
        grads = [p.grad for p in tiny_encoder.model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        groups = learner.optimizer_groups(1e-5, 0.01)
        assert [g["lr"] for g in groups] == [learner.config.meta_lr, 1e-5]
        learner.zero_grad()
        learner.eval()


# -- end to end on the real MiniLM and real data --------------------------------------------
E2E = {
    "metanet": ["learner.film=true", "learner.finetune_steps=1"],
    "lstm_meta": ["learner.inner_steps=2", "learner.adapter_dim=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_real_minilm_end_to_end(name, tmp_path):
    run_real_minilm_briefly(name, [*E2E[name]], tmp_path)
