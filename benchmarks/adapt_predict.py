"""Adaptation time and prediction throughput of every learner through the Python API.

For each learner: build it over the real all-MiniLM-L6-v2 (untrained: its meta-parameters
as built, since the point is speed), `save_pretrained` it, load it back with
`FewShotClassifier.from_pretrained`, adapt it to the 77-way 5-shot BANKING77 task
(`train_5`: 385 labeled texts) and classify `--predict-texts` texts of the test split
(batched, no gradients). Accuracy on those texts is printed too, as a sanity check only:
the learners are not meta-trained here.

    OMP_NUM_THREADS=1 python benchmarks/adapt_predict.py                    # every learner
    OMP_NUM_THREADS=1 python benchmarks/adapt_predict.py --learners frozen anil --predict-texts 256

Prints a Markdown table and writes benchmarks/results/adapt_predict.json (after each
learner, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metalm import FewShotClassifier, save_pretrained
from metalm.config import load_config, parse_learner_config
from metalm.data import builtin_dataset
from metalm.learners import LEARNERS, build_learner
from metalm.models.encoder import TextEncoder


def measure(name: str, texts: list[str], labels: list[str], queries, truth, batch: int) -> dict:
    config = load_config(None, [f"learner.name={name}"])
    learner = build_learner(TextEncoder.from_config(config.model), parse_learner_config(name))
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        save_pretrained(learner, Path(tmp) / "model")
        save_seconds = time.perf_counter() - began
        began = time.perf_counter()
        clf = FewShotClassifier.from_pretrained(Path(tmp) / "model", batch_size=batch)
        load_seconds = time.perf_counter() - began
    began = time.perf_counter()
    clf.adapt(texts, labels)
    adapt_seconds = time.perf_counter() - began
    clf.predict(queries[:8])  # warm-up: first-call allocations
    began = time.perf_counter()
    predicted = clf.predict(queries)
    predict_seconds = time.perf_counter() - began
    return {
        "learner": name,
        "meta_trained": False,
        "ways": len(clf.classes_),
        "support_texts": len(texts),
        "save_seconds": round(save_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "adapt_seconds": round(adapt_seconds, 3),
        "predict_texts": len(queries),
        "predict_texts_per_second": round(len(queries) / predict_seconds, 1),
        "accuracy": round(float(np.mean(np.array(predicted) == np.array(truth))), 4),
        "task_state_mb": round(
            sum(t.numel() * t.element_size() for t in clf.state_.values()) / 2**20, 2
        ),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| learner | adapt s (77-way 5-shot) | predict texts/s | load s | task state MB | "
        "accuracy (untrained) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['learner']} | {r['adapt_seconds']:.2f} | {r['predict_texts_per_second']:.0f} | "
            f"{r['load_seconds']:.2f} | {r['task_state_mb']:.2f} | {100 * r['accuracy']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", nargs="+", default=sorted(LEARNERS))
    parser.add_argument("--predict-texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/adapt_predict.json")
    args = parser.parse_args()

    support = builtin_dataset("banking77", "train_5")
    test = builtin_dataset("banking77", "test")
    rng = np.random.default_rng(0)
    rows_idx = rng.permutation(len(test))[: args.predict_texts]
    queries = [test.texts[i] for i in rows_idx]
    truth = [test.labels[i] for i in rows_idx]
    results = []
    for name in args.learners:
        torch.manual_seed(0)
        row = measure(
            name, list(support.texts), list(support.labels), queries, truth, args.batch_size
        )
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "benchmark": "adapt_predict",
                    "task": "banking77 train_5 (77-way 5-shot) -> test texts",
                    "torch_threads": torch.get_num_threads(),
                    "machine": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "results": results,
                },
                indent=1,
            )
        )
    print()
    print(table(results))


if __name__ == "__main__":
    main()
