"""How texts are grouped for the encoder: by token count, so that little is padded
(pure Python: shared by the PyTorch encoder and the torch-free ONNX predictor)."""

from __future__ import annotations

from collections.abc import Sequence

FORWARD_TOKENS = 1024
"""`TextEncoder.forward` pads at most about this many tokens per group of texts."""


def length_groups(counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of texts grouped by token count (shortest first), each group padded to its
    longest at most `max_tokens` tokens (a group holds at least one text).

    Example:
        >>> length_groups([30, 5, 6, 31], 40)
        [[1, 2], [0], [3]]
    """
    order = sorted(range(len(counts)), key=counts.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * counts[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
