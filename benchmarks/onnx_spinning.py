"""ONNX Runtime's intra-op threads spinning between runs or not, beside PyTorch in one
process: texts/s of the int8 ONNX encoder at 1 and 2 threads, each setting in turn
(`--repeats` times, a 0.5 s pause before each), after a PyTorch fp32 pass over the same
texts each time (as a process that also runs torch code sees it).

    python benchmarks/onnx_spinning.py        # → benchmarks/results/onnx_spinning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from metalm.data import builtin_dataset
from metalm.models.encoder import EncoderConfig, TextEncoder


def session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/onnx_spinning.json")
    args = parser.parse_args()
    texts = list(builtin_dataset("banking77", "test").texts)[: args.texts]
    reference = TextEncoder.from_config(EncoderConfig(device="cpu"))
    encoder = TextEncoder.from_config(EncoderConfig(device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        encoder.use_onnx(Path(tmp), "int8", stamp="minilm")
        path = encoder._onnx.path
        settings = {f"{t} thread(s), spinning {s}": (t, s) for t in (2, 1) for s in (True, False)}
        sessions = {name: session(path, *spec) for name, spec in settings.items()}
        encoder.embed(texts)
        reference.embed(texts)
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, run in sessions.items():
                reference.embed(texts)  # torch's threads were just busy
                time.sleep(0.5)
                encoder._onnx.session = run
                began = time.perf_counter()
                encoder.embed(texts)
                seconds[name].append(time.perf_counter() - began)
    rates = {name: len(texts) / statistics.median(v) for name, v in seconds.items()}
    print("| ONNX int8 setting | texts/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    result = {"command": "python benchmarks/onnx_spinning.py", "texts_per_second": rates}
    Path(args.out).write_text(json.dumps({**result, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
