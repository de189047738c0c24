"""Meta-batch of gradient-based learners: one `vmap` call vs a loop over episodes.

For each model (the tiny random BERT of the tests, the real MiniLM), learner and mode,
a fresh process times `repeats` outer steps (meta-loss + backward of a 5-way 1-shot
meta-batch of 4, 5 queries per class, after one warm-up step) and reads its peak memory
(max RSS; the model load is measured and subtracted). The same numbers give the cost of
one inner step of each learner on MiniLM.

    python benchmarks/vmap_vs_loop.py                  # about 5 minutes, 1 thread
    python benchmarks/vmap_vs_loop.py --models minilm --learners maml

Prints a Markdown table and writes benchmarks/results/vmap_vs_loop.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LEARNERS = {  # name -> learner overrides (everything else: the config defaults)
    "maml": {"name": "maml"},
    "fomaml": {"name": "fomaml"},
    "anil": {"name": "anil"},
    "maml-all": {"name": "maml", "adapt": "all"},
    "maml-lora": {"name": "maml", "adapt": "lora"},
}


def make_tiny(directory: Path) -> str:
    """The 2-layer, 32-wide random BERT of the tests."""
    from metalm.models.tiny import save_tiny_bert

    return str(save_tiny_bert(directory))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    """One (model, learner, mode) in this process."""
    import torch

    from metalm.config import parse_learner_config
    from metalm.data import EpisodeSampler, builtin_dataset
    from metalm.learners import build_learner
    from metalm.models import EncoderConfig, TextEncoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vectorize = args.mode == "vmap"
    spec = dict(LEARNERS[args.learner], inner_steps=args.inner_steps, vectorize=vectorize)
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=args.model_path))
    learner = build_learner(encoder, parse_learner_config(spec))
    learner.train()
    sampler = EpisodeSampler(builtin_dataset("clinc150", "train"), 5, 1, 5, seed=0)
    encoder.pretokenize([t for i in range(64) for t in sampler.sample(i).support_texts])
    loaded = peak_rss_mib()

    def step(index: int) -> float:
        episodes = [sampler.sample(index * args.meta_batch + i) for i in range(args.meta_batch)]
        learner.zero_grad(set_to_none=True)
        began = time.perf_counter()
        if args.mode == "vmap":
            loss = learner.meta_loss_batch(episodes)
            assert loss is not None
            loss.backward()
        else:
            for episode in episodes:
                (learner.meta_loss(episode) / len(episodes)).backward()
        return time.perf_counter() - began

    step(0)  # warm-up
    seconds = [step(i + 1) for i in range(args.repeats)]
    return {
        "model": args.model,
        "learner": args.learner,
        "mode": args.mode,
        "seconds_per_meta_batch": statistics.median(seconds),
        "all_seconds": seconds,
        "peak_extra_mib": peak_rss_mib() - loaded,
        "adapted_tensors": len(getattr(learner, "adapted_names", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "minilm"])
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS))
    parser.add_argument("--modes", nargs="+", default=["loop", "vmap"])
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/vmap_vs_loop.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--learner", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"minilm": ""}
        if "tiny" in args.models:
            paths["tiny"] = make_tiny(Path(tmp) / "tiny")
        for model in args.models:
            for learner in args.learners:
                for mode in args.modes:
                    command = [
                        sys.executable, __file__, "--child", "--model", model,
                        "--model-path", paths[model], "--learner", learner, "--mode", mode,
                        "--meta-batch", str(args.meta_batch), "--inner-steps",
                        str(args.inner_steps), "--repeats", str(args.repeats),
                        "--threads", str(args.threads),
                    ]  # fmt: skip
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        error = done.stderr.strip().splitlines()[-1:]
                        rows.append({"model": model, "learner": learner, "mode": mode,
                                     "error": error[0] if error else "failed"})  # fmt: skip
                    else:
                        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(rows[-1], file=sys.stderr)

    print(f"\n5-way 1-shot, 5 queries/class, meta-batch {args.meta_batch}, "
          f"{args.inner_steps} inner steps, {args.threads} thread(s)\n")  # fmt: skip
    print("| model | learner | loop s/step | vmap s/step | vmap speed-up | loop MiB | vmap MiB |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for learner in args.learners:
            found = {r["mode"]: r for r in rows if r["model"] == model and r["learner"] == learner}
            loop, vmap = found.get("loop", {}), found.get("vmap", {})
            ls, vs = loop.get("seconds_per_meta_batch"), vmap.get("seconds_per_meta_batch")
            speed = f"{ls / vs:.2f}x" if ls and vs else "-"

            def cell(row: dict, key: str, fmt: str) -> str:
                return format(row[key], fmt) if key in row else row.get("error", "-")[:40]

            cells = [
                model,
                learner,
                cell(loop, "seconds_per_meta_batch", ".3f"),
                cell(vmap, "seconds_per_meta_batch", ".3f"),
                speed,
                cell(loop, "peak_extra_mib", ".0f"),
                cell(vmap, "peak_extra_mib", ".0f"),
            ]
            print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("meta_batch", "inner_steps", "repeats", "threads")}
    meta = {"python": platform.python_version(), "machine": platform.machine()}
    import torch

    meta["torch"] = torch.__version__
    out.write_text(json.dumps({"settings": settings, "env": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
