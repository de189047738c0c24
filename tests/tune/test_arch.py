"""`metalm.tune.arch`: architecture search: Pareto sets, pruned heads, fewer layers."""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState
from tuning import tiny_base

from metalm.errors import MetalmError
from metalm.tune import TuneOptions, tune
from metalm.tune.arch import arch_space


@pytest.mark.slow
def test_arch_search_returns_pareto_set(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 2, "train.eval_every": 2})
    space = arch_space(base, lengths=(8, 16))
    assert space.names == [
        "model.num_layers",
        "model.num_heads",
        "model.pooling",
        "model.max_length",
    ]
    options = TuneOptions(sampler="random", seed=0, objectives="accuracy,params")
    result = tune(base, space, 4, tmp_path / "arch", options, printer=lambda *a, **k: None)
    assert result.pareto and "pareto_front.png" in result.outputs
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    front = {row["trial"] for row in result.pareto}
    for t in trials:
        # nobody dominates a Pareto trial; each trial off the front is dominated
        dominated = any(
            o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
            for o in trials
        )
        assert dominated == (t.number not in front)
    # fewer layers kept (the other choices alike), fewer parameters
    by_shape = {
        (t.params["model.num_layers"], t.params["model.num_heads"]): t.user_attrs["params"]
        for t in trials
    }
    pairs = [(by_shape[1, h], by_shape[2, h]) for h in (1, 2) if {(1, h), (2, h)} <= set(by_shape)]
    assert pairs, f"seed 0 drew no two trials that differ in layers alone: {sorted(by_shape)}"
    assert all(one < two for one, two in pairs)
    assert "Pareto front" in (tmp_path / "arch" / "summary.md").read_text()


def test_prune_heads_keeps_the_strongest_heads_and_reloads(tiny_model_dir, tmp_path):
    from metalm import from_pretrained, save_pretrained
    from metalm.learners import build_learner
    from metalm.learners.protonet import ProtoNetConfig
    from metalm.models.encoder import EncoderConfig, TextEncoder, prune_heads

    config = EncoderConfig(name_or_path=str(tiny_model_dir), device="cpu")
    full = TextEncoder.from_config(config)
    texts = ["hello there", "how are you", "good bye"]
    same = TextEncoder.from_config(config)
    prune_heads(same.model, 2)  # all heads kept: nothing changes
    assert torch.equal(same.embed(texts), full.embed(texts))
    cut = TextEncoder.from_config(EncoderConfig(**{**config.__dict__, "num_heads": 1}))
    attention, original = cut.model.encoder.layer[0].attention, full.model.encoder.layer[0]
    dense = original.attention.output.dense.weight
    strongest = int(dense.view(32, 2, 16).norm(dim=(0, 2)).argmax())
    rows = slice(16 * strongest, 16 * (strongest + 1))
    assert torch.equal(attention.self.query.weight, original.attention.self.query.weight[rows])
    assert torch.equal(attention.output.dense.weight, dense[:, rows])
    count = sum(p.numel() for p in cut.parameters())
    assert count < sum(p.numel() for p in full.parameters())
    assert cut.embed(texts).shape == (3, 32)
    # the pruned shapes survive save_pretrained -> from_pretrained, predictions identical
    learner = build_learner(cut, ProtoNetConfig())
    save_pretrained(learner, tmp_path / "pruned")
    again = from_pretrained(tmp_path / "pruned", device="cpu")
    assert sum(p.numel() for p in again.encoder.parameters()) == count
    state = learner.adapt(texts, [0, 1, 1])
    assert torch.equal(again.predict(state, texts), learner.predict(state, texts))
    with pytest.raises(MetalmError, match=r"num_heads must be in 1\.\.2"):
        prune_heads(full.model, 3)


def test_prune_heads_on_the_real_minilm():
    from metalm.models.encoder import EncoderConfig, TextEncoder

    full = TextEncoder.from_config(EncoderConfig(device="cpu"))
    cut = TextEncoder.from_config(EncoderConfig(device="cpu", num_heads=4))
    assert cut.model.encoder.layer[5].attention.self.query.weight.shape == (128, 384)
    texts = ["I lost my card", "what is my balance", "book a flight to paris"]
    a, b = full.embed(texts), cut.embed(texts)
    assert b.shape == a.shape == (3, 384)
    # a third of the heads still gives a sentence embedding close to the full model's
    assert float((a * b).sum(-1).min()) > 0.5


def test_num_layers_keeps_first_layers(tiny_model_dir):
    from metalm.models.encoder import EncoderConfig, TextEncoder

    full = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    cut = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), num_layers=1))
    assert len(cut.model.encoder.layer) == 1 and len(full.model.encoder.layer) == 2
    first = full.model.encoder.layer[0].state_dict()
    for key, value in cut.model.encoder.layer[0].state_dict().items():
        assert torch.equal(value, first[key])  # the kept layer is the pretrained one
    assert cut.embed(["hello there"]).shape == (1, 32)
    with pytest.raises(MetalmError, match=r"num_layers must be in 1\.\.2"):
        TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), num_layers=3))
