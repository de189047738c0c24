"""How long the default adapt of a 77-way 5-shot task takes, with and without label
names and self-training, side by side in one run.

`FewShotClassifier.adapt` of the shipped MiniLM (`frozen`, `logreg` head) on BANKING77's
`train_5` (385 texts, 77 classes), as a user calls it (tokenizing and embedding the
support set included); the variants take turns, `--repeats` times each, so that a noisy
machine slows them alike. Prints median and quartiles; writes JSON.

    python benchmarks/adapt_time.py                       # the machine's threads
    OMP_NUM_THREADS=1 python benchmarks/adapt_time.py --out adapt_time_1thread.json
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
from metalm.data import builtin_dataset
from metalm.learners import FrozenConfig, build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder

VARIANTS = {
    "names off": {"label_names": "off"},
    "names as examples (default)": {},
    "names + self-training on 1,000 texts": {"self_train": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/adapt_time.json")
    args = parser.parse_args()
    support = builtin_dataset("banking77", "train_5")
    texts, labels = list(support.texts), list(support.labels)
    pool = list(builtin_dataset("banking77", "train").texts)[:1000]
    encoder = TextEncoder.from_config(EncoderConfig())
    classifiers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS.items():
            config = FrozenConfig(label_names=options.get("label_names", "example"))
            save_pretrained(build_learner(encoder, config), Path(tmp) / name)
            classifiers[name] = FewShotClassifier.from_pretrained(Path(tmp) / name)
    for clf in classifiers.values():  # warm-up: first-call allocations
        clf.adapt(texts[:20], labels[:20])
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, clf in classifiers.items():
            unlabeled = pool if VARIANTS[name].get("self_train") else None
            began = time.perf_counter()
            clf.adapt(texts, labels, unlabeled=unlabeled)
            seconds[name].append(time.perf_counter() - began)
    rows = []
    print("| adapt of BANKING77 77-way 5-shot | median s | quartiles s |\n|---|---|---|")
    for name, values in seconds.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        rows.append({"variant": name, "median": median, "q1": q1, "q3": q3, "seconds": values})
        print(f"| {name} | {median:.2f} | {q1:.2f}-{q3:.2f} |")
    Path(args.out).write_text(
        json.dumps(
            {
                "command": "python benchmarks/adapt_time.py",
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
