"""`metalm.learners.vmap_safety`: the decomposed layer norm is exact and scoped."""

from __future__ import annotations

import torch
from torch import nn

from metalm.learners.vmap_safety import vmap_safe_layer_norm


def test_vmap_safe_layer_norm_is_exact_and_scoped():
    x, w, bias = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    expected = nn.functional.layer_norm(x, (8,), w, bias, 1e-12)
    original = nn.functional.layer_norm
    with vmap_safe_layer_norm():
        assert nn.functional.layer_norm is not original
        assert torch.allclose(
            nn.functional.layer_norm(x, (8,), w, bias, 1e-12), expected, atol=1e-5
        )
    assert nn.functional.layer_norm is original
