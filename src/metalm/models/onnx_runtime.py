"""The sentence encoder on ONNX Runtime, for inference (adapt, predict, score, serve).

The transformer is exported once to ONNX (`encoder.onnx`: input ids and attention mask
in, last hidden states out, batch and length dynamic) and, for `quantize="int8"`,
quantized dynamically by ONNX Runtime (`encoder.int8.onnx`: int8 per-channel weights,
activations quantized on the fly); for `quantize="int8-static"`, statically
(`encoder.int8-static.onnx`: the MatMuls' activation ranges fixed beforehand from
calibration texts, at most `CALIBRATION_TEXTS` of the first support set adapted, or of
`metalm export --format onnx --calibration FILE`). All are cached in a folder (by
default `onnx/` in the model directory) with the fingerprint of the weights they came
from, and exported again when the weights change. Tokenizing and pooling stay metalm's own, so the
embeddings are those of the PyTorch encoder (within 1e-4 in float32). Meta-training,
and learners that fine-tune while they adapt, run in PyTorch.

Example:
    >>> encoder.use_onnx("onnx")          # a TextEncoder; exported once, then cached
    >>> encoder.backend, encoder.embed(["hello world"]).shape
    ('onnx', torch.Size([1, 32]))
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from metalm.atomic import replace_dir
from metalm.errors import MetalmError
from metalm.onnx_predict import FP32_FILE, INT8_FILE, ONNX_FILES, STATIC_FILE, open_session

SOURCE_FILE = "source.json"
CALIBRATION_TEXTS = 320  # static int8: activation ranges from at most this many texts
Feeds = list[dict[str, np.ndarray]]  # token batches as ONNX Runtime takes them
UNCALIBRATED = (
    "quantize=int8-static is not calibrated yet: adapt a task first (its support set "
    "calibrates it) or run `metalm export --format onnx --calibration FILE`"
)


class _LastHiddenState(nn.Module):
    """The transformer as ONNX sees it: ids and mask in, last hidden states out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model: nn.Module, path: Path) -> None:
    """`model`'s forward to `path` (one self-contained file; batch and length dynamic)."""
    import warnings

    ids = torch.ones(2, 8, dtype=torch.long, device=next(model.parameters()).device)
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches
        torch.onnx.export(
            _LastHiddenState(model.eval()),
            (ids, torch.ones_like(ids)),
            str(path),
            dynamo=False,  # one file, and the dynamic axes as given
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=17,
        )


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of `source` (int8 per-channel weights) to `target`."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def quantize_static_onnx(source: Path, target: Path, calibration: Feeds) -> None:
    """Static int8 quantization of `source` to `target`: QDQ MatMuls with int8
    per-channel weights and uint8 activations whose ranges (MinMax) come from running
    the token batches `calibration` (`benchmarks/onnx_backend.py` measures it)."""
    import logging
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with tempfile.TemporaryDirectory(prefix="metalm-calibrate-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax,
        )


def _stamp(folder: Path) -> str | None:
    """The fingerprint of the weights `folder`'s files were exported from."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("stamp")
    except (OSError, ValueError, AttributeError):
        return None


def exported(folder: Path, quantize: str, stamp: str) -> Path | None:
    """The ONNX file for `quantize` in `folder` if it is there from the weights `stamp`."""
    path = Path(folder) / Path(ONNX_FILES[quantize]).name
    return path if path.exists() and _stamp(Path(folder)) == stamp else None


def prepare(
    model: nn.Module,
    folder: Path,
    quantize: str,
    stamp: str,
    calibration: Feeds | None = None,
) -> Path:
    """The ONNX file to run for `quantize` (`none`, `int8` or `int8-static`), exported
    into `folder` unless it is there already from the same weights (`stamp`);
    `int8-static` is calibrated on the token batches `calibration`."""
    folder = Path(folder)
    ready = exported(folder, quantize, stamp)
    if ready is not None:
        return ready
    if quantize == "int8-static" and not calibration:
        raise MetalmError(UNCALIBRATED)
    keep = _stamp(folder) == stamp  # the other files of the same weights stay

    def write(tmp: Path) -> None:
        for other in (FP32_FILE, INT8_FILE, STATIC_FILE):
            if keep and (folder / other).exists():
                shutil.copyfile(folder / other, tmp / other)
        if not (tmp / FP32_FILE).exists():
            export_onnx(model, tmp / FP32_FILE)
        if quantize == "int8" and not (tmp / INT8_FILE).exists():
            quantize_onnx(tmp / FP32_FILE, tmp / INT8_FILE)
        if quantize == "int8-static":
            quantize_static_onnx(tmp / FP32_FILE, tmp / STATIC_FILE, calibration or [])
        (tmp / SOURCE_FILE).write_text(json.dumps({"stamp": stamp}), encoding="utf-8")

    replace_dir(folder, write)
    return folder / Path(ONNX_FILES[quantize]).name


def weights_stamp(model: nn.Module) -> str:
    """A short hash of `model`'s weights: the stamp of an export made from memory."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class OnnxTransformer:
    """An ONNX Runtime session of an exported encoder (see `open_session`), with the
    intra-op threads of this process's torch (the machine's cores by default)."""

    def __init__(self, path: Path, threads: int | None = None):
        threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        self.session = open_session(path, threads)
        self.path = Path(path)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feeds = {
            "input_ids": input_ids.cpu().numpy(),
            "attention_mask": attention_mask.cpu().numpy(),
        }
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return torch.from_numpy(hidden)
