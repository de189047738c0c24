"""Every learner's outputs on a tiny model, saved or compared: the check that a
refactoring of the learners changed nothing (meta-loss, every meta-gradient tensor, and
the logits of an adapted task, for each learner and the gradient learners' variants:
first/second order, sgd/adam, learned rates, proximal unrolled and implicit, vmapped).

    python scripts/learner_outputs.py --save before.pt     # on the old code
    python scripts/learner_outputs.py --compare before.pt  # on the new: max |Δ| per output

Exits non-zero when an output differs by more than `--tolerance` (default 1e-6) times
its scale (the largest |value| of that output before, at least 1) or is missing: float32
operations done in another order round differently in the last bits. Runs on the CPU
in one thread (deterministic kernels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS: dict[str, dict] = {  # label: learner config (name + overrides)
    "maml": {"name": "maml", "inner_steps": 2},
    "maml adam": {"name": "maml", "inner_steps": 2, "inner_optimizer": "adam"},
    "maml vmapped": {"name": "maml", "inner_steps": 2, "vectorize": True},
    "fomaml": {"name": "fomaml", "inner_steps": 2},
    "anil": {"name": "anil", "inner_steps": 3},
    "anil first order": {"name": "anil", "inner_steps": 3, "first_order": True},
    "anil logreg eval": {"name": "anil", "eval_head_init": "logreg"},
    "metasgd": {"name": "metasgd", "inner_steps": 2},
    "metasgd element adam": {
        "name": "metasgd",
        "inner_steps": 2,
        "lr_shape": "element",
        "inner_optimizer": "adam",
    },
    "metasgd first order": {"name": "metasgd", "inner_steps": 2, "first_order": True},
    "proximal": {"name": "proximal", "inner_steps": 2, "prox_lambda": 0.5},
    "proximal first order": {
        "name": "proximal",
        "inner_steps": 2,
        "prox_lambda": 0.5,
        "first_order": True,
    },
    "proximal adam": {
        "name": "proximal",
        "inner_steps": 2,
        "prox_lambda": 0.5,
        "inner_optimizer": "adam",
    },
    "imaml": {"name": "proximal", "inner_steps": 2, "prox_lambda": 0.5, "implicit": True},
    "reptile": {"name": "reptile", "inner_steps": 2},
}


def outputs(config: dict, model_dir: Path) -> dict[str, torch.Tensor]:
    """Learner `config`'s meta-loss and gradients on two episodes, and its logits on an
    adapted task (or only the logits for learners that are not meta-trained)."""
    from metalm.config import parse_learner_config
    from metalm.data import EpisodeSampler, builtin_dataset
    from metalm.errors import MetalmError
    from metalm.learners import LEARNERS, build_learner
    from metalm.models.base import build_model
    from metalm.models.encoder import EncoderConfig

    kind = LEARNERS[config["name"]].model_kind
    torch.manual_seed(0)
    model = build_model(EncoderConfig(kind=kind, name_or_path=str(model_dir), max_length=24))
    learner = build_learner(model, parse_learner_config(dict(config))).eval()
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 2, 2, seed=0)
    episodes = [sampler.sample(0), sampler.sample(1)]
    out: dict[str, torch.Tensor] = {}
    try:
        torch.manual_seed(1)
        loss = learner.meta_loss_batch(episodes)
        if loss is None:
            loss = torch.stack([learner.meta_loss(ep) for ep in episodes]).mean()
        loss.backward()
        out["loss"] = loss.detach()
        for name, parameter in learner.named_parameters():
            if parameter.grad is not None:
                out[f"grad {name}"] = parameter.grad.detach().clone()
        learner.zero_grad()
    except MetalmError:
        pass  # not meta-trained
    torch.manual_seed(2)
    episode = episodes[0]
    task = learner.adapt_named(episode.support_texts, episode.support_labels, episode.label_names)
    out["logits"] = learner.predict(task, episode.query_texts).detach().float()
    return out


def collect() -> dict[str, torch.Tensor]:
    from metalm.learners import LEARNERS
    from metalm.models.tiny import save_tiny_bert, save_tiny_llama

    torch.set_num_threads(1)
    found: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            "encoder": save_tiny_bert(Path(tmp) / "b"),
            "causal": save_tiny_llama(Path(tmp) / "l"),
        }
        configs = dict(VARIANTS)
        for name in sorted(LEARNERS):  # every other learner at its defaults
            if name not in {c["name"] for c in VARIANTS.values()}:
                configs[name] = {"name": name, **({"lora_r": 2} if name == "metaicl" else {})}
        for label, config in configs.items():
            model_dir = dirs[LEARNERS[config["name"]].model_kind]
            for key, value in outputs(config, model_dir).items():
                found[f"{label}: {key}"] = value
            print(f"{label}: done", flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="FILE")
    group.add_argument("--compare", metavar="FILE")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    found = collect()
    if args.save:
        torch.save(found, args.save)
        print(f"saved {len(found)} outputs to {args.save}")
        return 0
    before = torch.load(args.compare, weights_only=True)
    bad, bitwise, worst = [], 0, 0.0
    for key in sorted(set(before) | set(found)):
        if key not in found or key not in before:
            bad.append(f"{key}: only {'before' if key in before else 'after'}")
            continue
        gap = float((found[key].double() - before[key].double()).abs().max())
        scale = max(1.0, float(before[key].double().abs().max()))
        bitwise += bool(torch.equal(found[key], before[key]))
        worst = max(worst, gap / scale)
        if gap > args.tolerance * scale:
            bad.append(f"{key}: max |Δ| {gap:.2e} (scale {scale:.2e})")
    print(
        f"{len(found)} outputs: {bitwise} bitwise equal, largest relative difference "
        f"{worst:.1e}, {len(bad)} beyond {args.tolerance}"
    )
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
