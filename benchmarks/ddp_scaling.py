"""Data-parallel meta-training: outer steps per second in 1 vs 2 processes on this CPU.

protonet on the shipped all-MiniLM-L6-v2, CLINC150 episodes (5-way 5-shot, 5 queries per
class, 64 tokens), a global meta-batch of 8. Each run is a fresh launch (`torchrun
--standalone`, or one plain process) that meta-trains `--steps` steps without
validation; a run's rate is 1 / the median of its step times after `--warmup` steps
(rank 0's step time, the all-reduce included). Configurations alternate within each
repeat so that load from elsewhere hits them alike; the table gives the median over
repeats, and the scaling efficiency rate(2 processes) / (2 x rate(1 process)), both
runs on 1 thread per process. A third row, 1 process on 2 threads, is the other way to
use two cores.

    OMP_NUM_THREADS=1 python benchmarks/ddp_scaling.py           # ~10 minutes on 2 cores
    python benchmarks/ddp_scaling.py --steps 6 --repeats 1      # a quick look

On a GPU machine (NCCL, one process per GPU), e.g. 2 GPUs:

    python benchmarks/ddp_scaling.py --device cuda --nprocs 1 2 --meta-batch 32

Prints a Markdown table and writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ddp_scaling.json"


def worker(args: argparse.Namespace) -> None:
    """One run (one rank of it under torchrun): meta-train and let rank 0 write the log."""
    import torch

    from metalm import distributed
    from metalm.config import load_config
    from metalm.learners import build_learner
    from metalm.models.encoder import TextEncoder
    from metalm.tasks import build_pools
    from metalm.trainer import MetaTrainer

    torch.set_num_threads(args.threads)
    distributed.setup(args.device)
    overrides = [
        f"model.device={args.device}",
        "model.max_length=64",
        "learner.name=protonet",
        "episode.n_way=5",
        "episode.k_shot=5",
        "episode.q_queries=5",
        f"train.steps={args.steps}",
        f"train.meta_batch_size={args.meta_batch}",
        "train.warmup_steps=0",
        f"train.eval_every={args.steps + 1}",
        f"train.checkpoint_every={args.steps + 1}",
        "train.tensorboard=false",
    ]
    config = load_config(None, overrides)
    torch.manual_seed(config.seed)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    pools = build_pools(config.data)
    sampler = pools.train_sampler(config.episode, config.seed, False)
    trainer = MetaTrainer(learner, sampler, None, config.train, args.out, progress=False)
    trainer.fit()
    distributed.teardown(wait_for_peers=True)


def one_run(nproc: int, threads: int, args: argparse.Namespace) -> float:
    """Steps per second of one fresh launch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        inner = [
            str(Path(__file__).resolve()),
            "--worker",
            f"--out={out}",
            f"--steps={args.steps}",
            f"--meta-batch={args.meta_batch}",
            f"--threads={threads}",
            f"--device={args.device}",
        ]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = (
            [*launcher, f"--nproc-per-node={nproc}", *inner]
            if nproc > 1
            else [sys.executable, *inner]
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in log[args.warmup :]]
    return 1.0 / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-threads-row", action="store_true", help="skip 1 process x 2 threads")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    configs = [(n, 1) for n in args.nprocs]
    if args.device == "cpu" and not args.no_threads_row and max(args.nprocs) > 1:
        configs.append((1, max(args.nprocs)))  # the same cores as threads of one process
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    load_before = os.getloadavg()
    began = time.time()
    for repeat in range(args.repeats):
        for nproc, threads in configs:
            rate = one_run(nproc, threads, args)
            rates[(nproc, threads)].append(rate)
            print(f"repeat {repeat + 1}: {nproc} proc x {threads} thread(s): {rate:.3f} step/s")
    base = statistics.median(rates[(1, 1)]) if (1, 1) in rates else None
    rows = []
    for (nproc, threads), values in rates.items():
        median = statistics.median(values)
        episodes = median * args.meta_batch
        speedup = median / base if base else None
        rows.append(
            {
                "processes": nproc,
                "threads_per_process": threads,
                "steps_per_s": median,
                "steps_per_s_runs": values,
                "episodes_per_s": episodes,
                "speedup_vs_1x1": speedup,
                "efficiency": speedup / (nproc * threads) if speedup else None,
            }
        )
    print(
        f"\nprotonet, all-MiniLM-L6-v2, 5-way 5-shot 5 queries, meta-batch {args.meta_batch}, "
        f"{args.device}, median of {args.repeats} run(s) x {args.steps - args.warmup} steps\n"
    )
    print("| processes x threads | steps/s | episodes/s | speedup | efficiency |")
    print("|---|---|---|---|---|")
    for row in rows:
        speed = f"{row['speedup_vs_1x1']:.2f}x" if row["speedup_vs_1x1"] else ""
        eff = f"{row['efficiency']:.0%}" if row["efficiency"] else ""
        print(
            f"| {row['processes']} x {row['threads_per_process']} | {row['steps_per_s']:.3f} | "
            f"{row['episodes_per_s']:.2f} | {speed} | {eff} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "learner": "protonet",
                "model": "all-MiniLM-L6-v2",
                "episode": "5-way 5-shot, 5 queries per class, max_length 64",
                "meta_batch_size": args.meta_batch,
                "device": args.device,
                "steps": args.steps,
                "warmup_steps_left_out": args.warmup,
                "repeats": args.repeats,
                "rows": rows,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                },
                "wall_s": time.time() - began,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
