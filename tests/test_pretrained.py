"""`metalm.pretrained`: save and load a meta-learner as a directory, and clear errors for
broken or missing ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from run_tools import QUERIES, TEST_TEXTS, probabilities, tiny_learner
from safetensors.torch import load_file

from metalm import MetalmError, from_pretrained, save_pretrained
from metalm.config import load_config
from metalm.learners import LEARNERS, build_learner
from metalm.models.encoder import TextEncoder
from metalm.pretrained import FORMAT_VERSION, LEARNER_WEIGHTS, METADATA, export_untrained

SLOW = [pytest.mark.slow]


# -- save / load -----------------------------------------------------------------------
# every registered learner as built by default, plus the other task heads of the
# embedding learners (`learner.head`)
VARIANTS = [(name, {}) for name in sorted(LEARNERS)] + [
    ("frozen", {"head": "logreg"}),
    ("protonet", {"head": "logreg"}),
    ("protonet", {"head": "lpft", "lpft_steps": 2}),
]


def _edit_metadata(directory: Path, **values) -> None:
    metadata = json.loads((directory / METADATA).read_text())
    metadata.update(values)
    (directory / METADATA).write_text(json.dumps(metadata))


@pytest.mark.parametrize(
    "name, config",
    [  # finetune's default (300 head steps, then 20 with the encoder) takes seconds
        pytest.param(n, c, id=n + (f"/{c['head']}" if c else ""), marks=SLOW * (n == "finetune"))
        for n, c in VARIANTS
    ],
)
def test_save_load_gives_identical_predictions(
    name, config, tiny_model_dir, tiny_llama_dir, tmp_path
):
    causal = LEARNERS[name].model_kind == "causal"
    learner = tiny_learner(tiny_llama_dir if causal else tiny_model_dir, name, **config)
    expected = probabilities(learner, QUERIES)
    out = save_pretrained(learner, tmp_path / name)
    # a causal LM is named in metalm.json, not copied (its LoRA adapters are the learner's)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", LEARNER_WEIGHTS, METADATA] + ([] if causal else ["encoder"])
    )
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    own = load_file(out / LEARNER_WEIGHTS)  # the model's weights stay apart (adapters aside)
    assert not any(k.startswith("encoder.model.") and "lora_" not in k for k in own)
    assert causal == any("lora_" in k for k in own) or name == "icl"
    loaded = from_pretrained(out)
    assert type(loaded) is type(learner) and loaded.config == learner.config
    np.testing.assert_array_equal(probabilities(loaded, QUERIES), expected)
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["learner"]["name"] == name


def test_lora_and_truncated_encoder_reload_with_the_same_structure(tiny_model_dir, tmp_path):
    learner = tiny_learner(tiny_model_dir, "maml", num_layers=1, adapt="lora", lora_r=2)
    out = save_pretrained(learner, tmp_path / "lora")
    own = load_file(out / LEARNER_WEIGHTS)
    assert own and all("lora_" in k for k in own)  # LoRA adapters are the learner's
    loaded = from_pretrained(out)
    assert len(loaded.encoder.model.encoder.layer) == 1
    assert sorted(loaded.state_dict()) == sorted(learner.state_dict())
    for key, tensor in learner.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)
    np.testing.assert_array_equal(probabilities(loaded, QUERIES), probabilities(learner, QUERIES))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: _edit_metadata(d, format_version=FORMAT_VERSION + 1), "newer"),
        (lambda d: _edit_metadata(d, format_version="1"), "positive integer"),
        (lambda d: (d / METADATA).unlink(), "not a metalm model directory"),
        (lambda d: (d / METADATA).write_text("{oops"), "not valid JSON"),
        (lambda d: (d / LEARNER_WEIGHTS).unlink(), "missing learner.safetensors"),
        (lambda d: (d / "encoder" / "model.safetensors").unlink(), "missing encoder files"),
        (lambda d: _edit_metadata(d, learner={"name": "nope"}), "unknown learner"),
        (lambda d: _truncate(d / "encoder" / "model.safetensors"), "broken or truncated"),
        (lambda d: _truncate(d / LEARNER_WEIGHTS), "not a valid safetensors file"),
    ],
)
def test_broken_model_directories_give_clear_errors(change, message, frozen_dir, tmp_path):
    import shutil

    broken = Path(shutil.copytree(frozen_dir, tmp_path / "broken"))
    change(broken)
    with pytest.raises(MetalmError, match=message):
        from_pretrained(broken)


def test_missing_directory_and_hub_failure_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(MetalmError, match="no such model directory"):
        from_pretrained(tmp_path / "absent")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MetalmError, match="cannot download 'metalm-test/absent' from the Hugging"):
        from_pretrained("metalm-test/absent")


def _built(tiny_model_dir: Path, name: str, *overrides: str):
    config = load_config(
        None, [f"learner.name={name}", f"model.name_or_path={tiny_model_dir}", *overrides]
    )
    return build_learner(TextEncoder.from_config(config.model), config.learner).eval()


@pytest.mark.parametrize(
    "name, overrides, head",
    [
        ("frozen", ["model.max_length=16"], "logreg"),
        ("protonet", ["model.max_length=16", "learner.head=centroid"], "centroid"),
        ("anil", ["model.max_length=16"], None),
    ],
)
def test_export_untrained_equals_the_learner_built_from_config(
    name, overrides, head, tiny_model_dir, tmp_path
):
    out = export_untrained(
        tmp_path / "m", name, [f"model.name_or_path={tiny_model_dir}", *overrides]
    )
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["learner"]["name"] == name and metadata["learner"].get("head") == head
    assert metadata["meta_trained"] is False and metadata["encoder"]["max_length"] == 16
    assert "No training run was recorded" in (out / "README.md").read_text()
    np.testing.assert_allclose(
        probabilities(from_pretrained(out), TEST_TEXTS),
        probabilities(_built(tiny_model_dir, name, *overrides), TEST_TEXTS),
        atol=1e-6,
    )
