"""Where encoding time goes, and what each option buys: texts/s, adapt time, accuracy.

On the real all-MiniLM-L6-v2 and BANKING77, side by side in one run (the machine is noisy:
every variant is timed `--repeats` times, interleaved, and the median is reported with
its ratio to the baseline measured in the same rounds):

  before        batches of 128 ordered by character length (metalm's loop until now)
  tokens        batches ordered by token count (the default now: less padding)
  tokens bs=N   the same with N texts per batch
  int8          `quantize="int8"` at load time: dynamic int8 linear layers (per-channel)

Each timing embeds all 3,080 BANKING77 `test` texts from a cold token cache (tokenizing
included), at each torch thread count in `--threads`. Then the whole user path: load a
`frozen` model directory, `adapt` a 77-way 5-shot task (`train_5`, 385 texts, head
`logreg` or `centroid`) from a cold cache, fp32 vs int8. Last, the accuracy cost of int8 on the
full-way 5- and 10-shot protocol under both heads, paired over the test texts.

    python benchmarks/encode_speed.py
    python benchmarks/encode_speed.py --threads 1 2 --repeats 5

Prints Markdown tables and writes benchmarks/results/encode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metalm.classifier import FewShotClassifier
from metalm.data import builtin_dataset
from metalm.models.encoder import EncoderConfig, TextEncoder, quantize_int8
from metalm.pretrained import export_untrained
from metalm.runs.accuracy import mean_ci95


def embed_by_characters(encoder: TextEncoder, texts: list[str], batch_size: int) -> None:
    """metalm's embedding loop before this benchmark: batches in character-length order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            encoder.forward([texts[i] for i in order[start : start + batch_size]])


def padding_share(encoder: TextEncoder, texts: list[str], batch_size: int, key: str) -> float:
    """The share of token positions that are padding when batches follow `key`
    (`characters` or `tokens`)."""
    counts = encoder.token_counts(texts)
    sort_by = counts if key == "tokens" else [len(t) for t in texts]
    lengths = [counts[i] for i in sorted(range(len(texts)), key=sort_by.__getitem__)]
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return 1 - sum(lengths) / padded


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def encoding_table(texts: list[str], threads: list[int], repeats: int) -> list[dict]:
    fp32 = TextEncoder.from_config(EncoderConfig(device="cpu"))
    int8 = TextEncoder(quantize_int8(fp32.model.eval()), fp32.tokenizer, fp32.config)
    fp32.pretokenize(texts)
    tokens = [len(fp32._token_cache[t]) for t in texts]
    base = fp32.config.batch_size
    variants: dict[str, tuple[TextEncoder, Callable[[TextEncoder], None]]] = {
        "before": (fp32, lambda e: embed_by_characters(e, texts, 128)),
        "tokens": (fp32, lambda e: e.embed(texts)),
        "tokens bs=32": (fp32, lambda e: e.embed(texts, batch_size=32)),
        "tokens bs=128": (fp32, lambda e: e.embed(texts, batch_size=128)),
        "int8": (int8, lambda e: e.embed(texts)),
    }
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        tokenize: list[float] = []
        for _ in range(repeats):
            for name, (encoder, run) in variants.items():
                encoder._token_cache.clear()  # a user's first call tokenizes too
                seconds[name].append(timed(lambda encoder=encoder, run=run: run(encoder)))
            fp32._token_cache.clear()
            tokenize.append(timed(lambda: fp32.pretokenize(texts)))
        before = statistics.median(seconds["before"])
        for name, values in seconds.items():
            median = statistics.median(values)
            rows.append(
                {
                    "threads": count,
                    "variant": name,
                    "seconds": values,
                    "texts_per_s": len(texts) / median,
                    "speedup_vs_before": before / median,
                }
            )
        rows.append(
            {
                "threads": count,
                "variant": "tokenizing only",
                "seconds": tokenize,
                "texts_per_s": len(texts) / statistics.median(tokenize),
                "speedup_vs_before": None,
            }
        )
    torch.set_num_threads(max(threads))
    for row in rows:
        row["texts"] = len(texts)
        row["mean_tokens"] = float(np.mean(tokens))
    fp32.pretokenize(texts)
    rows.append(
        {
            "variant": "padding share",
            "before": padding_share(fp32, texts, 128, "characters"),
            "tokens": padding_share(fp32, texts, base, "tokens"),
        }
    )
    return rows


def adapt_table(directories: dict[str, Path], support, repeats: int) -> list[dict]:
    """`from_pretrained` then `adapt` on the 77-way 5-shot task, timed from a cold
    token cache, per head and quantization."""
    texts, labels = list(support.texts), list(support.labels)
    times = {(h, q): [] for h in directories for q in ("none", "int8")}
    for _ in range(repeats):
        for head, quantize in times:
            clf = FewShotClassifier.from_pretrained(
                directories[head], device="cpu", quantize=quantize
            )
            seconds = timed(lambda clf=clf: clf.adapt(texts, labels))
            times[head, quantize].append(seconds)
    return [
        {"head": h, "quantize": q, "seconds": v, "median": statistics.median(v)}
        for (h, q), v in times.items()
    ]


def accuracy_table(directories: dict[str, Path], shots: list[int]) -> list[dict]:
    test = builtin_dataset("banking77", "test")
    rows = []
    for shot in shots:
        support = builtin_dataset("banking77", f"train_{shot}")
        for head, directory in directories.items():
            correct = {}
            for quantize in ("none", "int8"):
                clf = FewShotClassifier.from_pretrained(directory, device="cpu", quantize=quantize)
                clf.adapt(list(support.texts), list(support.labels))
                predicted = clf.predict(list(test.texts))
                truth = list(test.labels)
                correct[quantize] = np.array(
                    [p == t for p, t in zip(predicted, truth, strict=True)], dtype=float
                )
            mean, ci = mean_ci95(correct["int8"] - correct["none"])
            rows.append(
                {
                    "shots": shot,
                    "head": head,
                    "fp32": float(correct["none"].mean()),
                    "int8": float(correct["int8"].mean()),
                    "int8_minus_fp32": mean,
                    "ci95": ci,
                }
            )
    return rows


def to_markdown(result: dict) -> str:
    lines = [
        "| threads | variant | texts/s (median) | × before |",
        "|---|---|---|---|",
    ]
    for row in result["encoding"]:
        if "threads" not in row:
            continue
        ratio = row["speedup_vs_before"]
        lines.append(
            f"| {row['threads']} | {row['variant']} | {row['texts_per_s']:.0f} | "
            + (f"{ratio:.2f}" if ratio is not None else "")
            + " |"
        )
    pad = result["encoding"][-1]
    lines += [
        "",
        f"padding share of token positions: {100 * pad['before']:.1f}% (character order), "
        f"{100 * pad['tokens']:.1f}% (token order)",
        "",
        "| adapt 77-way 5-shot (frozen) | quantize | median s | runs |",
        "|---|---|---|---|",
    ]
    for row in result["adapt"]:
        runs = ", ".join(f"{s:.2f}" for s in row["seconds"])
        lines.append(f"| head {row['head']} | {row['quantize']} | {row['median']:.2f} | {runs} |")
    lines += [
        "",
        "| full-way | head | fp32 % | int8 % | int8 − fp32 (paired, 95% CI) |",
        "|---|---|---|---|---|",
    ]
    for row in result["accuracy"]:
        lines.append(
            f"| {row['shots']}-shot | {row['head']} | {100 * row['fp32']:.2f} | "
            f"{100 * row['int8']:.2f} | {100 * row['int8_minus_fp32']:+.2f} ± "
            f"{100 * row['ci95']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="*", default=[5, 10])
    parser.add_argument("--limit", type=int, default=0, help="first N test texts (0: all)")
    parser.add_argument("--out", default="benchmarks/results/encode_speed.json")
    args = parser.parse_args()
    texts = list(builtin_dataset("banking77", "test").texts)
    texts = texts[: args.limit] if args.limit else texts
    with tempfile.TemporaryDirectory() as tmp:
        directories = {
            "logreg": export_untrained(Path(tmp) / "logreg", "frozen", ["model.device=cpu"]),
            "centroid": export_untrained(
                Path(tmp) / "centroid", "frozen", ["model.device=cpu", "learner.head=centroid"]
            ),
        }
        result = {
            "benchmark": "encode_speed",
            "encoder": "all-MiniLM-L6-v2",
            "machine": platform.platform(),
            "torch": torch.__version__,
            "encoding": encoding_table(texts, args.threads, args.repeats),
            "adapt": adapt_table(
                directories, builtin_dataset("banking77", "train_5"), args.repeats
            ),
            "accuracy": accuracy_table(directories, args.shots),
        }
    print(to_markdown(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
