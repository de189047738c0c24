"""The argparse parser of `metalm`: one small function per subcommand, in help order."""

from __future__ import annotations

import argparse

from metalm.cli.train_commands import (
    cmd_compare,
    cmd_datasets,
    cmd_demo,
    cmd_eval,
    cmd_overlap,
    cmd_sample,
    cmd_train,
    cmd_tune,
)
from metalm.cli.use_commands import cmd_adapt, cmd_export, cmd_predict, cmd_score, cmd_serve
from metalm.serve.limits import ServeLimits
from metalm.tune.options import PRUNERS, SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    """`metalm`'s parser: each subcommand sets `func`, its `cmd_*` function."""
    parser = argparse.ArgumentParser(
        prog="metalm", description="Meta-learning with language models."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_datasets,
        _add_sample,
        _add_overlap,
        _add_train,
        _add_eval,
        _add_tune,
        _add_compare,
        _add_demo,
        _add_export,
        _add_adapt,
        _add_predict,
        _add_score,
        _add_serve,
    ):
        add(sub)
    return parser


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def _add_nproc(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, metavar="N", help=f"{what} (as torchrun would)")
    parser.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        help="torch.distributed backend (default auto: nccl on CUDA, gloo on CPU)",
    )


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=("none", "int8", "int8-static"),  # metalm.models.encoder.QUANTIZE_CHOICES
        default="none",
        help="int8: a faster CPU encoder at a small accuracy cost (see BENCHMARKS.md); "
        "int8-static (--backend onnx): activation ranges calibrated on the first support "
        "set, slower and less accurate here than int8 (measured in BENCHMARKS.md)",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),  # metalm.models.base.Backend (no torch import here)
        default="torch",
        help="onnx: the encoder on ONNX Runtime (exported once into the model's onnx/ "
        "folder; needs metalm[onnx])",
    )


def _add_datasets(sub) -> None:
    sub.add_parser("datasets", help="list the built-in datasets").set_defaults(func=cmd_datasets)


def _add_sample(sub) -> None:
    sample = _with_config(sub.add_parser("sample", help="print one episode to check the data"))
    sample.add_argument("--pool", choices=["train", "val", "test"], default="train")
    sample.add_argument("--index", type=int, default=0)
    sample.add_argument("--n-way", type=int)
    sample.add_argument("--k-shot", type=int)
    sample.add_argument("--q-queries", type=int)
    sample.set_defaults(func=cmd_sample)


def _add_overlap(sub) -> None:
    overlap = _with_config(
        sub.add_parser("overlap", help="test classes whose (near-)name is a meta-train class")
    )
    overlap.set_defaults(func=cmd_overlap)


def _add_train(sub) -> None:
    train = _with_config(sub.add_parser("train", help="meta-train, then evaluate"))
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    _add_nproc(train, "meta-train data-parallel in N processes on this machine")
    train.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    ev = _with_config(sub.add_parser("eval", help="evaluate without training, or a finished run"))
    ev.add_argument("--run", metavar="RUN_DIR", help="re-evaluate this run's best learner")
    ev.add_argument(
        "--name", help="with --run: the report's folder RUN_DIR/evals/NAME (default: a timestamp)"
    )
    ev.set_defaults(func=cmd_eval)


def _add_tune(sub) -> None:
    tune = _with_config(
        sub.add_parser(
            "tune",
            help="search meta-parameters (Optuna)",
            description="Search meta-parameters: the config's search: section is the space, "
            "its tune: section the study's settings (trials, sampler, pruner, storage, ...; "
            "metalm.tune.TuneSection), and tune.KEY=VALUE overrides them like any other key. "
            "The flags below are aliases of tune: keys, kept for a release: a flag given "
            "wins over the config.",
        )
    )
    aliases = tune.add_argument_group("aliases of the tune: keys (a flag wins over the config)")
    aliases.add_argument("--trials", type=int, help="tune.trials: finished trials to reach")
    aliases.add_argument(
        "--storage", help="tune.storage: RDB URL (postgresql://...) or a .journal file"
    )
    aliases.add_argument(
        "--study-dir", help="tune.study_dir: outputs and trial runs (default output_dir/NAME)"
    )
    aliases.add_argument("--study-name", help="tune.study_name (default: the config file's name)")
    aliases.add_argument("--sampler", choices=SAMPLERS, help="tune.sampler (default tpe)")
    aliases.add_argument("--pruner", choices=PRUNERS, help="tune.pruner (default median)")
    aliases.add_argument("--seed", type=int, help="tune.seed: sampler seed (default: random)")
    aliases.add_argument(
        "--startup-trials",
        type=int,
        help="tune.startup_trials: random trials before tpe/gp/cmaes model the results "
        "(default 10)",
    )
    aliases.add_argument(
        "--warm-start-from",
        nargs="+",
        metavar="STUDY",
        help="tune.warm_start_from: earlier study directories (or journal files, URL#name) "
        "to seed from",
    )
    aliases.add_argument(
        "--warm-start-top", type=int, help="tune.warm_start_top: best configs per study (1)"
    )
    aliases.add_argument(
        "--arch",
        action="store_true",
        default=None,
        help="tune.arch=true: architecture search over the encoder's size",
    )
    aliases.add_argument(
        "--objectives",
        help="tune.objectives: accuracy[,latency][,params] (default accuracy; "
        "arch: accuracy,latency)",
    )
    aliases.add_argument(
        "--no-final",
        dest="final",
        action="store_false",
        default=None,
        help="tune.final=false: skip the best config's test run",
    )
    aliases.add_argument(
        "--bars",
        dest="progress",
        action="store_true",
        default=None,
        help="tune.progress=true: progress bars inside each trial",
    )
    aliases.add_argument(
        "--heartbeat", type=int, help="tune.heartbeat: RDB heartbeat seconds (default 60)"
    )
    _add_nproc(tune, "run each trial data-parallel in N processes on this machine")
    tune.set_defaults(func=cmd_tune)


def _add_compare(sub) -> None:
    compare = _with_config(
        sub.add_parser(
            "compare", help="meta-train several learners on the same tasks; one leaderboard"
        )
    )
    compare.add_argument(
        "--learners", nargs="+", metavar="NAME", help="instead of the config's compare.learners"
    )
    compare.add_argument(
        "--out",
        help="the comparison's folder (default output_dir/compare-<config name>); "
        "run again to resume",
    )
    compare.add_argument(
        "--trained-in",
        metavar="DIR",
        help="test the learners another comparison trained (same training settings) "
        "instead of training them again: choose on valid, then score test",
    )
    compare.set_defaults(func=cmd_compare)


def _add_demo(sub) -> None:
    demo = _with_config(sub.add_parser("demo", help="the main job on the embedded defaults"))
    demo.set_defaults(func=cmd_demo)


def _add_export(sub) -> None:
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
    export.add_argument(
        "--model", metavar="MODEL_DIR", help="a metalm model directory, to write in --format"
    )
    export.add_argument(
        "--format",
        choices=("metalm", "onnx", "sentence-transformers"),  # metalm.exports.FORMATS
        default="metalm",
        help="onnx: a metalm model directory with its encoder exported for ONNX Runtime "
        "(onnx/, fp32 and int8); sentence-transformers: the encoder as a folder "
        "SentenceTransformer(dir) loads",
    )
    export.add_argument(
        "--calibration",
        metavar="FILE",
        help="with --format onnx: texts (e.g. a support set; .csv/.jsonl column --text-column, "
        "or one per line) to calibrate a static int8 encoder on (--quantize int8-static)",
    )
    export.add_argument("--text-column", default="text", help="the texts' column in --calibration")
    export.add_argument("--out", required=True, help="the directory to write")
    export.set_defaults(func=cmd_export)


def _add_adapt(sub) -> None:
    adapt = sub.add_parser("adapt", help="adapt a model to a task from labeled examples")
    adapt.add_argument("--model", required=True, help="model directory or Hugging Face id")
    adapt.add_argument("--support", required=True, help="labeled examples (.csv or .jsonl)")
    adapt.add_argument("--out", required=True, help="the task directory to write")
    adapt.add_argument(
        "--unlabeled",
        metavar="FILE",
        help="texts of the task without labels (.csv/.jsonl/.txt): self-training on them",
    )
    adapt.add_argument("--text-column", default="text")
    adapt.add_argument("--label-column", default="label")
    adapt.add_argument("--device", default="auto")
    _add_inference_options(adapt)
    adapt.set_defaults(func=cmd_adapt)


def _add_predict(sub) -> None:
    predict = sub.add_parser("predict", help="classify texts with an adapted task")
    predict.add_argument("--task", required=True, help="a task directory from `metalm adapt`")
    predict.add_argument("--input", default="-", help=".csv, .jsonl, text lines, or - (stdin)")
    predict.add_argument("--output", default="-", help="JSON lines file, or - (stdout)")
    predict.add_argument("--model", help="model directory (default: the one the task names)")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="auto")
    _add_inference_options(predict)
    predict.set_defaults(func=cmd_predict)


def _add_score(sub) -> None:
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
    _add_inference_options(score)
    score.set_defaults(func=cmd_score)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="an HTTP service: adapt tasks and classify texts")
    serve.add_argument("--model", required=True, help="model directory or Hugging Face id")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--tasks-dir", help="keep tasks here across restarts (default: memory)")
    _add_serve_limits(serve)
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
    _add_inference_options(serve)
    serve.set_defaults(func=cmd_serve)


def _add_serve_limits(serve: argparse.ArgumentParser) -> None:
    """`serve`'s limits on tasks, requests and texts; their defaults are `ServeLimits`'."""
    limits = ServeLimits()
    serve.add_argument(
        "--max-tasks",
        type=int,
        default=limits.max_tasks,
        help=f"tasks stored (default {limits.max_tasks})",
    )
    serve.add_argument(
        "--max-task-examples",
        type=int,
        default=limits.max_task_examples,
        help=f"labeled examples per new task (default {limits.max_task_examples})",
    )
    serve.add_argument(
        "--max-batch-texts",
        type=int,
        default=limits.max_batch_texts,
        help=f"texts per classify request (default {limits.max_batch_texts})",
    )
    serve.add_argument(
        "--max-text-chars",
        type=int,
        default=limits.max_text_chars,
        help=f"characters per text (default {limits.max_text_chars})",
    )
    serve.add_argument(
        "--max-labels",
        type=int,
        default=limits.max_labels,
        help=f"classes per task (default {limits.max_labels})",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.max_body_bytes,
        help=f"request body (default {limits.max_body_bytes})",
    )
    serve.add_argument(
        "--max-store-bytes",
        type=int,
        default=limits.max_store_bytes,
        help=f"task states of all stored tasks together (default {limits.max_store_bytes}); "
        "over it, 409",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=limits.request_timeout,
        help=f"seconds a request may take, queueing included (default "
        f"{limits.request_timeout:g}); over it, 503",
    )
