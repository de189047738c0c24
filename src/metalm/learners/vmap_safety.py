"""Making a Hugging Face encoder safe under `torch.func.vmap` and double backward: a
ready 4D attention mask, a decomposed layer norm, SDPA's plain-math kernel.

Example:
    >>> with math_attention(), vmap_safe_layer_norm():
    ...     pass   # vmapped meta-losses run here (see GradientLearner.meta_loss_batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def attention_mask_4d(model: nn.Module, mask: Tensor) -> Tensor:
    """A ready 4D attention mask [B, 1, 1, L] that Hugging Face uses as-is.

    Under `vmap`, building the mask from a 2D one fails: transformers checks
    `padding_mask.all()` (data-dependent control flow). A 4D mask skips that code.
    Boolean for SDPA attention, additive (0 / dtype min) for eager attention.
    """
    keep = mask[:, None, None, :].bool()
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "sdpa":
        return keep
    dtype = next(model.parameters()).dtype
    return (~keep).to(dtype) * torch.finfo(dtype).min


def _layer_norm_decomposed(
    input: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@contextlib.contextmanager
def vmap_safe_layer_norm() -> Iterator[None]:
    """Within the block, `nn.LayerNorm` computes with plain ops instead of the fused kernel.

    On torch 2.13, `vmap` over an inner `torch.func.grad` and then an outer backward gives
    wrong meta-gradients for a LayerNorm *bias* (several % off; loops and finite
    differences agree with each other): a batching-rule bug in the fused layer-norm
    backward. The decomposed layer norm is exact; we use it only in vmapped meta-losses.
    """
    functional = torch.nn.functional
    original = functional.layer_norm
    functional.layer_norm = _layer_norm_decomposed  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.layer_norm = original  # type: ignore[assignment]


def math_attention() -> contextlib.AbstractContextManager:
    """SDPA restricted to its plain-math kernel: the fused CPU flash-attention kernel has
    no double backward (second-order MAML) and no vmap batching rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
