"""A tiny random BERT with MiniLM's tokenizer: for fast tests, smoke runs and benchmarks."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT with random weights (seeded) and the shipped
    all-MiniLM-L6-v2 tokenizer to `directory`; load it with `model.name_or_path`.

    Example:
        >>> path = save_tiny_bert("/tmp/tiny-bert")
        >>> TextEncoder.from_config(EncoderConfig(name_or_path=str(path))).dim
        32
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from metalm.models.encoder import default_model_path

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
