"""HTTP classify path against in-process `predict`, in one run, on the same texts.

Saves `--learner` over the real all-MiniLM-L6-v2 (untrained: the point is speed), loads
it here with `FewShotClassifier.from_pretrained` and starts `metalm serve` on it in a
subprocess (default limits, same torch thread count as this process). The 77-way 5-shot
BANKING77 task (`train_5`, 385 examples) is adapted in-process and created over HTTP;
then the BANKING77 `test` texts are classified in batches of `--batch` (200), each batch
once in-process (`predict_proba`) and once over HTTP (`POST /tasks/{id}/classify`,
including the client's JSON encoding and decoding), alternating which goes first so that
machine load drifts hit both alike. Both paths must give the same labels.

    python benchmarks/serve_throughput.py                      # 3,080 test texts, batches of 200
    python benchmarks/serve_throughput.py --texts 1000 --threads 1

Prints a Markdown table and writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from metalm import FewShotClassifier, save_pretrained
from metalm.config import load_config
from metalm.data import builtin_dataset
from metalm.learners import build_learner
from metalm.models.encoder import TextEncoder

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, start_server


def main() -> None:
    """Run the comparison; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learner", default="frozen")
    parser.add_argument("--batch", type=int, default=200, help="texts per classify call")
    parser.add_argument("--texts", type=int, default=0, help="test texts (0: all 3,080)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--server-args", default="", help="more `metalm serve` options")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--note", default="", help="free text kept in the JSON")
    parser.add_argument("--out", default="benchmarks/results/serve_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    config = load_config(None, [f"learner.name={args.learner}"])
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    support = builtin_dataset("banking77", "train_5")
    texts = list(builtin_dataset("banking77", "test").texts)
    texts = texts[: args.texts] if args.texts else texts
    warm = list(builtin_dataset("banking77", "train").texts)[: args.batch]
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    examples = [{"text": t, "label": y} for t, y in zip(support.texts, support.labels, strict=True)]

    with tempfile.TemporaryDirectory() as tmp:
        model = save_pretrained(learner, Path(tmp) / "model")
        del learner
        clf = FewShotClassifier.from_pretrained(model, backend=args.backend)
        port = free_port()
        extra = [*args.server_args.split(), "--backend", args.backend]
        server = start_server(model, port, str(threads), extra=extra)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                began = time.perf_counter()
                created = http.post("/tasks", json={"examples": examples})
                created.raise_for_status()
                create_seconds = time.perf_counter() - began
                task = created.json()["task_id"]
                began = time.perf_counter()
                clf.adapt(list(support.texts), list(support.labels))
                adapt_seconds = time.perf_counter() - began

                def over_http(batch: list[str]) -> list:
                    response = http.post(f"/tasks/{task}/classify", json={"texts": batch})
                    response.raise_for_status()
                    return [p["label"] for p in response.json()["predictions"]]

                def in_process(batch: list[str]) -> list:
                    return clf.predict(batch)

                over_http(warm)  # first-call allocations, on texts not measured
                in_process(warm)
                seconds = {"in_process": [], "http": []}
                labels: dict[str, list] = {"in_process": [], "http": []}
                for i, batch in enumerate(batches):
                    order = ["in_process", "http"] if i % 2 == 0 else ["http", "in_process"]
                    for path in order:
                        run = in_process if path == "in_process" else over_http
                        began = time.perf_counter()
                        labels[path] += run(batch)
                        seconds[path].append(time.perf_counter() - began)
        finally:
            server.terminate()
            server.wait(timeout=60)

    rows = {}
    for path, times in seconds.items():
        total = float(np.sum(times))
        rows[path] = {
            "seconds": round(total, 2),
            "texts_per_second": round(len(texts) / total, 1),
            "batch_p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
            "batch_max_ms": round(1000 * float(np.max(times)), 1),
        }
    ratio = rows["http"]["texts_per_second"] / rows["in_process"]["texts_per_second"]
    agree = float(np.mean(np.array(labels["http"]) == np.array(labels["in_process"])))
    result = {
        "benchmark": "serve_throughput",
        "learner": args.learner,
        "backend": args.backend,
        "meta_trained": False,
        "task": "banking77 train_5 (77-way 5-shot, 385 examples)",
        "texts": len(texts),
        "batch": args.batch,
        "torch_threads": threads,
        "create_task_http_seconds": round(create_seconds, 2),
        "adapt_in_process_seconds": round(adapt_seconds, 2),
        **{f"{path}_{k}": v for path, row in rows.items() for k, v in row.items()},
        "http_over_in_process": round(ratio, 3),
        "label_agreement": agree,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| path | texts/s | batch p50 ms | batch max ms | seconds ({len(texts)} texts) |")
    print("|---|---|---|---|---|")
    for path, row in rows.items():
        print(
            f"| {path} | {row['texts_per_second']} | {row['batch_p50_ms']} | "
            f"{row['batch_max_ms']} | {row['seconds']} |"
        )
    print(f"HTTP / in-process: {ratio:.3f}; labels agree on {100 * agree:.1f}% of texts")


if __name__ == "__main__":
    main()
