"""Task mixtures: each episode comes from one of several task samplers, by weight.

Every sampler keeps its own label space (an episode never mixes sources). Samplers that
depend on the current encoder (hard negatives, cluster tasks) are refreshed through
`on_step`, and their state travels in checkpoints through `state_dict`.

Example:
    >>> from metalm.data import builtin_dataset, EpisodeSampler
    >>> a = EpisodeSampler(builtin_dataset("clinc150", "train"), 5, 1, 1, seed=0)
    >>> b = EpisodeSampler(builtin_dataset("banking77", "train"), 5, 1, 1, seed=1)
    >>> mix = MixtureSampler([a, b], [3.0, 1.0], seed=0)
    >>> mix.sample(0) == mix.sample(0)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metalm.data.episodes import Embed, Episode, TaskSampler
from metalm.errors import MetalmError


class MixtureSampler(TaskSampler):
    """Episode `i` comes from `samplers[j]`, with `j` drawn by `weights` from `(seed, i)`."""

    def __init__(self, samplers: Sequence[TaskSampler], weights: Sequence[float], seed: int = 0):
        if not samplers or len(samplers) != len(weights):
            raise MetalmError("a task mixture needs one weight per source, and a source")
        if any(not w > 0 for w in weights):
            raise MetalmError(f"task mixture weights must be > 0, got {list(weights)}")
        self.samplers = list(samplers)
        total = float(sum(weights))
        self.probabilities = np.asarray([w / total for w in weights])
        self.seed = seed

    def source_of(self, index: int) -> int:
        """Which sampler episode `index` comes from."""
        rng = np.random.default_rng([self.seed, index, 1])
        return int(rng.choice(len(self.samplers), p=self.probabilities))

    def sample(self, index: int) -> Episode:
        return self.samplers[self.source_of(index)].sample(index)

    @property
    def dataset(self) -> Any:
        """The first source's data (for messages)."""
        return getattr(self.samplers[0], "dataset", None)

    def on_step(self, step: int, embed: Embed) -> None:
        for sampler in self.samplers:
            sampler.on_step(step, embed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{j}.{key}": value
            for j, sampler in enumerate(self.samplers)
            for key, value in sampler.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for j, sampler in enumerate(self.samplers):
            prefix = f"{j}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if own:
                sampler.load_state_dict(own)


def mixture(
    samplers: Sequence[TaskSampler], weights: Sequence[float], seed: int = 0
) -> TaskSampler:
    """One sampler as itself (its episodes unchanged), several as a `MixtureSampler`."""
    if len(samplers) == 1:
        return samplers[0]
    return MixtureSampler(samplers, weights, seed)
