"""Encode and meta-train throughput on each device, side by side (run by
scripts/gpu_check.sh; prints a table and writes JSON with --out):

* encode: texts/s of the encoder over BANKING77 test texts (batch 64, no grad), median
  of `--repeats` passes after a warm-up pass;
* meta-train: protonet steps/s (5-way 5-shot CLINC150 episodes, 5 queries per class,
  meta-batch 4, AdamW), median of the timed steps after one warm-up step.

    python scripts/gpu_throughput.py --devices cpu cuda --out gpu-out/throughput.json
    python scripts/gpu_throughput.py --devices cpu --texts 64 --steps 2   # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metalm.config import TrainConfig
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.learners import ProtoNet, ProtoNetConfig
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.trainer import MetaTrainer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encode_rate(model: str, device: str, texts: list[str], repeats: int) -> float:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=model, device=device))
    rates = []
    for index in range(repeats + 1):
        _sync(device)
        began = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                encoder.embed(texts[start : start + 64])
        _sync(device)
        if index:  # the first pass warms up (kernels, allocator)
            rates.append(len(texts) / (time.perf_counter() - began))
    return statistics.median(rates)


def meta_train_rate(model: str, device: str, steps: int, tmp: Path) -> float:
    torch.manual_seed(0)
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=model, device=device))
    learner = ProtoNet(encoder, ProtoNetConfig()).to(device)
    sampler = EpisodeSampler(builtin_dataset("clinc150", "train"), 5, 5, 5, seed=0)
    config = TrainConfig(
        steps=steps + 1, meta_batch_size=4, eval_every=10**6, checkpoint_every=10**6,
        warmup_steps=0, tensorboard=False,
    )  # fmt: skip
    trainer = MetaTrainer(learner, sampler, None, config, tmp / device, progress=False)
    trainer.fit()
    log = [json.loads(line) for line in (tmp / device / "log.jsonl").read_text().splitlines()]
    return 1.0 / statistics.median(r["seconds"] for r in log[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--model", default="", help="encoder directory (default: MiniLM)")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    texts = builtin_dataset("banking77", "test").texts[: args.texts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices:
            rows.append(
                {
                    "device": device,
                    "threads": torch.get_num_threads(),
                    "encode_texts_per_s": encode_rate(args.model, device, texts, args.repeats),
                    "meta_train_steps_per_s": meta_train_rate(
                        args.model, device, args.steps, Path(tmp)
                    ),
                }
            )
    base = rows[0]
    print("| device | encode texts/s | × first | meta-train steps/s | × first |")
    print("|---|---|---|---|---|")
    for row in rows:
        encode, steps = row["encode_texts_per_s"], row["meta_train_steps_per_s"]
        print(
            f"| {row['device']} | {encode:.1f} | {encode / base['encode_texts_per_s']:.2f} | "
            f"{steps:.3f} | {steps / base['meta_train_steps_per_s']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "texts": len(texts)}, indent=1))


if __name__ == "__main__":
    main()
