"""The commands that use a meta-learned model: export, adapt, predict, score, serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from metalm.errors import MetalmError


def cmd_export(args: argparse.Namespace) -> None:
    import tempfile

    if args.calibration and args.format != "onnx":
        raise MetalmError("--calibration is for --format onnx (static int8)")
    if args.format == "metalm":
        if args.model is not None:
            raise MetalmError("--model converts a model directory: give --format too")
        _export_metalm(args, args.out)
        return
    from metalm.exports import add_onnx, to_sentence_transformers

    if args.format == "onnx":
        if args.model is not None:
            raise MetalmError(
                "--format onnx writes a new model directory: use --run or --learner "
                "(or load MODEL_DIR once with --backend onnx, which exports into it)"
            )
        from metalm.textfiles import read_texts

        calibration = read_texts(args.calibration, args.text_column) if args.calibration else []
        folder = add_onnx(_export_metalm(args, args.out), calibration)
        variants = "float32, int8 and int8-static" if calibration else "float32 and int8"
        print(
            f"exported {args.out} with its encoder for ONNX Runtime in {folder} ({variants}); "
            f"use it with --backend onnx, e.g. metalm adapt --model {args.out} "
            "--backend onnx --support support.csv --out TASK_DIR"
        )
        return

    if args.model is not None:
        if args.run is not None or args.learner is not None or args.items:
            raise MetalmError("--model exports that model as it is: drop --run/--learner/overrides")
        out = to_sentence_transformers(args.model, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the metalm model first, then its encoder
            out = to_sentence_transformers(_export_metalm(args, Path(tmp) / "model"), args.out)
    print(
        f"exported the encoder to {out} as a sentence-transformers folder; load it with "
        f'SentenceTransformer("{out}")'
    )


def _export_metalm(args: argparse.Namespace, out: str | Path) -> Path:
    from metalm.pretrained import export_untrained
    from metalm.runs.existing import export_run

    quiet = args.format != "metalm"  # only the last step of the export speaks
    run_dir, items = args.run, list(args.items)
    plain = [item for item in items if "=" not in item]
    if plain and run_dir is None and args.learner is None:
        raise MetalmError(
            f"export takes key=value overrides, not {plain[0]!r}; a trained run is "
            f"exported with --run {plain[0]}"
        )
    if run_dir is not None:
        if args.learner is not None or items:
            raise MetalmError(
                "export --run RUN_DIR takes the run's learner and weights as they are; "
                "drop --learner and key=value overrides (or drop --run to export untrained)"
            )
        out = export_run(run_dir, out)
        if not quiet:
            files = "metalm.json, learner.safetensors, encoder/, README.md"
            print(f"exported {run_dir} to {out}: {files}")
        return out
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
    out = export_untrained(out, args.learner or "frozen", items)
    if not quiet:
        print(
            f"exported an untrained {args.learner or 'frozen'} model to {out}; next: "
            f"metalm adapt --model {out} --support support.csv --out TASK_DIR"
        )
    return out


def cmd_adapt(args: argparse.Namespace) -> None:
    from metalm.classifier import FewShotClassifier
    from metalm.textfiles import read_labeled, read_texts

    texts, labels = read_labeled(args.support, args.text_column, args.label_column)
    unlabeled = read_texts(args.unlabeled, args.text_column) if args.unlabeled else None
    clf = FewShotClassifier.from_pretrained(
        args.model, device=args.device, quantize=args.quantize, backend=args.backend
    )
    clf.adapt(texts, labels, unlabeled=unlabeled).save_task(args.out)
    extra = f" and {len(unlabeled)} unlabeled texts" if unlabeled else ""
    print(
        f"adapted to {len(clf.classes_)} classes from {len(texts)} examples{extra}: "
        f"task in {args.out}"
    )


def cmd_predict(args: argparse.Namespace) -> None:
    from metalm.classifier import FewShotClassifier
    from metalm.textfiles import read_texts, write_predictions

    clf = FewShotClassifier.load_task(
        args.task,
        model=args.model,
        device=args.device,
        quantize=args.quantize,
        backend=args.backend,
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
        args.task,
        model=args.model,
        device=args.device,
        quantize=args.quantize,
        backend=args.backend,
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

    limits = ServeLimits(
        max_tasks=args.max_tasks,
        max_task_examples=args.max_task_examples,
        max_batch_texts=args.max_batch_texts,
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
        backend=args.backend,
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout,
    )
