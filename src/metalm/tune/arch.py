"""Architecture search over the encoder's size, built from the pretrained model: how many
of its layers to keep (`model.num_layers`), how many attention heads per layer
(`model.num_heads`, pruned by `prune_heads`), the pooling, and the max sequence length;
objectives are few-shot accuracy and inference latency (or parameter count), reported as
a Pareto front.

Example:
    >>> from metalm.tune.objective import Objective
    >>> base = load_config(None, tiny)
    >>> space = arch_space(base)  # num_layers 1..L, num_heads, pooling, max_length
    >>> [param.name for param in space.params]
    ['model.num_layers', 'model.num_heads', 'model.pooling', 'model.max_length']
    >>> objective = Objective(base, space, "runs/arch", objectives=["accuracy", "latency"])
"""

from __future__ import annotations

import statistics
import time

import optuna
import torch

from metalm.config import RunConfig
from metalm.learners.base import MetaLearner
from metalm.tune.space import SearchSpace, parse_space

LATENCY_TEXTS = 32  # the fixed batch: the first texts of the meta-val pool
LATENCY_REPEATS = 5


def pretrained_layers(config: RunConfig) -> tuple[int, int, int]:
    """(layers, attention heads per layer, max positions) of the pretrained encoder,
    from its config only."""
    from transformers import AutoConfig

    from metalm.models.encoder import default_model_path

    path = config.model.name_or_path or default_model_path()
    model_config = AutoConfig.from_pretrained(
        path, trust_remote_code=config.model.trust_remote_code
    )
    return (
        int(model_config.num_hidden_layers),
        int(model_config.num_attention_heads),
        int(model_config.max_position_embeddings),
    )


def arch_space(config: RunConfig, lengths: tuple[int, ...] = (16, 32, 64, 128)) -> SearchSpace:
    """The default architecture space of `config`'s pretrained encoder: heads are kept
    in thirds (12 heads: 4, 8 or 12)."""
    layers, heads, positions = pretrained_layers(config)
    head_choices = sorted({max(1, heads * i // 3) for i in (1, 2, 3)})
    section = {
        "model.num_layers": {"low": 1, "high": layers, "type": "int"}
        if layers > 1
        else {"choices": [1]},
        "model.num_heads": {"choices": head_choices},
        "model.pooling": {"choices": ["mean", "cls"]},
        "model.max_length": {"choices": [n for n in lengths if n <= positions] or [positions]},
    }
    return parse_space(section, config)


def fixed_texts(config: RunConfig) -> list[str]:
    from metalm.tasks import build_pools

    pools = build_pools(config.data)
    source = pools.val if pools.val is not None else pools.train
    return list(source.texts[:LATENCY_TEXTS])


@torch.no_grad()
def measure(learner: MetaLearner, config: RunConfig) -> dict[str, float]:
    """`latency`: median milliseconds to encode the fixed batch (after one warm-up pass);
    `params`: parameters of the encoder (millions)."""
    encoder = learner.encoder
    texts = fixed_texts(config)
    was_training = encoder.training
    encoder.eval()
    encoder(texts)  # warm-up (and tokenization into the cache)
    times = []
    for _ in range(LATENCY_REPEATS):
        began = time.perf_counter()
        encoder(texts)
        times.append((time.perf_counter() - began) * 1000)
    encoder.train(was_training)
    count = sum(p.numel() for p in encoder.parameters())
    return {"latency": statistics.median(times), "params": count / 1e6}


def pareto_rows(study: optuna.Study) -> list[dict]:
    """The Pareto-optimal trials: number, values, parameters (best accuracy first)."""
    rows = [
        {"trial": t.number, "values": list(t.values), "params": dict(t.params)}
        for t in study.best_trials
    ]
    return sorted(rows, key=lambda r: -r["values"][0])
