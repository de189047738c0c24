"""Tiny random models with MiniLM's tokenizer (a BERT encoder, a Llama causal LM): for fast
tests, smoke runs and benchmarks."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT with random weights (seeded) and the shipped
    all-MiniLM-L6-v2 tokenizer to `directory`; load it with `model.name_or_path`.

    Example:
        >>> path = save_tiny_bert("tiny-bert")
        >>> TextEncoder.from_config(EncoderConfig(name_or_path=str(path))).dim
        32
    """
    from transformers import BertConfig, BertModel

    sizes = dict(num_attention_heads=2, max_position_embeddings=128)
    return _save_tiny(directory, seed, BertModel, BertConfig, **sizes)


def save_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide Llama causal LM with random weights (seeded) and the
    all-MiniLM-L6-v2 tokenizer to `directory`; load it with `model.kind=causal` and
    `model.name_or_path`.

    Example:
        >>> path = save_tiny_llama("tiny-llama")
        >>> CausalLM.from_config(EncoderConfig(kind="causal", name_or_path=str(path))).dim
        32
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return _save_tiny(directory, seed, LlamaForCausalLM, LlamaConfig, **sizes)


def _save_tiny(
    directory: str | Path, seed: int, model_class: type, config_class: type, **sizes: int
) -> Path:
    """A 2-layer, 32-wide `model_class` with seeded random weights and MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from metalm.models.encoder import default_model_path

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
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
