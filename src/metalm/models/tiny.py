"""Tiny random models with MiniLM's tokenizer (a BERT encoder, a Llama causal LM): for fast
tests, smoke runs and benchmarks. `vocab_size` cuts the tokenizer to the most frequent
wordpieces (every single character kept, so no text becomes all-unknown): loading,
saving, copying and exporting the model then take a fraction of the time (the full
30,522-row embedding table is ~97% of a tiny model's weights)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_tiny_bert(directory: str | Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write a 2-layer, 32-wide BERT with random weights (seeded) and the shipped
    all-MiniLM-L6-v2 tokenizer (cut to `vocab_size` wordpieces if given) to `directory`;
    load it with `model.name_or_path`.

    Example:
        >>> path = save_tiny_bert("tiny-bert")
        >>> TextEncoder.from_config(EncoderConfig(name_or_path=str(path))).dim
        32
    """
    from transformers import BertConfig, BertModel

    sizes = dict(num_attention_heads=2, max_position_embeddings=128)
    return _save_tiny(directory, seed, vocab_size, BertModel, BertConfig, **sizes)


def save_tiny_llama(directory: str | Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write a 2-layer, 32-wide Llama causal LM with random weights (seeded) and the
    all-MiniLM-L6-v2 tokenizer (cut to `vocab_size` wordpieces if given) to `directory`;
    load it with `model.kind=causal` and `model.name_or_path`.

    Example:
        >>> path = save_tiny_llama("tiny-llama")
        >>> CausalLM.from_config(EncoderConfig(kind="causal", name_or_path=str(path))).dim
        32
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return _save_tiny(directory, seed, vocab_size, LlamaForCausalLM, LlamaConfig, **sizes)


def _save_tiny(
    directory: str | Path,
    seed: int,
    vocab_size: int | None,
    model_class: type,
    config_class: type,
    **sizes: int,
) -> Path:
    """A 2-layer, 32-wide `model_class` with seeded random weights and MiniLM's tokenizer
    (cut to `vocab_size`)."""
    import torch
    from transformers import AutoTokenizer

    from metalm.models.encoder import default_model_path

    directory = Path(directory)
    if vocab_size is None:
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    else:
        tokenizer = _cut_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        **sizes,
    )
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@functools.cache  # the same for every tiny model of a process (tests write two or more)
def _cut_tokenizer(vocab_size: int) -> Any:
    """MiniLM's tokenizer cut to `vocab_size` wordpieces (`cut_vocabulary`), loaded."""
    from transformers import AutoTokenizer

    from metalm.models.encoder import default_model_path

    with tempfile.TemporaryDirectory() as folder:
        AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
        cut_vocabulary(Path(folder) / "tokenizer.json", vocab_size)
        return AutoTokenizer.from_pretrained(folder)


def cut_vocabulary(tokenizer_file: Path, size: int) -> None:
    """Rewrite a BERT WordPiece `tokenizer.json` to `size` wordpieces: the special tokens,
    every single character (alone and as `##x`), then the most frequent of the rest (a
    BERT vocabulary lists words by frequency), numbered anew."""
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    by_rank = sorted(vocab, key=vocab.__getitem__)
    single = {t for t in by_rank if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    singles = [t for t in by_rank if t in single]
    words = [t for t in by_rank if not t.startswith("[") and t not in single]
    if size < len(SPECIAL_TOKENS) + len(singles):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + len(singles)}")
    kept = [*SPECIAL_TOKENS, *singles, *words][:size]
    ids = {token: i for i, token in enumerate(kept)}
    data["model"]["vocab"] = ids
    for token in data["added_tokens"]:
        token["id"] = ids[token["content"]]
    for token in data["post_processor"]["special_tokens"].values():
        token["ids"] = [ids[t] for t in token["tokens"]]
    if data.get("padding"):
        data["padding"]["pad_id"] = ids[data["padding"]["pad_token"]]
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
