"""Load test of `metalm serve` on localhost: throughput, p50/p99 latency, errors.

Saves the `--learner` over the real all-MiniLM-L6-v2 (untrained), starts `metalm serve`
on it in a subprocess on a free port, creates the 77-way 5-shot BANKING77 task
(`train_5`) over HTTP, then sends `--requests` classify requests of `--texts` test texts
each from `--concurrency` client threads in this (second) process, stopping early after
`--seconds`.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --requests 400 --texts 1 --concurrency 8

Prints a Markdown table and writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from metalm import save_pretrained
from metalm.config import load_config
from metalm.data import builtin_dataset
from metalm.learners import build_learner
from metalm.models.encoder import TextEncoder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, threads: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
    args += ["--port", str(port), "--max-texts", "512"]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start in 120 s")


def load(url: str, task: str, texts: list[str], args: argparse.Namespace) -> dict:
    """Send the requests from `args.concurrency` threads; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(args.requests))
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = i * args.texts % (len(texts) - args.texts)
                body = {"texts": texts[start : start + args.texts]}
                began = time.perf_counter()
                try:
                    response = client.post(f"/tasks/{task}/classify", json=body)
                    ok = response.status_code == 200
                    detail = str(response.status_code)
                except httpx.HTTPError as err:
                    ok, detail = False, type(err).__name__
                elapsed = time.perf_counter() - began
                with lock:
                    (latencies if ok else errors).append(elapsed if ok else detail)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    done = len(latencies)
    return {
        "requests_ok": done,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "seconds": round(wall, 2),
        "requests_per_second": round(done / wall, 2),
        "texts_per_second": round(done * args.texts / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if done else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if done else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learner", default="protonet")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--texts", type=int, default=4, help="texts per classify request")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120, help="stop sending after this")
    parser.add_argument("--server-threads", default="1", help="OMP_NUM_THREADS of the server")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()

    config = load_config(None, [f"learner.name={args.learner}"])
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    support = builtin_dataset("banking77", "train_5")
    texts = list(builtin_dataset("banking77", "test").texts)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_pretrained(learner, Path(tmp) / "model")
        del learner
        port = free_port()
        server = start_server(model, port, args.server_threads)
        url = f"http://127.0.0.1:{port}"
        try:
            examples = [
                {"text": t, "label": y} for t, y in zip(support.texts, support.labels, strict=True)
            ]
            began = time.perf_counter()
            created = httpx.post(f"{url}/tasks", json={"examples": examples}, timeout=300)
            created.raise_for_status()
            create_seconds = time.perf_counter() - began
            result = load(url, created.json()["task_id"], texts, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "benchmark": "serve_load",
        "learner": args.learner,
        "meta_trained": False,
        "task": "banking77 train_5 (77-way 5-shot)",
        "create_task_seconds": round(create_seconds, 2),
        "texts_per_request": args.texts,
        "concurrency": args.concurrency,
        "server_threads": args.server_threads,
        "machine": platform.platform(),
        **result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        "| learner | texts/request | concurrency | requests | errors | requests/s | texts/s "
        "| p50 ms | p99 ms | create task s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.learner} | {args.texts} | {args.concurrency} | {result['requests_ok']} | "
        f"{result['errors']} | {result['requests_per_second']} | {result['texts_per_second']} | "
        f"{result['p50_ms']} | {result['p99_ms']} | {result['create_task_seconds']} |"
    )


if __name__ == "__main__":
    main()
