"""The commands that meta-train and evaluate: datasets, sample, overlap, train, eval,
demo, tune, compare.

`--nproc N` on train and tune starts the same command again in N processes (`_relaunch`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from metalm.errors import MetalmError


def _config(args: argparse.Namespace):
    from metalm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_datasets(args: argparse.Namespace) -> None:
    from metalm.data import BUILTIN_DATASETS, builtin_dataset
    from metalm.data.dataset import BUILTIN_SPLITS

    licenses = {
        "banking77": "CC BY 4.0 (Casanueva et al. 2020)",
        "clinc150": "CC BY 3.0 (Larson et al. 2019)",
    }
    print("| dataset | classes | " + " | ".join(BUILTIN_SPLITS) + " | license |")
    print("|---" * (len(BUILTIN_SPLITS) + 3) + "|")
    for name in sorted(BUILTIN_DATASETS):
        sizes = [len(builtin_dataset(name, split)) for split in BUILTIN_SPLITS]
        classes = len(builtin_dataset(name, "train").classes)
        print(f"| {name} | {classes} | " + " | ".join(map(str, sizes)) + f" | {licenses[name]} |")
    print("\nAttribution: see src/metalm/data/builtin/NOTICE.md (shipped with the package).")


def cmd_sample(args: argparse.Namespace) -> None:
    from metalm.config import EpisodeConfig
    from metalm.tasks import build_pools

    config = _config(args)
    pools = build_pools(config.data)
    shape = EpisodeConfig(
        args.n_way or config.episode.n_way,
        args.k_shot or config.episode.k_shot,
        args.q_queries or config.episode.q_queries,
    )
    sampler = pools.sampler(args.pool, shape, config.seed, config.data.drop_small_classes)
    episode = sampler.sample(args.index)
    print(
        f"{args.pool} episode {args.index}: {shape.n_way}-way {shape.k_shot}-shot, "
        f"{shape.q_queries} queries per class, from {sampler.dataset.name}"
    )
    for label, name in enumerate(episode.label_names):
        print(f"\n[{label}] {name}")
        for text, y in zip(episode.support_texts, episode.support_labels, strict=True):
            if y == label:
                print(f"  support: {text}")
        for text, y in zip(episode.query_texts, episode.query_labels, strict=True):
            if y == label:
                print(f"  query:   {text}")


def cmd_overlap(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from metalm.data.overlap import overlap_markdown, overlapping_train_classes
    from metalm.tasks import build_pools, pools_overlap

    config = _config(args)
    classes = config.data.classes
    pools = build_pools(replace(config.data, classes=replace(classes, strict=False)))
    found = pools_overlap(pools, classes.name_similarity)
    tests = len(pools.test.classes) if pools.test is not None else 0
    print(
        f"{len({o.test_class for o in found})} of the {tests} test classes share a name or "
        "near-name with meta-train/meta-val classes"
    )
    if found:
        print()
        print(overlap_markdown(found))
        removed = overlapping_train_classes(found)
        print(
            f"\na strict split (data.classes.strict=true) leaves out {len(removed)} "
            f"meta-train/meta-val classes: {', '.join(removed)}"
        )


def cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from metalm.compare import compare, load_compare_config

    # `--learners a b key=value`: argparse hands the trailing overrides to --learners
    learners = [x for x in args.learners or [] if "=" not in x] or None
    overrides = [*args.overrides, *(x for x in args.learners or [] if "=" in x)]
    config, entries = load_compare_config(args.config, overrides, learners)
    name = Path(args.config).stem if args.config else "compare"
    out = Path(args.out) if args.out else Path(config.output_dir) / f"compare-{name}"
    report = compare(config, entries, out, progress=not args.quiet, trained_in=args.trained_in)
    print()
    print(report.to_markdown())
    print(f"\nresults: {out}/compare.md, compare.json, compare.png")


def _print_report(report) -> None:
    print()
    print(report.to_markdown())
    print(f"\nresults: {report.run_dir}/report.md, report.json, accuracy.png")


def _launch_train(args: argparse.Namespace) -> None:
    """`metalm train --nproc N`: check the config here, then start N processes running
    the same command through torch's elastic launcher (as `torchrun` would)."""
    from metalm import distributed
    from metalm.config import load_config
    from metalm.learners import learner_class
    from metalm.runs.directory import CONFIG_FILE, require_run_dir

    if distributed.launched():
        raise MetalmError("--nproc starts the processes itself: drop it under torchrun")
    config = (
        load_config(require_run_dir(args.resume) / CONFIG_FILE) if args.resume else _config(args)
    )
    distributed.check_meta_batch(config.train.meta_batch_size, args.nproc)
    distributed.pick_backend(config.model.device, args.backend or "auto")
    if not (learner_class(config.learner.name).meta_trainable and config.train.steps > 0):
        raise MetalmError(
            f"learner {config.learner.name!r} with train.steps={config.train.steps} does not "
            "meta-train: there is nothing to split across processes; drop --nproc"
        )
    _relaunch(args)


def _relaunch(args: argparse.Namespace) -> None:
    """This command again (less `--nproc`) in `args.nproc` processes, through torch's
    elastic launcher (as `torchrun --standalone` would start them)."""
    from metalm import distributed

    if args.backend:
        os.environ[distributed.BACKEND_ENV] = args.backend
    argv, skip = [], False
    for arg in args.argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            argv.append(arg)
    distributed.launch(argv, args.nproc)


def cmd_train(args: argparse.Namespace) -> None:
    from metalm import distributed
    from metalm.runs.existing import resume_run
    from metalm.runs.recipe import run

    if args.resume and (args.config or args.overrides):
        raise MetalmError("--resume continues a run with its saved config; drop -c/overrides")
    if args.nproc is not None and args.nproc < 1:
        raise MetalmError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1:
        _launch_train(args)
        return
    if args.backend:
        os.environ.setdefault(distributed.BACKEND_ENV, args.backend)
    if args.resume:
        report = resume_run(args.resume, progress=not args.quiet)
    else:
        report = run(_config(args), progress=not args.quiet)
    if distributed.world().is_main:
        _print_report(report)


def cmd_eval(args: argparse.Namespace) -> None:
    from metalm.runs.existing import evaluate_run
    from metalm.runs.recipe import run

    if args.run:
        report = evaluate_run(args.run, args.overrides, progress=not args.quiet, name=args.name)
    else:
        if args.name is not None:
            raise MetalmError("--name names a re-evaluation of --run RUN_DIR; use run_name=...")
        config = _config(args)
        config.train.steps = 0
        report = run(config, progress=not args.quiet)
    _print_report(report)


def cmd_demo(args: argparse.Namespace) -> None:
    from metalm.config import DEMO_CONFIG, load_config
    from metalm.runs.recipe import run_on_both_splits

    print(
        "metalm demo: meta-train protonet on CLINC150's labeled intents and BANKING77's "
        "texts without labels,\nthen learn BANKING77's unseen intents from a few examples, "
        "beside the untrained encoder;\nonce on all CLINC150 intents, once on the strict "
        "split (without those whose name or near-name is a BANKING77 intent)\n"
    )
    config = load_config(args.config or DEMO_CONFIG, args.overrides)
    _print_report(run_on_both_splits(config, progress=not args.quiet))


def _tune_processes(args: argparse.Namespace, base):
    """The `World` of a tune run: under torchrun, rank 0 runs the study and the other
    ranks each trial with it (see `metalm.distributed.follow`)."""
    from metalm import distributed

    if args.nproc is not None and args.nproc < 1:
        raise MetalmError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1:
        if distributed.launched():
            raise MetalmError("--nproc starts the processes itself: drop it under torchrun")
        distributed.check_meta_batch(base.train.meta_batch_size, args.nproc)
        distributed.pick_backend(base.model.device, args.backend or "auto")
    if args.backend:
        os.environ.setdefault(distributed.BACKEND_ENV, args.backend)
    return distributed.setup(base.model.device, timeout=base.train.dist_timeout)


def _tune_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The `tune:` settings given as flags (each flag's dest is its key; a flag not given
    is None): they win over the config's `tune:` section and `tune.key=value`."""
    from dataclasses import fields

    from metalm.tune.options import TuneSection

    given = {f.name: getattr(args, f.name, None) for f in fields(TuneSection)}
    return {key: value for key, value in given.items() if value is not None}


def cmd_tune(args: argparse.Namespace) -> None:
    from pathlib import Path

    from metalm import distributed
    from metalm.runs.recipe import run
    from metalm.runs.trial import meta_train
    from metalm.tune import load_tune, tune
    from metalm.tune.arch import arch_space

    base, space, settings = load_tune(args.config, args.overrides, _tune_flags(args))
    if settings.trials is None:
        raise MetalmError(
            "how many trials? set trials in the config's tune: section, tune.trials=N, "
            "or --trials N"
        )
    if settings.arch:
        if space is not None:
            raise MetalmError(
                "tune.arch (--arch) builds its own search space; drop the search: section"
            )
        space = arch_space(base)
    if space is None:
        raise MetalmError(
            "no search space: add a search: section to the config (see configs/tune_protonet.yaml)"
            " or set tune.arch=true (--arch)"
        )
    world = _tune_processes(args, base)
    if args.nproc is not None and args.nproc > 1:
        _relaunch(args)
        return
    if not world.is_main:  # each trial (and the final run) that rank 0 announces
        distributed.follow(
            {
                "trial": lambda job: meta_train(job[0], job[1], progress=False),
                "run": lambda config: run(config, progress=False),
            }
        )
        return
    settings.progress = settings.progress and not args.quiet
    study_dir = Path(settings.study_dir or Path(base.output_dir) / settings.study_name)
    try:
        result = tune(base, space, settings.trials, study_dir, settings)
    except BaseException as err:
        distributed.announce_failure(err)  # the other ranks stop with its message
        raise
    distributed.announce("done")
    if result.pareto:
        print(f"\nPareto front ({','.join(settings.objectives)}):")
        for row in result.pareto:
            values = ", ".join(f"{v:.4g}" for v in row["values"])
            print(f"  trial {row['trial']}: {values}  {row['params']}")
    if result.test_report is not None:
        _print_report(result.test_report)
    print(f"\nstudy outputs in {study_dir}: {', '.join(result.outputs)}")
