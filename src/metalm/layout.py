"""The files of a metalm model directory and of an adapted task's directory, the
model's fingerprint, and metalm's version: what the PyTorch code and the torch-free ONNX
code (`metalm.onnx_predict`, `metalm.onnx_adapt`) both read and write. No torch here.

Example:
    >>> len(fingerprint(saved_model)), fingerprint(saved_model) == fingerprint(saved_model)
    (16, True)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# a model directory (`save_pretrained`, `metalm export`)
METADATA = "metalm.json"
LEARNER_WEIGHTS = "learner.safetensors"
ENCODER_DIR = "encoder"
ONNX_DIR = "onnx"  # an ONNX Runtime export of the encoder (from_pretrained(backend="onnx"))
# an adapted task (`FewShotClassifier.save_task`, `metalm adapt --out`)
TASK_FORMAT_VERSION = 1
TASK_WEIGHTS = "task.safetensors"
TASK_INFO = "task.json"


def fingerprint(directory: str | Path) -> str:
    """A short content hash of a model directory's weights and metadata: task states
    record it, so that a task is never applied to another model."""
    directory = Path(directory)
    digest = hashlib.sha256()
    files = [directory / METADATA, directory / LEARNER_WEIGHTS]
    files += sorted((directory / ENCODER_DIR).glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def metalm_version() -> str:
    """The installed metalm's version (`unknown` when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metalm")
    except PackageNotFoundError:
        return "unknown"
