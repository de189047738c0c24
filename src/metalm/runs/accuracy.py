"""Few-shot accuracy with 95% confidence intervals, per-episode scores and timings."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from metalm.data.episodes import Episode, EpisodeSampler
from metalm.learners.base import MetaLearner

Z95 = 1.959963984540054


T_BELOW = 30  # fewer values than this: Student's t interval; else the normal one
# Student's t 97.5% quantiles, 1 to 28 degrees of freedom (scipy.stats.t.ppf(0.975, df))
# fmt: off
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624,
    2.306004, 2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787,
    2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963, 2.079614,
    2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407,
)
# fmt: on


def critical_value(n: int) -> float:
    """The 95% two-sided critical value for a mean of `n` values: Student's t with n − 1
    degrees of freedom below `T_BELOW` values (wider: 2.26 at 10, 2.14 at 15), the
    normal 1.96 from there on.

    Example:
        >>> round(critical_value(10), 3), round(critical_value(600), 3)
        (2.262, 1.96)
    """
    return T975[n - 2] if 2 <= n < T_BELOW else Z95


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (`critical_value`: t below 30
    values, normal from there on).

    Example:
        >>> mean_ci95([0.5, 0.7, 0.6])
        (0.6, 0.248...)
    """
    array = np.asarray(values, dtype=float)
    if array.size < 2:
        return float(array.mean()) if array.size else float("nan"), float("nan")
    spread = array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean()), float(critical_value(array.size) * spread)


@dataclass
class MethodResult:
    """One learner under one protocol.

    `per_episode`: the accuracy of each episode; for a single episode (the full-way
    protocol), the correctness (1.0 or 0.0) of each of its query texts instead, so that
    two methods can be compared text by text (`EvalReport.paired_difference`). Either
    way `accuracy` is their mean.
    """

    method: str
    protocol: str
    dataset: str
    n_way: int
    k_shot: int
    episodes: int
    accuracy: float
    ci95: float
    adapt_seconds: float
    predict_texts_per_second: float
    per_episode: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MethodResult:
        """A result as written in a report (`as_dict`); other keys, such as a compare
        row's `vs_frozen`, are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def episode_correct(learner: MetaLearner, episode: Episode) -> np.ndarray:
    """Whether each query text of `episode` is classified right (1.0) or not (0.0)."""
    state = learner.adapt_named(episode.support_texts, episode.support_labels, episode.label_names)
    return _correct(learner.predict(state, episode.query_texts), episode)


def episode_accuracy(learner: MetaLearner, episode: Episode) -> float:
    return float(episode_correct(learner, episode).mean())


def _correct(logits: torch.Tensor, episode: Episode) -> np.ndarray:
    truth = torch.tensor(episode.query_labels)
    return (logits.argmax(-1).cpu() == truth).to(torch.float64).numpy()


def _timed(learner: MetaLearner, episode: Episode) -> tuple[np.ndarray, float, float]:
    start = time.perf_counter()
    state = learner.adapt_named(episode.support_texts, episode.support_labels, episode.label_names)
    adapted = time.perf_counter()
    logits = learner.predict(state, episode.query_texts)
    done = time.perf_counter()
    return _correct(logits, episode), adapted - start, done - adapted


def evaluate_episodes(
    learner: MetaLearner,
    episodes: Sequence[Episode],
    method: str,
    protocol: str,
    dataset: str,
    timing_episodes: int = 10,
    progress: bool = True,
) -> MethodResult:
    """Accuracy of `learner` on `episodes`, with a 95% interval.

    Adapt/predict times are measured on the first `timing_episodes` episodes as a user
    would meet them (nothing precomputed); the rest reuse one embedding table of the
    pretrained encoder, which gives the same predictions faster.
    For a single episode (full-way), the interval is over the query texts (binomial,
    normal approximation) and `per_episode` holds each text's correctness.
    """
    learner.eval()
    if timing_episodes:
        learner.encoder.embed(episodes[0].query_texts[:8])  # warm-up, not timed
    timed = [_timed(learner, ep) for ep in episodes[:timing_episodes]]
    rest = episodes[len(timed) :]
    correct = [t[0] for t in timed]
    if rest:
        texts = [t for ep in rest for t in ep.support_texts + ep.query_texts]
        with learner.encoder.cached_embeddings(texts):
            bar = tqdm(rest, desc=f"{method} {protocol}", disable=not progress, leave=False)
            correct += [episode_correct(learner, ep) for ep in bar]
    if len(episodes) == 1:
        per_episode = [float(v) for v in correct[0]]
        p = float(np.mean(per_episode))
        mean, ci = p, Z95 * math.sqrt(max(p * (1 - p), 1e-12) / len(per_episode))
    else:
        per_episode = [float(c.mean()) for c in correct]
        mean, ci = mean_ci95(per_episode)
    adapt, predict = float("nan"), float("nan")
    if timed:
        adapt = float(np.median([t[1] for t in timed]))
        query_texts = sum(len(ep.query_texts) for ep in episodes[: len(timed)])
        predict = query_texts / max(sum(t[2] for t in timed), 1e-9)
    first = episodes[0]
    return MethodResult(
        method=method,
        protocol=protocol,
        dataset=dataset,
        n_way=first.n_way,
        k_shot=len(first.support_texts) // first.n_way,
        episodes=len(episodes),
        accuracy=mean,
        ci95=ci,
        adapt_seconds=adapt,
        predict_texts_per_second=predict,
        per_episode=per_episode,
    )


def validation_accuracy(learner: MetaLearner, sampler: EpisodeSampler, episodes: int) -> float:
    """Mean accuracy over the first `episodes` episodes of `sampler` (cached embeddings)."""
    chosen = [sampler.sample(i) for i in range(episodes)]
    learner.eval()
    texts = [t for ep in chosen for t in ep.support_texts + ep.query_texts]
    with learner.encoder.cached_embeddings(texts):
        return float(np.mean([episode_accuracy(learner, ep) for ep in chosen]))
