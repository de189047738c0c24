"""`metalm.exports` and `metalm export --format sentence-transformers`: the folder names
metalm's pooling, normalization and length, and (slow lane: importing
sentence-transformers takes seconds) loads in sentence-transformers and embeds texts as
metalm does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_tools import QUERIES, TEXTS
from safetensors.torch import load_file

from metalm.cli import main
from metalm.exports import to_sentence_transformers
from metalm.pretrained import from_pretrained

POOLING = [("mean", True), ("cls", False)]


def _st_embed(folder: Path, texts: list[str]) -> torch.Tensor:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    return torch.tensor(model.encode(texts))


def _exported(model_dir: Path, tmp_path: Path, pooling: str, normalize: bool) -> tuple[Path, Path]:
    """A protonet on `model_dir` with this pooling, exported: (metalm's, sentence-transformers')."""
    from metalm.pretrained import export_untrained

    overrides = [f"model.name_or_path={model_dir}", f"model.pooling={pooling}"]
    overrides += [f"model.normalize={str(normalize).lower()}", "model.max_length=16"]
    model = export_untrained(tmp_path / "model", "protonet", overrides)
    return model, to_sentence_transformers(model, tmp_path / "st")


@pytest.mark.parametrize("pooling, normalize", POOLING)
def test_the_folder_names_the_pooling_normalization_and_length(
    tiny_model_dir, tmp_path, pooling: str, normalize: bool
):
    model, out = _exported(tiny_model_dir, tmp_path, pooling, normalize)
    modules = [m["type"].rsplit(".", 1)[1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", *(["Normalize"] if normalize else [])]
    assert (out / "2_Normalize").is_dir() == normalize
    modes = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert [k for k, on in modes.items() if k.startswith("pooling_mode") and on] == [
        {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}[pooling]
    ]
    assert modes["word_embedding_dimension"] == 32
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    weights = load_file(out / "model.safetensors")
    encoder = from_pretrained(model, device="cpu").encoder.model.state_dict()
    assert sorted(weights) == sorted(encoder)
    assert all(torch.equal(weights[k], encoder[k]) for k in weights)
    assert "SentenceTransformer(" in (out / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("pooling, normalize", POOLING)
def test_sentence_transformers_embeds_as_metalm(
    tiny_model_dir, tmp_path, pooling: str, normalize: bool
):
    model, out = _exported(tiny_model_dir, tmp_path, pooling, normalize)
    texts = [*TEXTS, *QUERIES, "a long text " * 20]  # longer than max_length: cut alike
    ours = from_pretrained(model, device="cpu").encoder.embed(texts)
    assert float((_st_embed(out, texts) - ours).abs().max()) < 1e-5


def test_cli_export_format_sentence_transformers(tiny_model_dir, tmp_path, capsys):
    """From a learner name, or from a metalm model directory: the same folder."""
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--format", "sentence-transformers", "--out", str(tmp_path / "st")]) == 0
    assert "SentenceTransformer(" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "model")]) == 0  # the metalm format
    capsys.readouterr()
    convert = ["export", "--model", str(tmp_path / "model"), "--format", "sentence-transformers"]
    assert main([*convert, "--out", str(tmp_path / "st2")]) == 0
    for name in ("model.safetensors", "modules.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (tmp_path / "st" / name).read_bytes() == (tmp_path / "st2" / name).read_bytes()
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x")]) == 2
    assert "give --format too" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_as_sentence_transformers(tmp_path):
    """The shipped MiniLM through metalm's export: sentence-transformers' embeddings
    equal metalm's on BANKING77 texts."""
    from metalm.data import builtin_dataset
    from metalm.pretrained import export_untrained

    model = export_untrained(tmp_path / "model", "frozen")
    out = to_sentence_transformers(model, tmp_path / "st")
    texts = list(builtin_dataset("banking77", "test").texts[:64])
    ours = from_pretrained(model, device="cpu").encoder.embed(texts)
    assert float((_st_embed(out, texts) - ours).abs().max()) < 1e-5
