"""The encoder on PyTorch and on ONNX Runtime, side by side in one run: texts/s, the
adapt time of a 77-way 5-shot task and full-way 5-shot accuracy (paired with PyTorch
float32, text by text).

Variants: PyTorch float32, PyTorch int8 (`quantize=int8`), ONNX Runtime float32, int8
(dynamic) and int8-static (calibrated on the support set it first adapts: BANKING77
`train_5` for speed and BANKING77's accuracy, CLINC150 `train_5` for CLINC150's; the
one-time calibration is timed apart), each at the machine's threads; ONNX Runtime int8
also at one thread.
The shipped MiniLM as `frozen` with its default `logreg` head (label names as
examples), loaded as users load it (`FewShotClassifier.from_pretrained`). Throughput:
`--texts` BANKING77 test texts embedded in batches of 64 (tokens cached, as a service
sees repeated texts less often than this), the variants taking turns `--repeats`
times, with a 0.5 s pause before each (the OpenMP threads of the variant before spin
for a while after it); adapt: BANKING77 `train_5` (385 texts), turns likewise;
accuracy: support `train_5`, query the whole `test` split of BANKING77 and CLINC150.

    python benchmarks/onnx_backend.py                  # writes benchmarks/results/onnx_backend.json
    python benchmarks/onnx_backend.py --quick          # 256 texts, 1 repeat, no accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metalm import FewShotClassifier
from metalm.data import builtin_dataset
from metalm.pretrained import export_untrained
from metalm.runs.accuracy import mean_ci95

VARIANTS = {  # name: (backend, quantize, threads or None for the machine's)
    "pytorch fp32": ("torch", "none", None),
    "pytorch int8": ("torch", "int8", None),
    "onnx fp32": ("onnx", "none", None),
    "onnx int8": ("onnx", "int8", None),
    "onnx int8, 1 thread": ("onnx", "int8", 1),
    "onnx int8-static": ("onnx", "int8-static", None),
}
REFERENCE = "pytorch fp32"
PAUSE = 0.5  # seconds between variants


def load(model: Path, backend: str, quantize: str, threads: int | None) -> FewShotClassifier:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return FewShotClassifier.from_pretrained(
        model, device="cpu", quantize=quantize, backend=backend
    )


def calibrate(clf: FewShotClassifier, dataset: str, folder: Path) -> float:
    """Point a static int8 encoder at its own `folder` and calibrate it on `dataset`'s
    support set, as its first adapt would; returns the seconds it took."""
    encoder = clf.learner.encoder
    encoder.use_onnx(folder, "int8-static", stamp=clf.model_fingerprint)
    began = time.perf_counter()
    encoder.calibrate(list(builtin_dataset(dataset, "train_5").texts))
    return time.perf_counter() - began


def with_threads(threads: int | None):
    """This variant's torch threads, after a pause: OpenMP threads of the variant before
    keep spinning for a while after their last run and would slow this one's."""
    time.sleep(PAUSE)
    torch.set_num_threads(threads or os.cpu_count() or 1)


def throughput(classifiers: dict, texts: list[str], repeats: int) -> dict[str, float]:
    encoders = {name: clf.learner.encoder for name, clf in classifiers.items()}
    for encoder in encoders.values():
        encoder.embed(texts)  # warm-up; fills the token cache
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(repeats):
        for name, encoder in encoders.items():
            with_threads(VARIANTS[name][2])
            began = time.perf_counter()
            encoder.embed(texts)
            seconds[name].append(time.perf_counter() - began)
    return {name: len(texts) / statistics.median(values) for name, values in seconds.items()}


def adapt_times(classifiers: dict, repeats: int) -> dict[str, float]:
    support = builtin_dataset("banking77", "train_5")
    texts, labels = list(support.texts), list(support.labels)
    seconds: dict[str, list[float]] = {name: [] for name in classifiers}
    for _ in range(repeats):
        for name, clf in classifiers.items():
            with_threads(VARIANTS[name][2])
            clf.learner.encoder._token_cache.clear()  # as a user's first adapt
            began = time.perf_counter()
            clf.unfitted().adapt(texts, labels)
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in seconds.items()}


def accuracy(classifiers: dict, dataset: str, folder: Path) -> dict[str, dict]:
    support, test = builtin_dataset(dataset, "train_5"), builtin_dataset(dataset, "test")
    correct = {}
    for name, clf in classifiers.items():
        with_threads(VARIANTS[name][2])
        if VARIANTS[name][1] == "int8-static":
            calibrate(clf, dataset, folder / f"static-{dataset}")
        task = clf.unfitted().adapt(list(support.texts), list(support.labels))
        predicted = task.predict(list(test.texts))
        hits = [p == t for p, t in zip(predicted, test.labels, strict=True)]
        correct[name] = np.array(hits, dtype=float)
    out = {}
    for name, values in correct.items():
        mean, ci = mean_ci95(values.tolist())
        delta, delta_ci = mean_ci95((values - correct[REFERENCE]).tolist())
        out[name] = {"accuracy": mean, "ci95": ci, "vs_pytorch_fp32": [delta, delta_ci]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/onnx_backend.json")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.repeats = 256, 1
    texts = list(builtin_dataset("banking77", "test").texts)[: args.texts]
    result: dict = {
        "command": "python benchmarks/onnx_backend.py" + (" --quick" if args.quick else ""),
        "cpus": os.cpu_count(),
        "load_average_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = export_untrained(Path(tmp) / "frozen-minilm", "frozen")
        classifiers = {name: load(model, *spec) for name, spec in VARIANTS.items()}
        static = classifiers["onnx int8-static"]
        result["calibration_seconds"] = calibrate(static, "banking77", Path(tmp) / "static")
        result["texts_per_second"] = throughput(classifiers, texts, args.repeats)
        result["adapt_seconds"] = adapt_times(classifiers, args.repeats)
        if not args.quick:
            result["accuracy"] = {
                d: accuracy(classifiers, d, Path(tmp)) for d in ("banking77", "clinc150")
            }
    result["load_average_after"] = list(os.getloadavg())
    base = result["texts_per_second"][REFERENCE]
    header = "| variant | texts/s | × pytorch fp32 | adapt 77-way 5-shot s |"
    lines = [header, "|---|---|---|---|"]
    for name in VARIANTS:
        rate = result["texts_per_second"][name]
        lines.append(
            f"| {name} | {rate:.0f} | {rate / base:.2f} | {result['adapt_seconds'][name]:.2f} |"
        )
    if "accuracy" in result:
        lines += ["", "| variant | BANKING77 full-way 5-shot | CLINC150 full-way 5-shot |"]
        lines.append("|---|---|---|")
        for name in VARIANTS:
            cells = []
            for dataset in ("banking77", "clinc150"):
                row = result["accuracy"][dataset][name]
                delta, ci = row["vs_pytorch_fp32"]
                cells.append(f"{100 * row['accuracy']:.2f} ({100 * delta:+.2f} ± {100 * ci:.2f})")
            lines.append(f"| {name} | {' | '.join(cells)} |")
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
