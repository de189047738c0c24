"""Where the encoder and the learner live: `model.device`."""

from __future__ import annotations

import pytest
import torch

from metalm.errors import MetalmError
from metalm.learners import build_learner
from metalm.learners.protonet import ProtoNetConfig
from metalm.models.encoder import EncoderConfig, TextEncoder, resolve_device


def test_auto_picks_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_unknown_or_missing_device_is_a_clear_error() -> None:
    with pytest.raises(MetalmError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(MetalmError, match="no CUDA device"):
            resolve_device("cuda")


def test_learner_and_task_state_follow_the_encoder_device(tiny_model_dir) -> None:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = build_learner(encoder, ProtoNetConfig(learn_scale=True, head="centroid"))
    device = resolve_device("auto")
    assert {p.device.type for p in learner.parameters()} == {device.type}
    state = learner.adapt(["a b", "c d", "e f", "g h"], [0, 1, 0, 1])
    assert state["prototypes"].device.type == device.type
    logits = learner.predict(state, ["a b", "g h"])
    assert logits.shape == (2, 2) and logits.device.type == device.type
