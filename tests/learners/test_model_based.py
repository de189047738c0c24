"""`metalm.learners.model_based`: what `metanet` and `lstm_meta` share: save/reload,
settings, the command line, training the encoder, the real MiniLM."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_real_minilm_briefly, tiny_overrides
from learner_tools import meta_params, sampler, seeded_learner

from metalm.checkpoint import load_weights, save_weights_atomic
from metalm.cli import main
from metalm.config import load_config, parse_learner_config, save_config
from metalm.errors import MetalmError
from metalm.learners import LSTMMetaConfig, MetaNetConfig, build_learner
from metalm.learners.model_based import FeatureLearner
from metalm.models import EncoderConfig, TextEncoder
from metalm.runs.existing import load_trained_learner

REPO_ROOT = Path(__file__).resolve().parents[2]


CONFIGS = {"metanet": MetaNetConfig, "lstm_meta": LSTMMetaConfig}


# every option on, so that save/reload covers every meta-parameter
FULL = {
    "metanet": {"name": "metanet", "layers": 3, "hidden": 16, "film": True, "finetune_steps": 2},
    "lstm_meta": {"name": "lstm_meta", "inner_steps": 3, "hidden": 8, "adapter_dim": 4},
}


@pytest.fixture(scope="module")
def episode():
    return sampler(3, 3).sample(0)


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


# -- end to end on the real MiniLM and real data --------------------------------------------
E2E = {
    "metanet": ["learner.film=true", "learner.finetune_steps=1"],
    "lstm_meta": ["learner.inner_steps=2", "learner.adapter_dim=4"],
}


# -- both ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_and_reload_gives_identical_predictions(tiny_model_dir, tmp_path, episode, name):
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = seeded_learner(encoder, **FULL[name])
    state = learner.adapt(episode.support_texts, episode.support_labels)
    logits = learner.predict(state, episode.query_texts)
    save_weights_atomic(learner, tmp_path / "w.safetensors")
    fresh = seeded_learner(
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
    learner = seeded_learner(tiny_encoder, **FULL[name])
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.meta_loss(episode)
    for training in (True, False):
        learner.train(training)
        state = learner.adapt(episode.support_texts, episode.support_labels)
        assert learner.predict(state, episode.query_texts).shape == (6, 3)
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())
    assert all(not v.requires_grad and v.is_contiguous() for v in state.values())


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
        learner = seeded_learner(tiny_encoder, name=name, train_encoder=True)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_real_minilm_end_to_end(name, tmp_path):
    run_real_minilm_briefly(name, [*E2E[name]], tmp_path)
