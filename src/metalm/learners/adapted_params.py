"""Which encoder tensors a gradient learner's inner loop adapts (`learner.adapt`).

Example:
    >>> sorted(select_params(encoder, "bias"))[:1]
    ['embeddings.LayerNorm.bias']
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from torch import nn

from metalm.errors import MetalmError

AdaptMode = Literal["all", "head", "last_n", "bias", "lora"]
ADAPT_MODES: tuple[str, ...] = typing.get_args(AdaptMode)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_indices(names: list[str]) -> dict[str, int]:
    """Transformer block index of each parameter name that has one (`layer.3.` -> 3)."""
    found = {}
    for name in names:
        match = _LAYER_INDEX.search(name)
        if match:
            found[name] = int(match.group(1))
    return found


def embedding_tables(encoder: Any) -> set[str]:
    """Names of the token/position embedding tables (`nn.Embedding` weights)."""
    model = getattr(encoder, "model", encoder)
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }


def select_params(
    encoder: Any, mode: str, last_n: int = 1, embeddings: bool = True
) -> dict[str, nn.Parameter]:
    """The encoder tensors the inner loop adapts, by name (as in
    `encoder.model.named_parameters()`), for `mode`:

    * `all`: every tensor; `head`: none (only the task head adapts, ANIL);
    * `last_n`: the last `last_n` transformer blocks; `bias`: every bias (BitFit);
    * `lora`: the LoRA adapter tensors (the model must have been wrapped by PEFT).

    The pooler is never adapted: mean/CLS pooling does not use it, so it gets no gradient.
    `embeddings=False` leaves out the embedding tables (`nn.Embedding` weights): their
    inner gradient is a dense, mostly zero copy of the vocabulary matrix every step.

    Example:
        >>> sorted(select_params(encoder, "last_n", 1))[:1]   # a 2-layer encoder
        ['encoder.layer.1.attention.output.LayerNorm.bias']
    """
    model = getattr(encoder, "model", encoder)
    skip = set() if embeddings else embedding_tables(model)
    named = {
        n: p for n, p in model.named_parameters() if ".pooler." not in f".{n}" and n not in skip
    }
    if mode == "all":
        return {n: p for n, p in named.items() if "lora_" not in n}
    if mode == "head":
        return {}
    if mode == "bias":
        return {n: p for n, p in named.items() if n.endswith("bias") and "lora_" not in n}
    if mode == "lora":
        chosen = {n: p for n, p in named.items() if "lora_" in n}
        if not chosen:
            raise MetalmError("learner.adapt=lora but the encoder has no LoRA tensors")
        return chosen
    if mode == "last_n":
        index = layer_indices(list(named))
        if not index:
            raise MetalmError("learner.adapt=last_n: cannot find numbered layers in the encoder")
        depth = max(index.values()) + 1
        if not 1 <= last_n <= depth:
            raise MetalmError(f"learner.last_n must be in 1..{depth}, got {last_n}")
        return {
            n: p
            for n, p in named.items()
            if index.get(n, -1) >= depth - last_n and "lora_" not in n
        }
    raise MetalmError(f"learner.adapt must be one of {list(ADAPT_MODES)}, got {mode!r}")
