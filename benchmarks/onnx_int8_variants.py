"""Which int8 quantization of the ONNX encoder keeps accuracy: chosen on the `valid`
splits, never on test.

Variants of ONNX Runtime's dynamic int8 (per-channel int8 weights, activations
quantized on the fly) that keep some MatMuls in float32 (`nodes_to_exclude`), a
per-tensor one, weight-only 8-bit blocks (`MatMulNBits`, int8 compute on activations
quantized per block: `accuracy_level=4`), and "fp32 support" (the support set embedded
in float32, only the queries in int8: adapt at float32 cost). For each: texts/s (`--texts` BANKING77
`valid` texts, variants in turns `--repeats` times after a 0.5 s pause, median), mean
cosine to float32, and full-way 5-shot accuracy on BANKING77 and CLINC150 `valid`
(support `train_5`, the shipped MiniLM as `frozen` with its default logreg head),
paired text by text with PyTorch float32.

    python benchmarks/onnx_int8_variants.py   # → benchmarks/results/onnx_int8_variants.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from metalm import FewShotClassifier
from metalm.data import builtin_dataset
from metalm.layout import ONNX_DIR
from metalm.models.onnx_runtime import FP32_FILE, OnnxTransformer
from metalm.pretrained import export_untrained
from metalm.runs.accuracy import mean_ci95

LAYERS = 6


def ffn_out(layer: int) -> str:
    return f"/model/encoder/layer.{layer}/output/dense/MatMul"


def layer_matmuls(layer: int) -> list[str]:
    prefix = f"/model/encoder/layer.{layer}"
    return [f"{prefix}/attention/self/{name}/MatMul" for name in ("query", "key", "value")] + [
        f"{prefix}/attention/output/dense/MatMul",
        f"{prefix}/intermediate/dense/MatMul",
        ffn_out(layer),
    ]


VARIANTS: dict[str, dict] = {  # name: quantize_dynamic (or, with "bits", MatMulNBits) options
    "all MatMuls (shipped)": {},
    "per-tensor weights": {"per_channel": False},
    "last layer's FFN output fp32": {"nodes_to_exclude": [ffn_out(LAYERS - 1)]},
    "every FFN output fp32": {"nodes_to_exclude": [ffn_out(i) for i in range(LAYERS)]},
    "last layer fp32": {"nodes_to_exclude": layer_matmuls(LAYERS - 1)},
    "first layer fp32": {"nodes_to_exclude": layer_matmuls(0)},
    "first and last layer fp32": {"nodes_to_exclude": layer_matmuls(0) + layer_matmuls(5)},
    "8-bit blocks of 32 (MatMulNBits)": {"bits": 8, "block_size": 32},
    "8-bit blocks of 128 (MatMulNBits)": {"bits": 8, "block_size": 128},
}


def quantize(source: Path, target: Path, options: dict) -> None:
    if "bits" in options:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)), is_symmetric=True, accuracy_level=4, **options
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        return
    options = {"per_channel": True, **options}
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, **options)


def hits(classifier: FewShotClassifier, support, query, support_encoder=None) -> np.ndarray:
    encoder = classifier.learner.encoder
    if support_encoder is not None:  # the support set embedded by another session
        queries_session = encoder._onnx
        encoder._onnx = support_encoder
        task = classifier.unfitted().adapt(list(support.texts), list(support.labels))
        encoder._onnx = queries_session
    else:
        task = classifier.unfitted().adapt(list(support.texts), list(support.labels))
    predicted = task.predict(list(query.texts))
    return np.array([p == t for p, t in zip(predicted, query.labels, strict=True)], float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/onnx_int8_variants.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    logging.getLogger().setLevel(logging.ERROR)
    data = {
        name: (builtin_dataset(name, "train_5"), builtin_dataset(name, "valid"))
        for name in ("banking77", "clinc150")
    }
    result: dict = {
        "command": "python benchmarks/onnx_int8_variants.py",
        "split": "valid",
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = export_untrained(Path(tmp) / "frozen", "frozen")
        reference = FewShotClassifier.from_pretrained(model, device="cpu")
        onnx = FewShotClassifier.from_pretrained(model, device="cpu", backend="onnx")
        folder = model / ONNX_DIR
        encoder = onnx.learner.encoder
        fp32_session = encoder._onnx
        base = {name: hits(reference, *pair) for name, pair in data.items()}
        texts = list(data["banking77"][1].texts)[: args.texts]
        fp32 = reference.learner.encoder.embed(texts)
        sessions = {"fp32 (reference)": fp32_session}
        for index, (name, options) in enumerate(VARIANTS.items()):
            path = folder / f"variant{index}.onnx"
            quantize(folder / FP32_FILE, path, options)
            sessions[name] = OnnxTransformer(path)
        for name, session in sessions.items():
            encoder._onnx = session
            encoder._token_cache.clear()
            row: dict = {"options": VARIANTS.get(name, "float32")}
            vectors = encoder.embed(texts)
            row["mean_cosine_to_fp32"] = float(
                torch.nn.functional.cosine_similarity(vectors, fp32).mean()
            )
            for dataset, pair in data.items():
                scored = hits(onnx, *pair)
                row[dataset] = float(scored.mean())
                delta = mean_ci95((scored - base[dataset]).tolist())
                row[f"{dataset}_vs_pytorch_fp32"] = list(delta)
            result["variants"][name] = row
        int8 = sessions["all MatMuls (shipped)"]
        encoder._onnx = int8
        row = {"options": "support embedded by fp32, queries by the shipped int8"}
        for dataset, pair in data.items():
            scored = hits(onnx, *pair, support_encoder=fp32_session)
            row[dataset] = float(scored.mean())
            row[f"{dataset}_vs_pytorch_fp32"] = list(mean_ci95((scored - base[dataset]).tolist()))
        result["variants"]["fp32 support, int8 queries"] = row
        seconds: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for name, session in sessions.items():
                encoder._onnx = session
                time.sleep(0.5)
                began = time.perf_counter()
                encoder.embed(texts)
                seconds[name].append(time.perf_counter() - began)
        for name, values in seconds.items():
            result["variants"][name]["texts_per_second"] = len(texts) / statistics.median(values)
    result["pytorch_fp32"] = {name: float(values.mean()) for name, values in base.items()}
    speed = result["variants"]["fp32 (reference)"]["texts_per_second"]
    for row in result["variants"].values():
        if "texts_per_second" in row:
            row["times_onnx_fp32"] = row["texts_per_second"] / speed
    print("| variant | texts/s (× ORT fp32) | cosine | BANKING77 valid Δ | CLINC150 valid Δ |")
    print("|---|---|---|---|---|")
    for name, row in result["variants"].items():
        rate = row.get("texts_per_second")
        rate_text = f"{rate:.0f} ({rate / speed:.2f}×)" if rate else "—"
        cosine = row.get("mean_cosine_to_fp32")
        pairs = [row[f"{d}_vs_pytorch_fp32"] for d in data]
        cells = [f"{100 * delta:+.2f} ± {100 * ci:.2f}" for delta, ci in pairs]
        cosine_text = f"{cosine:.4f}" if cosine is not None else "—"
        print(f"| {name} | {rate_text} | {cosine_text} | {cells[0]} | {cells[1]} |")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
