"""`metalm.learners.adapted_params`: which encoder tensors the inner loop adapts."""

from __future__ import annotations

import pytest

from metalm.errors import MetalmError
from metalm.learners import FOMAMLConfig, build_learner, select_params


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
