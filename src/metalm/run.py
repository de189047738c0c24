"""`run(config)`: meta-train a learner, then evaluate it beside baselines. The CLI,
the benchmarks and the tests all go through here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from metalm import distributed
from metalm.config import RunConfig, SettingConfig, load_config, save_config
from metalm.data.episodes import Episode, EpisodeSampler, SettingNames
from metalm.data.mixture import TaskSampler
from metalm.errors import MetalmError
from metalm.evaluate import MethodResult, evaluate_episodes
from metalm.learners import (
    LearnerConfig,
    MetaLearner,
    build_learner,
    learner_class,
    method_label,
)
from metalm.models.causal import build_model
from metalm.models.encoder import EncoderConfig
from metalm.report import EvalReport
from metalm.tasks import TaskPools, build_pools, validation_sampler
from metalm.trainer import (
    BEST_WEIGHTS,
    CHECKPOINT_DIR,
    MetaTrainer,
    TrainResult,
    ValidationCallback,
)

CONFIG_FILE = "config.yaml"
EVALS_DIR = "evals"


def _run_dir(config: RunConfig) -> Path:
    name = config.run_name or f"{config.learner.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


def _test_samplers(
    config: RunConfig, pools: TaskPools
) -> list[tuple[SettingConfig, EpisodeSampler]]:
    if pools.test is None:
        if config.eval.settings:
            raise MetalmError(
                "no test data: set data.test (labeled texts of your own), or "
                "eval.settings=[] to meta-train without a test"
            )
        return []
    return [
        (
            setting,
            EpisodeSampler(
                pools.test,
                setting.n_way,
                setting.k_shot,
                config.eval.q_queries,
                config.eval.seed,
                config.data.drop_small_classes,
                names=SettingNames(
                    f"eval.settings.{i}.n_way", f"eval.settings.{i}.k_shot", "eval.q_queries"
                ),
            ),
        )
        for i, setting in enumerate(config.eval.settings)
    ]


def evaluate_learner(
    learner: MetaLearner,
    method: str,
    config: RunConfig,
    pools: TaskPools,
    progress: bool = True,
) -> list[MethodResult]:
    """Every test protocol of `config` for one learner, on the same fixed tasks.

    `method` is the learner's label in the report (see `method_label`); its episode
    count is `eval.episodes_by_method[method]`, else that of its learner name (the label
    before any `/head`), else `eval.episodes`."""
    by_method = config.eval.episodes_by_method
    episodes = by_method.get(method, by_method.get(method.split("/")[0], config.eval.episodes))
    results = []
    for setting, sampler in _test_samplers(config, pools):
        chosen: list[Episode] = [sampler.sample(i) for i in range(episodes)]
        protocol = f"{setting.n_way}-way {setting.k_shot}-shot"
        results.append(
            evaluate_episodes(
                learner, chosen, method, protocol, pools.test_source_name, progress=progress
            )
        )
    for shots, episode in sorted(pools.full_way.items()):
        results.append(
            evaluate_episodes(
                learner,
                [episode],
                method,
                f"full-way {shots}-shot",
                pools.test_source_name,
                progress=progress,
            )
        )
    return results


def _baselines(config: RunConfig) -> list[LearnerConfig]:
    """The baselines to evaluate beside the learner: all but those with the learner's own
    report label (so `frozen/logreg` stays beside the learner `frozen`)."""
    own = method_label(config.learner)
    return [b for b in config.eval.baselines if method_label(b) != own]


def evaluate_with_baselines(
    learner: MetaLearner, config: RunConfig, pools: TaskPools, progress: bool = True
) -> list[MethodResult]:
    """The learner, then each baseline on a fresh pretrained encoder, on the same tasks;
    each is reported under its `method_label` (`frozen`, `frozen/logreg`, ...)."""
    results = evaluate_learner(learner, method_label(config.learner), config, pools, progress)
    fresh: dict[str, object] = {}
    for baseline in _baselines(config):
        kind = learner_class(baseline.name).model_kind
        if kind not in fresh:
            fresh[kind] = build_model(_baseline_model(config, kind))
        results += evaluate_learner(
            build_learner(fresh[kind], baseline), method_label(baseline), config, pools, progress
        )
    return results


def _baseline_model(config: RunConfig, kind: str) -> EncoderConfig:
    """The model a baseline runs on: the run's own (pretrained, fresh) when of the kind the
    baseline needs, else the shipped model of that kind on the run's device (so that an
    in-context run is compared with `frozen` on MiniLM, and the other way round)."""
    if config.model.kind == kind:
        return config.model
    return EncoderConfig(kind=kind, device=config.model.device)


def _samplers(config: RunConfig, pools: TaskPools) -> tuple[TaskSampler, TaskSampler | None]:
    """Meta-training episodes (a task mixture when there are several sources or
    unlabeled texts) and (if there are meta-val classes) validation episodes."""
    drop = config.data.drop_small_classes
    return (
        pools.train_sampler(config.episode, config.seed, drop),
        validation_sampler(pools, config.train, config.seed + 1, drop),
    )


def _trainer(
    learner: MetaLearner,
    config: RunConfig,
    pools: TaskPools,
    run_dir: Path,
    progress: bool,
    on_validation: Sequence[ValidationCallback],
) -> MetaTrainer | None:
    """The outer loop for `learner`, or None if it does not meta-train (or `steps=0`).

    Builds the samplers either way, so bad data or episode shapes fail here."""
    train_sampler, val_sampler = _samplers(config, pools)
    distributed.check_learner(learner, config.train.steps)
    if not (learner.meta_trainable and config.train.steps > 0):
        return None
    return MetaTrainer(
        learner,
        train_sampler,
        val_sampler,
        config.train,
        run_dir,
        progress=progress,
        on_validation=on_validation,
    )


def run(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> EvalReport:
    """Meta-train `config.learner` (if it learns and `train.steps > 0`), then evaluate it
    and the baselines on the same test tasks; results go to the run directory.

    Example:
        >>> report = run(load_config("configs/demo.yaml", ["train.steps=20"]))
        >>> print(report.to_markdown())
    """
    world = distributed.setup(config.model.device)  # under torchrun: one rank of several
    torch.manual_seed(config.seed)
    encoder = build_model(config.model)
    learner = build_learner(encoder, config.learner)
    pools = build_pools(config.data, config.eval.full_way_shots)
    _test_samplers(config, pools)  # validates N, K, Q against the test classes up front
    for baseline in _baselines(config):  # validates each baseline's config up front
        if learner_class(baseline.name).model_kind == config.model.kind == "encoder":
            build_learner(encoder, baseline)  # (causal learners' configs check themselves)
    if config.train.steps < 0:
        raise MetalmError(f"train.steps must be >= 0, got {config.train.steps}")

    run_dir = Path(resume) if resume else distributed.broadcast_object(_run_dir(config))
    # built before the run directory exists: the samplers and the trainer validate
    # the data and config.train
    trainer = _trainer(learner, config, pools, run_dir, progress, on_validation)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise MetalmError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} "
            "or pick another run_name"
        )
    distributed.barrier()  # every rank has checked before rank 0 writes
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)

    train_summary: dict = {}
    if trainer is not None:
        train_summary = asdict(trainer.fit(resume=resume is not None))
    if not world.is_main:  # rank 0 evaluates and writes the report
        return EvalReport(results=[], train=train_summary, run_dir=str(run_dir))

    results = evaluate_with_baselines(learner, config, pools, progress)
    report = EvalReport(results=results, train=train_summary)
    report.write(run_dir)
    return report


def meta_train(
    config: RunConfig,
    run_dir: str | Path,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> tuple[MetaLearner, TrainResult]:
    """Meta-train only, validating on the meta-val classes; the meta-test classes are
    never touched (the tuner's objective). A learner that does not meta-train, or
    `train.steps=0`, is validated once as it is."""
    from metalm.evaluate import validation_accuracy

    world = distributed.setup(config.model.device)
    torch.manual_seed(config.seed)
    learner = build_learner(build_model(config.model), config.learner)
    pools = build_pools(config.data)
    if pools.val is None:
        raise MetalmError("tuning needs meta-val classes: set data.classes.fractions or .val")
    run_dir = Path(run_dir)
    trainer = _trainer(learner, config, pools, run_dir, progress, on_validation)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    if trainer is not None:
        return learner, trainer.fit()
    _, val_sampler = _samplers(config, pools)
    accuracy = validation_accuracy(learner, val_sampler, config.train.val_episodes)
    for callback in on_validation:
        callback(0, accuracy)
    history = [{"step": 0, "val_accuracy": accuracy}]
    return learner, TrainResult(0, 0, accuracy, history)


def resume_run(run_dir: str | Path, progress: bool = True) -> EvalReport:
    """Continue a run from its last checkpoint with the config it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise MetalmError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    if (
        not (run_dir / CHECKPOINT_DIR).exists()
        and not (run_dir / (CHECKPOINT_DIR + ".old")).exists()
    ):
        raise MetalmError(f"{run_dir}: no checkpoint to resume from")
    return run(load_config(run_dir / CONFIG_FILE), resume=run_dir, progress=progress)


def load_trained_learner(
    run_dir: str | Path, overrides: Sequence[str] | None = None
) -> tuple[RunConfig, MetaLearner]:
    """The learner of a finished run, with its best weights.

    `overrides` (`key.sub=value`) change the saved config first, so that the learner is
    built from the changed config (e.g. `learner.head=logreg`, `model.device=cpu`) and
    then gets the run's weights; a change that alters the weights' shapes
    (`model.num_layers`, ...) is refused."""
    from metalm.checkpoint import load_weights
    from metalm.config import apply_overrides, from_dict, to_dict

    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    if overrides:
        config = from_dict(RunConfig, apply_overrides(to_dict(config), list(overrides)))
    learner = build_learner(build_model(config.model), config.learner)
    for weights in (run_dir / BEST_WEIGHTS, run_dir / CHECKPOINT_DIR / "learner.safetensors"):
        if weights.exists():
            try:
                load_weights(learner, weights)
            except RuntimeError as err:  # shapes that differ from the saved ones
                first = (str(err).splitlines() or [type(err).__name__])[0]
                raise MetalmError(
                    f"{weights}: the run's weights do not fit the learner built with these "
                    f"overrides ({first}); leave the encoder's shape as the run had it"
                ) from None
            break
    return config, learner


def _eval_dir(run_dir: Path, name: str | None) -> Path:
    """`RUN/evals/<name>`: a new folder for one re-evaluation (default name: a
    timestamp, made unique); an explicit name already used is refused."""
    if name is not None:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise MetalmError(f"--name must be a plain folder name, got {name!r}")
        out = run_dir / EVALS_DIR / name
        if out.exists():
            raise MetalmError(f"{out} already exists; pick another --name")
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = run_dir / EVALS_DIR / stamp, 1
    while out.exists():
        n += 1
        out = run_dir / EVALS_DIR / f"{stamp}-{n}"
    return out


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    name: str | None = None,
) -> EvalReport:
    """Evaluate a finished run's best learner (and the baselines) again, e.g. with
    more episodes (`eval.episodes=1000`) or another task head (`learner.head=logreg`):
    `overrides` apply to the whole saved config, learner and model included, before the
    learner is built. The report, and the config it used, go to a new folder
    `RUN/evals/<name>` (default name: a timestamp); the run's own report is left as it
    is.

    Example:
        >>> report = evaluate_run("runs/protonet-demo", ["learner.head=logreg"])
        >>> report.run_dir
        'runs/protonet-demo/evals/20261123-120000'
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise MetalmError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    out = _eval_dir(run_dir, name)
    config, learner = load_trained_learner(run_dir, overrides)
    pools = build_pools(config.data, config.eval.full_way_shots)
    _test_samplers(config, pools)  # validates N, K, Q against the test classes up front
    report = EvalReport(results=evaluate_with_baselines(learner, config, pools, progress))
    out.mkdir(parents=True)
    save_config(config, out / CONFIG_FILE)
    report.write(out)
    return report
