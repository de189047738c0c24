"""Predict with an adapted task on ONNX Runtime, without PyTorch: tokenizers, ONNX
Runtime, safetensors and numpy only (this module imports no torch, and nothing that does).

For tasks whose state is a head on the encoder's embeddings (prototypes, or a linear /
logistic-regression head: `frozen`, `protonet`, and `anil`-style heads without adapted
encoder tensors), over a model directory whose encoder was exported for ONNX Runtime
(`metalm export --format onnx`, or once loaded with `--backend onnx`). Probabilities
equal `FewShotClassifier.predict_proba` on the ONNX backend (within float rounding).

Example (in a process without torch; tests/test_onnx_predict.py runs it so):

    predictor = OnnxTaskPredictor("tasks/intents")    # a task adapted with metalm
    predictor.predict(["my card has not arrived"])     # ['card_arrival']

or `python -m metalm.onnx_predict --task tasks/intents --input texts.txt`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metalm.batching import FORWARD_TOKENS, length_groups
from metalm.errors import MetalmError, first_line
from metalm.layout import ENCODER_DIR, LEARNER_WEIGHTS, METADATA, TASK_INFO, TASK_WEIGHTS

# in the model's onnx/ folder: float32, dynamic int8, static int8 (calibrated)
FP32_FILE, INT8_FILE, STATIC_FILE = "encoder.onnx", "encoder.int8.onnx", "encoder.int8-static.onnx"
ONNX_FILES = {
    "none": f"onnx/{FP32_FILE}",
    "int8": f"onnx/{INT8_FILE}",
    "int8-static": f"onnx/{STATIC_FILE}",
}


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MetalmError(
            "the onnx backend needs ONNX Runtime: pip install 'metalm[onnx]' "
            "(or leave the backend at torch)"
        ) from None
    return onnxruntime


def open_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session of an exported encoder on the CPU: all graph
    optimizations, `threads` intra-op threads, no spinning between runs (the process's
    other threads share these cores; `benchmarks/onnx_spinning.py` measures it)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own error types
        raise MetalmError(
            f"{path}: ONNX Runtime cannot load it ({first_line(err)}); delete the folder "
            "to export it again"
        ) from None


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MetalmError(f"{path}: cannot read it ({err})") from None


class OnnxEncoder:
    """A model directory's encoder on ONNX Runtime, without torch: metalm's tokenizing,
    grouping and pooling around the exported transformer (`quantize`: which export)."""

    def __init__(self, model: str | Path, quantize: str = "none", batch_size: int = 64):
        from tokenizers import Tokenizer

        model = Path(model)
        if quantize not in ONNX_FILES:
            raise MetalmError(f"quantize must be one of {sorted(ONNX_FILES)}, got {quantize!r}")
        self.meta = _json(model / METADATA)
        self.config = self.meta["encoder"]
        onnx_file = model / ONNX_FILES[quantize]
        if not onnx_file.exists():
            raise MetalmError(
                f"{onnx_file}: not there; write it with `metalm export --format onnx` "
                "(int8-static: with --calibration FILE) or adapt a task once with "
                f"--backend onnx --quantize {quantize}"
            )
        self.tokenizer = Tokenizer.from_file(str(model / ENCODER_DIR / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(self.config["max_length"]))
        self.tokenizer.no_padding()
        self.session = open_session(onnx_file, os.cpu_count() or 1)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Pooled embeddings [len(texts), dim], grouped as the PyTorch encoder groups them
        (batches in token-count order, each split by `length_groups`): dynamic int8 takes
        its activation ranges per group, so the grouping matters there."""
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), int(self.config["dim"])), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for group in length_groups([len(ids[i]) for i in batch], FORWARD_TOKENS):
                rows = [batch[g] for g in group]
                out[rows] = self._run([ids[i] for i in rows])
        return out

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)], mask[r, : len(row)] = row, 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return self._pool(hidden, mask)

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.config.get("pooling") == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        if self.config.get("normalize", True):
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def learner_scale(model: str | Path) -> float:
    """The learner's logit scale (`log_scale`, learned by `protonet`), 1 without one."""
    from safetensors.numpy import load_file

    own = load_file(str(Path(model) / LEARNER_WEIGHTS))
    return float(np.exp(own["log_scale"])) if "log_scale" in own else 1.0


class OnnxTaskPredictor:
    """An adapted task (`save_task`'s directory) that predicts on ONNX Runtime."""

    def __init__(
        self,
        task: str | Path,
        model: str | Path | None = None,
        quantize: str = "none",
        batch_size: int = 64,
    ):
        from safetensors.numpy import load_file

        task = Path(task)
        info = _json(task / TASK_INFO)
        model = Path(model or info.get("model") or "")
        self.encoder = OnnxEncoder(model, quantize, batch_size)
        meta = self.encoder.meta
        self.classes: list[Any] = list(info["classes"])
        self.state = load_file(str(task / TASK_WEIGHTS))
        if any(name.startswith("encoder.") for name in self.state):
            raise MetalmError(
                f"{task}: this task adapted encoder tensors ({meta['learner']['name']}); "
                "predict with PyTorch (metalm predict)"
            )
        self.scale = learner_scale(model)
        self.distance = meta["learner"].get("distance", "euclidean")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The encoder's pooled embeddings of `texts` (see `OnnxEncoder.embed`)."""
        return self.encoder.embed(texts)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """The task head's logits, as the learner's `predict` computes them."""
        query = self.embed(texts)
        if "prototypes" in self.state:
            prototypes = self.state["prototypes"].astype(np.float32)
            if self.distance == "euclidean":
                squared = ((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
                return -squared * self.scale
            unit = prototypes / np.linalg.norm(prototypes, axis=-1, keepdims=True)
            query = query / np.linalg.norm(query, axis=-1, keepdims=True)
            return query @ unit.T * self.scale
        if "head.weight" in self.state:
            weight, bias = self.state["head.weight"], self.state["head.bias"]
            return query @ weight.T.astype(np.float32) + bias.astype(np.float32)
        raise MetalmError(f"a task state with {sorted(self.state)[:3]}: predict with PyTorch")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        logits = self.logits(texts)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[Any]:
        return [self.classes[i] for i in self.predict_proba(texts).argmax(axis=1)]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m metalm.onnx_predict --task TASK_DIR [--input FILE] [--quantize int8|int8-static]`:
    one text per line in (stdin by default), one JSON line out per text (label,
    probability), without importing torch."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m metalm.onnx_predict", description=main.__doc__)
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", help="the model directory (default: the task's)")
    parser.add_argument("--input", help="a text file, one text per line (default: stdin)")
    parser.add_argument("--quantize", choices=sorted(ONNX_FILES), default="none")
    args = parser.parse_args(argv)
    try:
        predictor = OnnxTaskPredictor(args.task, args.model, args.quantize)
        raw = Path(args.input).read_text(encoding="utf-8") if args.input else sys.stdin.read()
        texts = [line for line in raw.splitlines() if line.strip()]
        probabilities = predictor.predict_proba(texts) if texts else np.zeros((0, 0))
    except (MetalmError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for text, row in zip(texts, probabilities, strict=True):
        best = int(row.argmax())
        label = predictor.classes[best]
        print(json.dumps({"text": text, "label": label, "probability": round(float(row[best]), 6)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
