"""Meta-trains several learners on the tiny BERT in float64 and saves, from rank 0, each
one's final weights and log: run by `tests/test_distributed.py` under torchrun (2 ranks)
and in the test process itself (1 process), to compare the two.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_overrides

from metalm import distributed
from metalm.config import load_config
from metalm.learners import build_learner
from metalm.models.base import build_model
from metalm.models.tiny import save_tiny_llama
from metalm.tasks import build_pools
from metalm.trainer import MetaTrainer

META_BATCH = 4
STEPS = 3
MIXTURE = {  # hard negatives and k-means cluster tasks refreshed from the encoder
    "data.unlabeled": "{source: banking77, max_texts: 120, clusters: 6, n_way: 3, "
    "refresh_every: 2}",
    "episode.hard_negatives": 0.5,
    "episode.hard_refresh_every": 2,
}
# each case: a learner and its overrides (short inner loops keep the test fast)
INNER = {"learner.inner_steps": 1, "learner.adapt": "last_n", "learner.last_n": 1}
CASES: dict[str, dict[str, object]] = {
    "protonet": {},
    "protonet-mixture": MIXTURE,
    "maml": INNER,
    "fomaml-hypergradient": {
        "learner.name": "fomaml",
        **INNER,
        "train.hypergradient_lr": 0.05,
    },
    "anil": {"learner.inner_steps": 2},
    "metasgd": INNER,
    "reptile": {"learner.inner_steps": 2, "learner.adapt": "last_n", "learner.last_n": 1},
    "proximal-implicit": {
        "learner.name": "proximal",
        **INNER,
        "learner.implicit": True,
        "learner.prox_lambda": 1.0,
    },
    "metanet": {},
    "lstm_meta": {"learner.inner_steps": 2},
    # MetaICL's LoRA adapters on a tiny random Llama
    "metaicl": {"model.kind": "causal", "learner.lora_r": 2},
}


def train(model_dir: Path, out_dir: Path, cases: list[str]) -> None:
    """Meta-train each case for `STEPS` steps of meta-batch `META_BATCH`, in float64."""
    world = distributed.setup("cpu")
    for case in cases:
        extra = {"learner.name": case.split("-")[0], **CASES[case]}
        extra |= {"train.steps": STEPS, "train.meta_batch_size": META_BATCH}
        extra |= {"train.eval_every": 2, "train.checkpoint_every": 2, "train.val_episodes": 1}
        extra |= {"train.val_n_way": 3, "train.val_q_queries": 2, "train.warmup_steps": 0}
        if extra.get("model.kind") == "causal":  # rank 0 writes it (seeded), all load it
            extra["model.name_or_path"] = out_dir / "llama"
            if world.is_main:
                # the tokenizer of the tiny BERT it was given, cut to the same size
                vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
                save_tiny_llama(out_dir / "llama", vocab_size=vocab)
            if world.distributed:
                torch.distributed.barrier()
        config = load_config(None, tiny_overrides(model_dir, out_dir / case, **extra))
        torch.manual_seed(config.seed)
        learner = build_learner(build_model(config.model), config.learner).double()
        pools = build_pools(config.data)
        drop = config.data.drop_small_classes
        sampler = pools.train_sampler(config.episode, config.seed, drop)
        val = pools.sampler("val", config.episode, config.seed + 1, drop)
        trainer = MetaTrainer(learner, sampler, val, config.train, out_dir / case, progress=False)
        result = trainer.fit()
        if world.is_main:
            weights = {k: v.detach().contiguous() for k, v in learner.state_dict().items()}
            save_file(weights, str(out_dir / case / "final.safetensors"))
            (out_dir / case / "result.json").write_text(json.dumps(result.__dict__))


def tune_with_pruning(model_dir: Path, out_dir: Path) -> None:
    """Three trials, each trained by every rank; the second is pruned at its first
    validation: every rank stops it and goes on to the third. Rank 0 writes the states."""
    import optuna

    from metalm.runs.trial import meta_train
    from metalm.tune import parse_space
    from metalm.tune.objective import Objective

    world = distributed.setup("cpu")
    extra = {"train.steps": 6, "train.eval_every": 2, "train.meta_batch_size": 2}
    base = load_config(None, tiny_overrides(model_dir, out_dir, **extra))
    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, base)
    if not world.is_main:
        distributed.follow({"trial": lambda job: meta_train(job[0], job[1], progress=False)})
        return

    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return trial.number == 1

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=PruneTrialOne())
    try:
        study.optimize(Objective(base, space, out_dir / "study"), n_trials=3)
    finally:
        distributed.announce("done")
    states = [trial.state.name for trial in study.trials]
    (out_dir / "tune.json").write_text(json.dumps(states))


if __name__ == "__main__":
    if sys.argv[3:] == ["tune"]:
        tune_with_pruning(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        train(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(CASES))
    # as the CLI does after a command that succeeded: meet the peer before leaving, so
    # that no rank tears down while the other still sends (an abort at exit otherwise)
    distributed.teardown(wait_for_peers=True)
