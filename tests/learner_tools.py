"""Plain helpers that the tests of learners, models and data share (fixtures: conftest.py)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from metalm.config import parse_learner_config
from metalm.data import EpisodeSampler, LabeledTextDataset, builtin_dataset
from metalm.learners import build_learner
from metalm.learners.gradient import GradientLearner
from metalm.models import TextEncoder


# -- weights that must not change (learners, models) ---------------------------------------
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# -- learners ------------------------------------------------------------------------------
def sampler(n_way: int, k_shot: int, q: int = 2, seed: int = 5) -> EpisodeSampler:
    """Episodes of BANKING77's test split."""
    return EpisodeSampler(builtin_dataset("banking77", "test"), n_way, k_shot, q, seed=seed)


def learner_for(encoder: TextEncoder, **spec) -> GradientLearner:
    """A gradient-based learner of `spec` in eval mode."""
    learner = build_learner(encoder, parse_learner_config(spec))
    learner.eval()  # no dropout: exact comparisons
    return learner  # type: ignore[return-value]


def seeded_learner(encoder: TextEncoder, seed: int = 0, perturb: bool = True, **spec):
    """A learner in eval mode, built after `torch.manual_seed(seed)`; `perturb`: random
    meta-parameters instead of the zero-initialised last layers (an untrained metanet is
    exactly a prototype head)."""
    torch.manual_seed(seed)
    learner = build_learner(encoder, parse_learner_config(spec))
    if perturb:
        with torch.no_grad():
            for name, p in learner.named_parameters():
                if not name.startswith("encoder."):
                    p.add_(0.3 * torch.randn_like(p))
    learner.eval()
    return learner


def meta_params(learner) -> dict[str, torch.Tensor]:
    """A learner's parameters outside its encoder."""
    return {n: p for n, p in learner.named_parameters() if not n.startswith("encoder.")}


def quadratic(params, batch):
    """A toy inner loss for `inner_loop`: a scaled square in `w` plus a cube in `b`."""
    target, scale = batch
    return (scale * (params["w"] - target) ** 2).sum() + (params["b"] ** 3).sum()


# -- data ----------------------------------------------------------------------------------
BUILTIN_SIZES = {
    ("banking77", "train"): 8622,
    ("banking77", "valid"): 1540,
    ("banking77", "test"): 3080,
    ("banking77", "train_5"): 385,
    ("banking77", "train_10"): 770,
    ("clinc150", "train"): 15000,
    ("clinc150", "valid"): 3000,
    ("clinc150", "test"): 4500,
    ("clinc150", "train_5"): 750,
    ("clinc150", "train_10"): 1500,
}


N_CLASSES = {"banking77": 77, "clinc150": 150}


@cache
def cached_builtin(name: str, split: str) -> LabeledTextDataset:
    """The built-in datasets are immutable, so tests share one load of each."""
    return builtin_dataset(name, split)


def toy_dataset(counts: dict[str, int]) -> LabeledTextDataset:
    """A dataset with `counts[c]` distinct texts for each class c."""
    texts, labels = [], []
    for c, n in counts.items():
        texts += [f"{c} example {i}" for i in range(n)]
        labels += [c] * n
    return LabeledTextDataset(texts, labels, name="toy")


def write_jsonl(path: Path, objects) -> None:
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8"
    )
