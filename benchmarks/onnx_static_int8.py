"""Static against dynamic int8 quantization of the ONNX encoder: texts/s, how close the
embeddings stay to float32 (mean cosine), and BANKING77 full-way 5-shot accuracy paired
with PyTorch float32.

Static: ONNX Runtime's `quantize_static` (QDQ, int8 per-channel weights, uint8
activations, MinMax ranges) on the MatMuls, calibrated on `--calibration` texts of
BANKING77's `train_5` support set (the texts a task is adapted on); dynamic: what
`--backend onnx --quantize int8` runs. The shipped MiniLM as `frozen` (logreg head).

    python benchmarks/onnx_static_int8.py   # → benchmarks/results/onnx_static_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from metalm import FewShotClassifier
from metalm.data import builtin_dataset
from metalm.evaluate import mean_ci95
from metalm.models.onnx_runtime import FP32_FILE, INT8_FILE, OnnxTransformer
from metalm.pretrained import ONNX_DIR, export_untrained


class Batches(CalibrationDataReader):
    """The calibration texts as the encoder's token batches of 32."""

    def __init__(self, encoder, texts: list[str]):
        self.batches = [encoder.tokenize(texts[i : i + 32]) for i in range(0, len(texts), 32)]

    def get_next(self) -> dict | None:
        if not self.batches:
            return None
        batch = self.batches.pop(0)
        return {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=320)
    parser.add_argument("--out", default="benchmarks/results/onnx_static_int8.json")
    args = parser.parse_args()
    support, test = builtin_dataset("banking77", "train_5"), builtin_dataset("banking77", "test")
    texts = list(test.texts)
    result: dict = {"command": "python benchmarks/onnx_static_int8.py", "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = export_untrained(Path(tmp) / "frozen", "frozen")
        reference = FewShotClassifier.from_pretrained(model, device="cpu")
        clf = FewShotClassifier.from_pretrained(
            model, device="cpu", backend="onnx", quantize="int8"
        )
        folder = model / ONNX_DIR
        began = time.perf_counter()
        quant_pre_process(
            str(folder / FP32_FILE), str(folder / "pre.onnx"), skip_symbolic_shape=True
        )
        calibration = list(support.texts)[: args.calibration]
        quantize_static(
            str(folder / "pre.onnx"),
            str(folder / "static.onnx"),
            Batches(clf.learner.encoder, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        result["static_quantize_seconds"] = time.perf_counter() - began
        fp32 = reference.learner.encoder.embed(texts)
        task = reference.unfitted().adapt(list(support.texts), list(support.labels))
        base = np.array([p == t for p, t in zip(task.predict(texts), test.labels, strict=True)])
        encoder = clf.learner.encoder
        for name, file in (("dynamic", INT8_FILE), ("static", "static.onnx")):
            encoder._onnx = OnnxTransformer(folder / file)
            encoder._token_cache.clear()
            vectors = encoder.embed(texts)
            seconds = []
            for _ in range(3):
                time.sleep(0.5)
                start = time.perf_counter()
                encoder.embed(texts[:1024])
                seconds.append(time.perf_counter() - start)
            adapted = clf.unfitted().adapt(list(support.texts), list(support.labels))
            hits = np.array(
                [p == t for p, t in zip(adapted.predict(texts), test.labels, strict=True)]
            )
            delta, ci = mean_ci95((hits.astype(float) - base).tolist())
            cosine = torch.nn.functional.cosine_similarity(vectors, fp32).mean()
            result["variants"][name] = {
                "texts_per_second": 1024 / statistics.median(seconds),
                "mean_cosine_to_fp32": float(cosine),
                "banking77_fullway5": float(hits.mean()),
                "vs_pytorch_fp32": [delta, ci],
            }
    result["pytorch_fp32_banking77_fullway5"] = float(base.mean())
    print("| int8 | texts/s | mean cosine to fp32 | BANKING77 full-way 5-shot (Δ vs fp32) |")
    print("|---|---|---|---|")
    for name, row in result["variants"].items():
        delta, ci = row["vs_pytorch_fp32"]
        print(
            f"| {name} | {row['texts_per_second']:.0f} | {row['mean_cosine_to_fp32']:.4f} | "
            f"{100 * row['banking77_fullway5']:.2f} ({100 * delta:+.2f} ± {100 * ci:.2f}) |"
        )
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
