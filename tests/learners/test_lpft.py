"""`metalm.learners.lpft`: fine-tuning only the top transformer layers on cached lower
hidden states (`learner.head=lpft` with `learner.lpft_blocks`), and its early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_tools import snapshot

from metalm import FewShotClassifier, MetalmError, save_pretrained
from metalm.data import builtin_dataset
from metalm.learners import FrozenConfig, ProtoNetConfig, build_learner
from metalm.learners.base import head_logits, head_loss
from metalm.learners.heads import fit_logreg
from metalm.learners.lpft import (
    TopBlockInputs,
    choose_steps,
    finetune_top_blocks,
    leave_one_shot_out,
    top_block_names,
)
from metalm.models import EncoderConfig, TextEncoder

TEXTS = [
    "set an alarm for six",
    "wake me up at seven tomorrow morning please",
    "alarm at noon",
    "what is the weather in paris",
    "will it rain",
    "is it sunny outside today in the city",
    "play some jazz",
    "put on my workout playlist right now",
    "next song",
]
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
QUERIES = ["alarm at five please", "snow tomorrow?", "play a song by the beatles"]


def lpft(**change) -> ProtoNetConfig:
    """An `lpft` config with fast learning rates (so that a few steps move the weights)."""
    return ProtoNetConfig(**{"head": "lpft", "lpft_lr": 1e-2, "lpft_head_lr": 1e-2, **change})


@pytest.mark.parametrize("blocks", [1, 2])
def test_cached_lower_layers_give_the_whole_models_embeddings_loss_and_gradients(
    tiny_encoder, blocks
):
    tiny_encoder.eval()
    inputs = TopBlockInputs.compute(tiny_encoder, TEXTS, blocks)
    names = top_block_names(tiny_encoder.model, blocks)
    own = dict(tiny_encoder.model.named_parameters())
    y = torch.tensor(LABELS)
    head = fit_logreg(tiny_encoder.embed(TEXTS), y, 3)
    grads = []
    for run_all in (False, True):
        params = {n: own[n].detach().clone().requires_grad_() for n in names}
        with torch.enable_grad():
            if run_all:  # the whole model, with the top layers' tensors swapped in
                features = tiny_encoder(TEXTS, params)
            else:
                features = inputs.features(range(len(TEXTS)), params)
            loss = head_loss(head, features, y)
            grads.append((loss.detach(), torch.autograd.grad(loss, list(params.values()))))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for cached, whole in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(cached, whole, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[0][1])


def test_one_step_equals_the_same_step_through_the_whole_model(tiny_encoder):
    tiny_encoder.eval()
    y = torch.tensor(LABELS)
    probe = fit_logreg(tiny_encoder.embed(TEXTS), y, 3)
    head = {k: probe[k].clone().requires_grad_() for k in ("head.weight", "head.bias")}
    inputs = TopBlockInputs.compute(tiny_encoder, TEXTS, 1)
    params, _ = finetune_top_blocks(inputs, y, head, 1, 1e-2, 1e-2, batch_size=4)
    # by hand: the same rows, the whole model with the top layer's copies, AdamW
    # (Adam divides by the gradient size: tiny float noise in ~0 gradients shows at ~1e-6)
    names = top_block_names(tiny_encoder.model, 1)
    own = dict(tiny_encoder.model.named_parameters())
    copies = {n: own[n].detach().clone().requires_grad_() for n in names}
    manual = {k: probe[k].clone().requires_grad_() for k in ("head.weight", "head.bias")}
    optimizer = torch.optim.AdamW(
        [{"params": list(manual.values()), "lr": 1e-2}, {"params": list(copies.values())}],
        lr=1e-2,
        weight_decay=0.01,
    )
    rows = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(0))[:4].tolist()
    with torch.enable_grad():
        head_loss(manual, tiny_encoder([TEXTS[i] for i in rows], copies), y[rows]).backward()
    optimizer.step()
    assert set(params) == set(names)
    for name in names:
        torch.testing.assert_close(params[name], copies[name].detach(), atol=1e-5, rtol=1e-4)
    for key in manual:
        torch.testing.assert_close(head[key].detach(), manual[key].detach())


def test_top_block_lpft_adapts_only_those_layers_and_predicts_through_embed(tiny_encoder):
    before = snapshot(tiny_encoder)
    learner = build_learner(tiny_encoder, lpft(lpft_blocks=1, lpft_steps=3))
    state = learner.adapt(TEXTS, LABELS)
    for key, tensor in tiny_encoder.state_dict().items():  # the encoder itself is untouched
        assert torch.equal(tensor, before[key]), key
    adapted = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    assert sorted(adapted) == sorted(top_block_names(tiny_encoder.model, 1))
    assert all(name.startswith("encoder.layer.1.") for name in adapted)
    assert any(not torch.equal(v, before["model." + k]) for k, v in adapted.items())
    logits = learner.predict(state, QUERIES)
    features = tiny_encoder.embed(QUERIES, params=adapted)  # a partial params dict
    torch.testing.assert_close(logits, head_logits(state, features))
    assert not torch.allclose(features, tiny_encoder.embed(QUERIES))
    again = learner.adapt(TEXTS, LABELS)  # deterministic
    assert all(torch.equal(v, again[k]) for k, v in state.items())


def test_all_blocks_without_steps_is_the_linear_probe(tiny_encoder):
    probe = build_learner(tiny_encoder, FrozenConfig(head="logreg"))
    learner = build_learner(tiny_encoder, lpft(lpft_blocks=2, lpft_steps=0))
    state = learner.adapt(TEXTS, LABELS)
    assert not any(k.startswith("encoder.") for k in state)
    torch.testing.assert_close(
        learner.predict(state, QUERIES), probe.predict(probe.adapt(TEXTS, LABELS), QUERIES)
    )


def test_leave_one_shot_out_holds_out_the_last_shot_of_classes_with_two():
    assert leave_one_shot_out(torch.tensor([0, 1, 0, 2, 1, 0])) == ([0, 1, 2, 3], [4, 5])
    assert leave_one_shot_out(torch.tensor([0, 1, 2])) == ([0, 1, 2], [])


def test_early_stopping_picks_the_lowest_held_out_loss(tiny_encoder):
    tiny_encoder.eval()
    y = torch.tensor(LABELS)
    x = tiny_encoder.embed(TEXTS)
    inputs = TopBlockInputs.compute(tiny_encoder, TEXTS, 1)
    settings = {"lr": 1e-2, "head_lr": 1e-2, "batch_size": 4}
    steps, losses = choose_steps(inputs, x, y, 3, 1e-4, 4, **settings)
    assert len(losses) == 5 and 0 <= steps <= 4
    assert losses[steps] == min(losses)
    # nothing can move (learning rates 0): every loss ties, the fewest steps win
    frozen = {"lr": 0.0, "head_lr": 0.0, "batch_size": 4}
    assert choose_steps(inputs, x, y, 3, 1e-4, 4, **frozen)[0] == 0
    config = lpft(lpft_blocks=1, lpft_steps=4, lpft_early_stop=True, lpft_lr=0.0, lpft_head_lr=0.0)
    learner = build_learner(tiny_encoder, config)
    state = learner.adapt(TEXTS, LABELS)
    assert not any(k.startswith("encoder.") for k in state)  # 0 steps: the probe alone
    probe = build_learner(tiny_encoder, FrozenConfig(head="logreg"))
    torch.testing.assert_close(
        learner.predict(state, QUERIES), probe.predict(probe.adapt(TEXTS, LABELS), QUERIES)
    )
    learner = build_learner(tiny_encoder, lpft(lpft_blocks=1, lpft_steps=4, lpft_early_stop=True))
    state = learner.adapt(TEXTS, LABELS)
    adapted = [k for k in state if k.startswith("encoder.")]
    assert all(k.startswith("encoder.encoder.layer.1.") for k in adapted)


def test_task_files_round_trip_with_top_block_lpft(tiny_encoder, tmp_path):
    config = lpft(lpft_blocks=1, lpft_steps=2)
    model = save_pretrained(build_learner(tiny_encoder, config), tmp_path / "model")
    clf = FewShotClassifier.from_pretrained(model)
    assert clf.learner.config == config
    clf.adapt(TEXTS, [["alarm", "weather", "music"][y] for y in LABELS])
    expected = clf.predict_proba(QUERIES)
    clf.save_task(tmp_path / "task")
    again = FewShotClassifier.load_task(tmp_path / "task")
    np.testing.assert_array_equal(again.predict_proba(QUERIES), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lpft_blocks": -1}, r"lpft_blocks must be >= 0 \(0: all weights"),
        ({"lpft_early_stop": True}, "lpft_early_stop needs learner.lpft_blocks >= 1"),
    ],
)
def test_bad_lpft_settings_say_what_to_fix(change, message):
    with pytest.raises(MetalmError, match=message):
        ProtoNetConfig(head="lpft", **change)
    with pytest.raises(MetalmError, match=message):
        FrozenConfig(head="lpft", **change)


def test_more_blocks_than_the_model_has_is_refused_at_adapt(tiny_encoder):
    learner = build_learner(tiny_encoder, lpft(lpft_blocks=3, lpft_steps=1))
    with pytest.raises(MetalmError, match=r"lpft_blocks must be in 0\.\.2"):
        learner.adapt(TEXTS, LABELS)


# -- the real MiniLM ---------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_top_block_lpft_adapts_layer_5_only():
    """Frozen MiniLM, 10 BANKING77 classes × 5 shots (train_5): the top layer's cached
    inputs reproduce `embed`, and 3 steps on the top layer adapt layer 5 only."""
    encoder = TextEncoder.from_config(EncoderConfig(device="cpu"))
    support = builtin_dataset("banking77", "train_5")
    classes = support.classes[:10]
    rows = [i for i, label in enumerate(support.labels) if label in classes]
    texts = [support.texts[i] for i in rows]
    labels = [classes.index(support.labels[i]) for i in rows]
    inputs = TopBlockInputs.compute(encoder, texts, 1)
    with torch.no_grad():
        cached = inputs.features(range(len(texts)))
    torch.testing.assert_close(cached, encoder.embed(texts), atol=1e-4, rtol=1e-4)
    learner = build_learner(encoder, FrozenConfig(head="lpft", lpft_blocks=1, lpft_steps=3))
    state = learner.adapt(texts, labels)
    adapted = [k for k in state if k.startswith("encoder.")]
    assert adapted and all(k.startswith("encoder.encoder.layer.5.") for k in adapted)
    predicted = learner.predict(state, texts).argmax(-1)
    assert float((predicted == torch.tensor(labels)).float().mean()) > 0.9
