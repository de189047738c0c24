"""`metalm <command>`: a thin shell over the Python API (`metalm.run` and friends)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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
    from metalm.rundir import CONFIG_FILE, require_run_dir

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
    from metalm.run import run
    from metalm.runs import resume_run

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
    from metalm.run import run
    from metalm.runs import evaluate_run

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
    from metalm.run import run

    print(
        "metalm demo: meta-train protonet on CLINC150's labeled intents and BANKING77's "
        "texts without labels,\nthen learn BANKING77's unseen intents from a few examples, "
        "beside the untrained encoder\n"
    )
    report = run(load_config(args.config or DEMO_CONFIG, args.overrides), progress=not args.quiet)
    _print_report(report)


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
    return distributed.setup(base.model.device)


def cmd_tune(args: argparse.Namespace) -> None:
    from pathlib import Path

    from metalm import distributed
    from metalm.run import run
    from metalm.trial import meta_train
    from metalm.tune import load_tune_config, tune
    from metalm.tune.arch import arch_space

    base, space = load_tune_config(args.config, args.overrides)
    if args.arch:
        if space is not None:
            raise MetalmError("--arch builds its own search space; drop the search: section")
        space = arch_space(base)
    if space is None:
        raise MetalmError(
            "no search space: add a search: section to the config (see configs/tune_protonet.yaml)"
            " or pass --arch"
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
    name = args.study_name or (Path(args.config).stem if args.config else "metalm")
    study_dir = Path(args.study_dir) if args.study_dir else Path(base.output_dir) / name
    objectives = args.objectives or ("accuracy,latency" if args.arch else "accuracy")
    try:
        result = tune(base, space, args.trials, study_dir, _tune_options(args, name, objectives))
    finally:
        distributed.announce("done")
    if result.pareto:
        print(f"\nPareto front ({objectives}):")
        for row in result.pareto:
            values = ", ".join(f"{v:.4g}" for v in row["values"])
            print(f"  trial {row['trial']}: {values}  {row['params']}")
    if result.test_report is not None:
        _print_report(result.test_report)
    print(f"\nstudy outputs in {study_dir}: {', '.join(result.outputs)}")


def _tune_options(args: argparse.Namespace, name: str, objectives: str):
    from metalm.tune import TuneOptions

    return TuneOptions(
        study_name=name,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seed,
        startup_trials=args.startup_trials,
        objectives=objectives,
        warm_start_from=args.warm_start_from or (),
        warm_start_top=args.warm_start_top,
        final=not args.no_final,
        progress=args.bars and not args.quiet,
        heartbeat=args.heartbeat,
    )


def cmd_export(args: argparse.Namespace) -> None:
    from metalm.pretrained import export_untrained
    from metalm.runs import export_run

    run_dir, items = args.run, list(args.items)
    if run_dir is None and args.learner is None and len(items) == 1 and "=" not in items[0]:
        run_dir, items = items[0], []  # the older form: metalm export RUN_DIR --out DIR
    if run_dir is not None:
        if args.learner is not None or items:
            raise MetalmError(
                "export --run RUN_DIR takes the run's learner and weights as they are; "
                "drop --learner and key=value overrides (or drop --run to export untrained)"
            )
        out = export_run(run_dir, args.out)
        print(f"exported {run_dir} to {out}: metalm.json, learner.safetensors, encoder/, README.md")
        return
    if args.learner is None and not items:
        raise MetalmError(
            "say what to export: --run RUN_DIR (a trained run) or --learner NAME "
            "(frozen, protonet, ...: the shipped encoder or model.name_or_path=..., untrained)"
        )
    bad = [item for item in items if "=" not in item]
    if bad:
        raise MetalmError(
            f"{bad[0]!r}: overrides look like key.sub=value (model.*, learner.*); "
            "a run directory goes after --run"
        )
    out = export_untrained(args.out, args.learner or "frozen", items)
    print(
        f"exported an untrained {args.learner or 'frozen'} model to {out}; next: "
        f"metalm adapt --model {out} --support support.csv --out TASK_DIR"
    )


def cmd_adapt(args: argparse.Namespace) -> None:
    from metalm.classifier import FewShotClassifier
    from metalm.textfiles import read_labeled

    texts, labels = read_labeled(args.support, args.text_column, args.label_column)
    clf = FewShotClassifier.from_pretrained(args.model, device=args.device, quantize=args.quantize)
    clf.adapt(texts, labels).save_task(args.out)
    print(f"adapted to {len(clf.classes_)} classes from {len(texts)} examples: task in {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    from metalm.classifier import FewShotClassifier
    from metalm.textfiles import read_texts, write_predictions

    clf = FewShotClassifier.load_task(
        args.task, model=args.model, device=args.device, quantize=args.quantize
    )
    clf.batch_size = args.batch_size
    count = write_predictions(clf, read_texts(args.input, args.text_column), args.output)
    if args.output != "-":
        print(f"{count} predictions written to {args.output}")


def cmd_score(args: argparse.Namespace) -> None:
    from metalm.classifier import FewShotClassifier
    from metalm.textfiles import read_labeled

    texts, labels = read_labeled(args.input, args.text_column, args.label_column)
    clf = FewShotClassifier.load_task(
        args.task, model=args.model, device=args.device, quantize=args.quantize
    )
    clf.batch_size = args.batch_size
    result = clf.score(texts, labels, top_pairs=args.top)
    result.info.update(task=str(args.task), input=str(args.input))
    paths = result.write(args.out)
    print(result.summary())
    print(f"\nresults: {', '.join(str(p) for p in paths)}")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from metalm.serve import API_KEY_ENV, ServeLimits, serve

    def pick(value: int | None, default: int) -> int:
        # --max-texts, the older single limit, sets both where they are not given
        older = args.max_texts
        return value if value is not None else older if older is not None else default

    limits = ServeLimits(
        max_tasks=args.max_tasks,
        max_task_examples=pick(args.max_task_examples, ServeLimits.max_task_examples),
        max_batch_texts=pick(args.max_batch_texts, ServeLimits.max_batch_texts),
        max_text_chars=args.max_text_chars,
        max_labels=args.max_labels,
        max_body_bytes=args.max_body_bytes,
        max_store_bytes=args.max_store_bytes,
        request_timeout=args.request_timeout,
    )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    serve(
        args.model,
        args.host,
        args.port,
        args.tasks_dir,
        limits,
        device=args.device,
        quantize=args.quantize,
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout,
    )


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),  # metalm.models.encoder.QUANTIZE_CHOICES
        default="none",
        help="int8: a faster CPU encoder at a small accuracy cost (see BENCHMARKS.md)",
    )


def _add_use_commands(sub) -> None:
    """`export`, `adapt`, `predict` and `serve`: use a meta-learned model."""
    export = sub.add_parser(
        "export", help="write a model directory: from a run, or untrained (--learner)"
    )
    export.add_argument(
        "items", nargs="*", metavar="key=value", help="with --learner: model.*/learner.* overrides"
    )
    export.add_argument("--run", metavar="RUN_DIR", help="a finished run: its best weights")
    export.add_argument(
        "--learner", help="frozen, protonet, ...: untrained, over the shipped encoder"
    )
    export.add_argument("--out", required=True, help="the model directory to write")
    export.set_defaults(func=cmd_export)
    adapt = sub.add_parser("adapt", help="adapt a model to a task from labeled examples")
    adapt.add_argument("--model", required=True, help="model directory or Hugging Face id")
    adapt.add_argument("--support", required=True, help="labeled examples (.csv or .jsonl)")
    adapt.add_argument("--out", required=True, help="the task directory to write")
    adapt.add_argument("--text-column", default="text")
    adapt.add_argument("--label-column", default="label")
    adapt.add_argument("--device", default="auto")
    _add_quantize(adapt)
    adapt.set_defaults(func=cmd_adapt)
    predict = sub.add_parser("predict", help="classify texts with an adapted task")
    predict.add_argument("--task", required=True, help="a task directory from `metalm adapt`")
    predict.add_argument("--input", default="-", help=".csv, .jsonl, text lines, or - (stdin)")
    predict.add_argument("--output", default="-", help="JSON lines file, or - (stdout)")
    predict.add_argument("--model", help="model directory (default: the one the task names)")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="auto")
    _add_quantize(predict)
    predict.set_defaults(func=cmd_predict)
    score = sub.add_parser("score", help="score an adapted task on labeled texts")
    score.add_argument("--task", required=True, help="a task directory from `metalm adapt`")
    score.add_argument("--input", required=True, help="labeled texts (.csv or .jsonl)")
    score.add_argument("--out", required=True, help="directory for score.json/.md, confusion.png")
    score.add_argument("--model", help="model directory (default: the one the task names)")
    score.add_argument("--text-column", default="text")
    score.add_argument("--label-column", default="label")
    score.add_argument("--top", type=int, default=10, help="confused pairs to list")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument("--device", default="auto")
    _add_quantize(score)
    score.set_defaults(func=cmd_score)
    serve = sub.add_parser("serve", help="an HTTP service: adapt tasks and classify texts")
    serve.add_argument("--model", required=True, help="model directory or Hugging Face id")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--tasks-dir", help="keep tasks here across restarts (default: memory)")
    serve.add_argument("--max-tasks", type=int, default=100, help="tasks stored (default 100)")
    serve.add_argument(
        "--max-task-examples", type=int, help="labeled examples per new task (default 5000)"
    )
    serve.add_argument(
        "--max-batch-texts", type=int, help="texts per classify request (default 1000)"
    )
    serve.add_argument("--max-texts", type=int, help="sets both limits above unless they are given")
    serve.add_argument(
        "--max-text-chars", type=int, default=2000, help="characters per text (default 2000)"
    )
    serve.add_argument("--max-labels", type=int, default=200, help="classes per task (default 200)")
    serve.add_argument(
        "--max-body-bytes", type=int, default=5_000_000, help="request body (default 5000000)"
    )
    serve.add_argument(
        "--max-store-bytes",
        type=int,
        default=2_000_000_000,
        help="task states of all stored tasks together (default 2000000000); over it, 409",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a request may take, queueing included (default 120); over it, 503",
    )
    serve.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: $METALM_API_KEY; unset: no auth)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to let requests in flight finish (default 30)",
    )
    serve.add_argument("--device", default="auto")
    _add_quantize(serve)
    serve.set_defaults(func=cmd_serve)


def _add_nproc(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, metavar="N", help=f"{what} (as torchrun would)")
    parser.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        help="torch.distributed backend (default auto: nccl on CUDA, gloo on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalm", description="Meta-learning with language models."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        return p

    sub.add_parser("datasets", help="list the built-in datasets").set_defaults(func=cmd_datasets)
    sample = with_config(sub.add_parser("sample", help="print one episode to check the data"))
    sample.add_argument("--pool", choices=["train", "val", "test"], default="train")
    sample.add_argument("--index", type=int, default=0)
    sample.add_argument("--n-way", type=int)
    sample.add_argument("--k-shot", type=int)
    sample.add_argument("--q-queries", type=int)
    sample.set_defaults(func=cmd_sample)
    train = with_config(sub.add_parser("train", help="meta-train, then evaluate"))
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    _add_nproc(train, "meta-train data-parallel in N processes on this machine")
    train.set_defaults(func=cmd_train)
    ev = with_config(sub.add_parser("eval", help="evaluate without training, or a finished run"))
    ev.add_argument("--run", metavar="RUN_DIR", help="re-evaluate this run's best learner")
    ev.add_argument(
        "--name", help="with --run: the report's folder RUN_DIR/evals/NAME (default: a timestamp)"
    )
    ev.set_defaults(func=cmd_eval)
    tune = with_config(sub.add_parser("tune", help="search meta-parameters (Optuna)"))
    tune.add_argument("--trials", type=int, required=True, help="finished trials to reach")
    tune.add_argument("--storage", help="RDB URL (postgresql://...) or a .journal file")
    tune.add_argument("--study-dir", help="outputs and trial runs (default output_dir/NAME)")
    tune.add_argument("--study-name", help="default: the config file's name")
    tune.add_argument("--sampler", choices=["random", "tpe", "gp", "cmaes", "nsga2"], default="tpe")
    tune.add_argument("--pruner", choices=["none", "median", "asha", "hyperband"], default="median")
    tune.add_argument("--seed", type=int, help="sampler seed (default: random)")
    tune.add_argument(
        "--startup-trials",
        type=int,
        help="random trials before tpe/gp/cmaes model the results (default 10)",
    )
    tune.add_argument(
        "--warm-start-from",
        nargs="+",
        metavar="STUDY",
        help="earlier study directories (or journal files, URL#name) to seed from",
    )
    tune.add_argument("--warm-start-top", type=int, default=1, help="best configs per study")
    tune.add_argument(
        "--arch", action="store_true", help="architecture search over the encoder's size"
    )
    tune.add_argument("--objectives", help="accuracy[,latency][,params] (--arch: accuracy,latency)")
    tune.add_argument("--no-final", action="store_true", help="skip the best config's test run")
    tune.add_argument("--bars", action="store_true", help="progress bars inside each trial")
    tune.add_argument("--heartbeat", type=int, default=60, help="RDB heartbeat seconds")
    _add_nproc(tune, "run each trial data-parallel in N processes on this machine")
    tune.set_defaults(func=cmd_tune)
    demo = with_config(sub.add_parser("demo", help="the main job on the embedded defaults"))
    demo.set_defaults(func=cmd_demo)
    _add_use_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc's relaunch
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    succeeded = False
    try:
        args.func(args)
        succeeded = True
    except MetalmError as err:
        print(f"error{_rank_suffix()}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave: missing, a directory, not writable, ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "metalm.distributed" in sys.modules:  # only a training command imports it
            sys.modules["metalm.distributed"].teardown(wait_for_peers=succeeded)
    return 0


def _rank_suffix() -> str:
    """` (rank R)` in a process of a distributed run, else nothing."""
    module = sys.modules.get("metalm.distributed")
    where = module.world() if module is not None else None
    return f" (rank {where.rank})" if where is not None and where.distributed else ""

