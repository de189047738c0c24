"""The test protocols of a run: a learner and each baseline on the same fixed tasks
(N-way K-shot episodes of `eval.settings`, full-way splits of `eval.full_way_shots`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from metalm.config import RunConfig, SettingConfig
from metalm.data.episodes import Episode, EpisodeSampler, SettingNames
from metalm.errors import MetalmError
from metalm.learners import (
    LearnerConfig,
    MetaLearner,
    build_learner,
    learner_class,
    method_label,
)
from metalm.models.base import EncoderConfig, build_model
from metalm.runs.accuracy import MethodResult, evaluate_episodes
from metalm.tasks import TaskPools

TestSamplers = list[tuple[SettingConfig, EpisodeSampler]]  # one per eval.settings entry


def fixed_test_samplers(config: RunConfig, pools: TaskPools) -> TestSamplers:
    """One fixed episode sampler per `eval.settings` entry; building them checks N, K and
    Q against the test classes (data-dependent, so not a config check)."""
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
    samplers: TestSamplers | None = None,
) -> list[MethodResult]:
    """Every test protocol of `config` for one learner, on the same fixed tasks.

    `method` is the learner's label in the report (see `method_label`); its episode
    count is `eval.episodes_by_method[method]`, else that of its learner name (the label
    before any `/head`), else `eval.episodes`. `samplers`: `fixed_test_samplers` of
    `config` and `pools`, if already built."""
    by_method = config.eval.episodes_by_method
    episodes = by_method.get(method, by_method.get(method.split("/")[0], config.eval.episodes))
    results = []
    if samplers is None:
        samplers = fixed_test_samplers(config, pools)
    for setting, sampler in samplers:
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


def baselines(config: RunConfig) -> list[LearnerConfig]:
    """The baselines to evaluate beside the learner: all but those with the learner's own
    report label (so `frozen/logreg` stays beside the learner `frozen`)."""
    own = method_label(config.learner)
    return [b for b in config.eval.baselines if method_label(b) != own]


def evaluate_with_baselines(
    learner: MetaLearner,
    config: RunConfig,
    pools: TaskPools,
    progress: bool = True,
    samplers: TestSamplers | None = None,
) -> list[MethodResult]:
    """The learner, then each baseline on a fresh pretrained encoder, on the same tasks;
    each is reported under its `method_label` (`frozen`, `frozen/logreg`, ...). With
    `model.backend=onnx`, sentence encoders run on ONNX Runtime here (exported from
    their current weights into a temporary folder). The test samplers are built once
    (or given as `samplers`) and shared by all."""
    if samplers is None:
        samplers = fixed_test_samplers(config, pools)
    with tempfile.TemporaryDirectory(prefix="metalm-onnx-") as tmp:
        _inference_backend(learner.encoder, config, Path(tmp) / "learner")
        label = method_label(config.learner)
        results = evaluate_learner(learner, label, config, pools, progress, samplers)
        fresh: dict[str, object] = {}
        for baseline in baselines(config):
            kind = learner_class(baseline.name).model_kind
            if kind not in fresh:
                fresh[kind] = build_model(baseline_model(config, kind))
                _inference_backend(fresh[kind], config, Path(tmp) / f"baseline-{kind}")
            results += evaluate_learner(
                build_learner(fresh[kind], baseline),
                method_label(baseline),
                config,
                pools,
                progress,
                samplers,
            )
    return results


def _inference_backend(model: object, config: RunConfig, folder: Path) -> None:
    """Put a sentence encoder on ONNX Runtime when `model.backend=onnx`."""
    from metalm.models.encoder import TextEncoder
    from metalm.models.onnx_runtime import weights_stamp

    if config.model.backend == "onnx" and isinstance(model, TextEncoder):
        model.use_onnx(folder, stamp=weights_stamp(model.model))


def baseline_model(config: RunConfig, kind: str) -> EncoderConfig:
    """The model a baseline runs on: the run's own (pretrained, fresh) when of the kind the
    baseline needs, else the shipped model of that kind on the run's device (so that an
    in-context run is compared with `frozen` on MiniLM, and the other way round)."""
    if config.model.kind == kind:
        return config.model
    return EncoderConfig(kind=kind, device=config.model.device)
