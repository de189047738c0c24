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
from typing import Any, Protocol

import numpy as np
import torch

from metalm.data.episodes import Embed, Episode
from metalm.errors import MetalmError


class TaskSampler(Protocol):
    """What the trainer needs of a source of episodes; `on_step`, `state_dict` and
    `load_state_dict` are optional (see `refresh_samplers`)."""

    def sample(self, index: int) -> Episode: ...


def on_step(sampler: Any, step: int, embed: Embed) -> None:
    """Let `sampler` refresh what it computes from the current encoder, if it does."""
    hook = getattr(sampler, "on_step", None)
    if hook is not None:
        hook(step, embed)


def sampler_state(sampler: Any) -> dict[str, torch.Tensor]:
    getter = getattr(sampler, "state_dict", None)
    return dict(getter()) if getter is not None else {}


def load_sampler_state(sampler: Any, state: dict[str, torch.Tensor]) -> None:
    loader = getattr(sampler, "load_state_dict", None)
    if loader is not None and state:
        loader(state)


class MixtureSampler:
    """Episode `i` comes from `samplers[j]`, with `j` drawn by `weights` from `(seed, i)`."""

    def __init__(self, samplers: Sequence[Any], weights: Sequence[float], seed: int = 0):
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
            on_step(sampler, step, embed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{j}.{key}": value
            for j, sampler in enumerate(self.samplers)
            for key, value in sampler_state(sampler).items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for j, sampler in enumerate(self.samplers):
            prefix = f"{j}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            load_sampler_state(sampler, own)


def mixture(samplers: Sequence[Any], weights: Sequence[float], seed: int = 0) -> Any:
    """One sampler as itself (its episodes unchanged), several as a `MixtureSampler`."""
    if len(samplers) == 1:
        return samplers[0]
    return MixtureSampler(samplers, weights, seed)
