"""`metalm.exports` and `metalm export --format sentence-transformers`: the folder loads
in sentence-transformers and embeds texts as metalm does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_tools import QUERIES, TEXTS

from metalm.cli import main
from metalm.exports import to_sentence_transformers
from metalm.pretrained import from_pretrained

sentence_transformers = pytest.importorskip("sentence_transformers")


def _st_embed(folder: Path, texts: list[str]) -> torch.Tensor:
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    return torch.tensor(model.encode(texts))


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False)])
def test_sentence_transformers_embeds_as_metalm(
    tiny_model_dir, tmp_path, pooling: str, normalize: bool
):
    from metalm.pretrained import export_untrained

    overrides = [f"model.name_or_path={tiny_model_dir}", f"model.pooling={pooling}"]
    overrides += [f"model.normalize={str(normalize).lower()}", "model.max_length=16"]
    model = export_untrained(tmp_path / "model", "protonet", overrides)
    out = to_sentence_transformers(model, tmp_path / "st")
    modules = [m["type"].rsplit(".", 1)[1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", *(["Normalize"] if normalize else [])]
    texts = [*TEXTS, *QUERIES, "a long text " * 20]  # longer than max_length: cut alike
    ours = from_pretrained(model, device="cpu").encoder.embed(texts)
    assert float((_st_embed(out, texts) - ours).abs().max()) < 1e-5
    assert "SentenceTransformer(" in (out / "README.md").read_text()


def test_cli_export_format_sentence_transformers(tiny_model_dir, tmp_path, capsys):
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--format", "sentence-transformers", "--out", str(tmp_path / "st")]) == 0
    assert "SentenceTransformer(" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "model")]) == 0  # the metalm format
    capsys.readouterr()
    convert = ["export", "--model", str(tmp_path / "model"), "--format", "sentence-transformers"]
    assert main([*convert, "--out", str(tmp_path / "st2")]) == 0
    texts = list(TEXTS)
    assert torch.allclose(_st_embed(tmp_path / "st", texts), _st_embed(tmp_path / "st2", texts))
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
