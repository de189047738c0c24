"""Load test and soak of `metalm serve` on localhost: throughput, p50/p99 latency, errors,
server memory over time.

Saves the `--learner` over the real all-MiniLM-L6-v2 (untrained), starts `metalm serve`
on it in a subprocess on a free port (default limits), creates the 77-way 5-shot
BANKING77 task (`train_5`, 385 examples) over HTTP, then:

* load test: for each count in `--clients` (default 1, 8, 32), that many client threads
  in this (second) process send `--requests` classify requests of `--texts` BANKING77
  test texts each (stopping early after `--seconds`); throughput, p50/p99, errors.
* soak (`--soak-seconds N`): `--soak-clients` threads classify for N seconds (every text
  made unique with a counter, so the server's token cache sees endless new texts), while
  one more client creates, uses and deletes a 10-way task every `--sample-every` seconds;
  the server's RSS is sampled every `--sample-every` seconds. Writes JSON and a PNG plot.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py                   # 1, 8, 32 clients
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --clients 8 --texts 1 --requests 400
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --clients --soak-seconds 600  # soak only

Prints Markdown tables; writes benchmarks/results/serve_load_clients.json and, with a
soak, benchmarks/results/serve_soak.json and serve_soak.png.
"""

from __future__ import annotations

import argparse
import itertools
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
    """A free TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model: Path, port: int, threads: str, extra: list[str] | None = None
) -> subprocess.Popen:
    """`metalm serve` on `model` in a subprocess, once /health answers."""
    args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
    args += ["--port", str(port), *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start in 180 s")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def summary(latencies: list[float], errors: list[str], wall: float, texts: int) -> dict:
    """Throughput, latency percentiles and errors of one measured period."""
    ms = np.array(latencies) * 1000
    done = len(latencies)
    return {
        "requests_ok": done,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "seconds": round(wall, 2),
        "requests_per_second": round(done / wall, 2),
        "texts_per_second": round(done * texts / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if done else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if done else None,
    }


class Load:
    """Client threads posting classify requests until told to stop or out of requests."""

    def __init__(self, url: str, task: str, texts: list[str], per_request: int, unique: bool):
        self.url, self.task, self.texts = url, task, texts
        self.per_request, self.unique = per_request, unique
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.counter = itertools.count()

    def body(self, i: int) -> dict:
        start = i * self.per_request % (len(self.texts) - self.per_request)
        batch = self.texts[start : start + self.per_request]
        return {"texts": [f"{t} #{i}" for t in batch] if self.unique else batch}

    def post(self, client: httpx.Client, path: str, body: dict, expect: int = 200) -> bool:
        began = time.perf_counter()
        try:
            response = client.post(path, json=body)
            ok, detail = response.status_code == expect, str(response.status_code)
        except httpx.HTTPError as err:
            ok, detail = False, type(err).__name__
        with self.lock:
            if ok:
                self.latencies.append(time.perf_counter() - began)
            else:
                self.errors.append(detail)
        return ok

    def run(self, clients: int, requests: int | None, stop_at: float) -> float:
        """Send from `clients` threads until `requests` are sent or `stop_at`; wall s."""

        def worker() -> None:
            with httpx.Client(base_url=self.url, timeout=300) as client:
                while time.monotonic() < stop_at:
                    i = next(self.counter)
                    if requests is not None and i >= requests:
                        return
                    self.post(client, f"/tasks/{self.task}/classify", self.body(i))

        began = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - began


def load_levels(url: str, task: str, texts: list[str], args: argparse.Namespace) -> list[dict]:
    """One measured period per client count."""
    rows = []
    for clients in args.clients:
        load = Load(url, task, texts, args.texts, unique=False)
        wall = load.run(clients, args.requests, time.monotonic() + args.seconds)
        rows.append({"clients": clients, **summary(load.latencies, load.errors, wall, args.texts)})
        print(f"  {clients} clients: {rows[-1]}", flush=True)
    return rows


def soak(url: str, task: str, pid: int, texts: list[str], examples: list[dict], args) -> dict:
    """Classify from `args.soak_clients` threads for `args.soak_seconds`, churn tasks,
    sample the server's RSS every `args.sample_every` seconds."""
    load = Load(url, task, texts, args.texts, unique=True)
    stop_at = time.monotonic() + args.soak_seconds
    small = [e for e in examples if e["label"] in sorted({e["label"] for e in examples})[:10]]
    churned: list[int] = []

    def churn() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.monotonic() < stop_at:
                created = client.post("/tasks", json={"examples": small})
                if created.status_code == 201:
                    tid = created.json()["task_id"]
                    load.post(client, f"/tasks/{tid}/classify", load.body(next(load.counter)))
                    deleted = client.delete(f"/tasks/{tid}")
                    churned.append(int(deleted.status_code == 204))
                else:
                    with load.lock:
                        load.errors.append(f"create {created.status_code}")
                time.sleep(args.sample_every)

    samples = [{"t": 0.0, "rss_mb": round(rss_mb(pid), 1), "requests_ok": 0, "errors": 0}]
    began = time.perf_counter()
    runner = threading.Thread(target=load.run, args=(args.soak_clients, None, stop_at))
    churner = threading.Thread(target=churn)
    runner.start()
    churner.start()
    while time.monotonic() < stop_at:
        time.sleep(min(args.sample_every, max(0.0, stop_at - time.monotonic())))
        with load.lock:
            done, failed = len(load.latencies), len(load.errors)
        t = round(time.perf_counter() - began, 1)
        samples.append(
            {"t": t, "rss_mb": round(rss_mb(pid), 1), "requests_ok": done, "errors": failed}
        )
        print(
            f"  soak {t:.0f} s: RSS {samples[-1]['rss_mb']} MiB, {done} ok, {failed} errors",
            flush=True,
        )
    runner.join()
    churner.join()
    wall = time.perf_counter() - began
    rss = np.array([s["rss_mb"] for s in samples])
    times = np.array([s["t"] for s in samples])
    warm = times >= min(60.0, times[-1] / 2)  # after the first minute (allocator warm-up)
    slope = float(np.polyfit(times[warm], rss[warm], 1)[0]) * 60 if warm.sum() >= 3 else None
    return {
        "soak_seconds": args.soak_seconds,
        "clients": args.soak_clients,
        "texts_per_request": args.texts,
        "unique_texts": True,
        "tasks_created_and_deleted": int(sum(churned)),
        **summary(load.latencies, load.errors, wall, args.texts),
        "rss_start_mb": float(rss[0]),
        "rss_after_warmup_mb": float(rss[warm][0]),
        "rss_end_mb": float(rss[-1]),
        "rss_max_mb": float(rss.max()),
        "rss_slope_after_warmup_mb_per_min": round(slope, 2) if slope is not None else None,
        "samples": samples,
    }


def plot_soak(result: dict, path: Path) -> None:
    """RSS and completed requests over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in result["samples"]]
    fig, rss_axis = plt.subplots(figsize=(7, 3.5))
    rss_axis.plot(t, [s["rss_mb"] for s in result["samples"]], "o-", color="tab:blue")
    rss_axis.set_xlabel("seconds")
    rss_axis.set_ylabel("server RSS (MiB)", color="tab:blue")
    rss_axis.set_ylim(bottom=0)
    done_axis = rss_axis.twinx()
    done_axis.plot(t, [s["requests_ok"] for s in result["samples"]], color="tab:gray", lw=1)
    done_axis.set_ylabel("requests answered", color="tab:gray")
    rss_axis.set_title(
        f"metalm serve soak: {result['clients']} clients, {result['requests_ok']} requests, "
        f"{result['errors']} errors"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Start the server, run the load test and/or the soak, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learner", default="protonet")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=240, help="per client count")
    parser.add_argument("--texts", type=int, default=4, help="texts per classify request")
    parser.add_argument("--seconds", type=float, default=120, help="cap per client count")
    parser.add_argument("--soak-seconds", type=float, default=0, help="0: no soak")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--sample-every", type=float, default=10, help="RSS sample period, s")
    parser.add_argument("--server-threads", default="1", help="OMP_NUM_THREADS of the server")
    parser.add_argument("--note", default="", help="free text kept in the JSON")
    parser.add_argument("--out", default="benchmarks/results/serve_load_clients.json")
    parser.add_argument("--soak-out", default="benchmarks/results/serve_soak.json")
    args = parser.parse_args()

    config = load_config(None, [f"learner.name={args.learner}"])
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    support = builtin_dataset("banking77", "train_5")
    texts = list(builtin_dataset("banking77", "test").texts)
    examples = [{"text": t, "label": y} for t, y in zip(support.texts, support.labels, strict=True)]
    machine = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "server_threads": args.server_threads,
        "note": args.note,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = save_pretrained(learner, Path(tmp) / "model")
        del learner
        port = free_port()
        server = start_server(model, port, args.server_threads)
        url = f"http://127.0.0.1:{port}"
        try:
            began = time.perf_counter()
            created = httpx.post(f"{url}/tasks", json={"examples": examples}, timeout=300)
            created.raise_for_status()
            create_seconds = round(time.perf_counter() - began, 2)
            task = created.json()["task_id"]
            levels = load_levels(url, task, texts, args) if args.clients else []
            soaked = (
                soak(url, task, server.pid, texts, examples, args) if args.soak_seconds else None
            )
        finally:
            server.terminate()
            server.wait(timeout=60)
    head = {
        "learner": args.learner,
        "meta_trained": False,
        "task": "banking77 train_5 (77-way 5-shot, 385 examples)",
        "create_task_seconds": create_seconds,
        **machine,
    }
    if levels:
        result = {"benchmark": "serve_load", **head, "texts_per_request": args.texts}
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result["levels"] = levels
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\n{args.texts} texts per request, task created in {create_seconds} s")
        print("| clients | requests | errors | requests/s | texts/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|---|")
        for r in levels:
            print(
                f"| {r['clients']} | {r['requests_ok']} | {r['errors']} | "
                f"{r['requests_per_second']} | {r['texts_per_second']} | {r['p50_ms']} | "
                f"{r['p99_ms']} |"
            )
    if soaked:
        soak_path = Path(args.soak_out)
        soak_path.parent.mkdir(parents=True, exist_ok=True)
        soak_path.write_text(json.dumps({"benchmark": "serve_soak", **head, **soaked}, indent=1))
        plot_soak(soaked, soak_path.with_suffix(".png"))
        print(f"\nsoak: {soaked['soak_seconds']:.0f} s, {soaked['clients']} clients")
        print(
            "| requests | errors | texts/s | p50 ms | p99 ms | RSS start → end (max) MiB | "
            "RSS slope after 1 min, MiB/min |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {soaked['requests_ok']} | {soaked['errors']} | {soaked['texts_per_second']} | "
            f"{soaked['p50_ms']} | {soaked['p99_ms']} | {soaked['rss_start_mb']} → "
            f"{soaked['rss_end_mb']} ({soaked['rss_max_mb']}) | "
            f"{soaked['rss_slope_after_warmup_mb_per_min']} |"
        )
        print(f"wrote {soak_path} and {soak_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
