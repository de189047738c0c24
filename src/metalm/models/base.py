"""What both model kinds share: the model config (`EncoderConfig`, checked when made),
devices, and the table of model kinds (`build_model` makes the model a config names).

`metalm.models.encoder` (sentence encoders) and `metalm.models.causal` (causal LMs) both
import this module and never each other; the table names their classes, imported when
a model is built.

Example:
    >>> model_class("encoder").__name__, model_class("causal").__name__
    ('TextEncoder', 'CausalLM')
"""

from __future__ import annotations

import contextlib
import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from metalm.choices import check_choices
from metalm.errors import MetalmError

if TYPE_CHECKING:
    from metalm.models.causal import CausalLM
    from metalm.models.encoder import TextEncoder

# each kind of model: the module and class that build it (imported when needed)
MODEL_CLASSES = {
    "encoder": ("metalm.models.encoder", "TextEncoder"),
    "causal": ("metalm.models.causal", "CausalLM"),
}
MODEL_KINDS = tuple(MODEL_CLASSES)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


Pooling = Literal["mean", "cls"]
Backend = Literal["torch", "onnx"]  # where the encoder runs at inference (see use_onnx)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ModelKind = Literal["encoder", "causal"]  # the keys of MODEL_CLASSES (a test checks)
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


def device_type(name: str) -> str:
    """The type of torch device `name` (`cpu`, `cuda`, ...), or a MetalmError."""
    try:
        return torch.device(name).type
    except RuntimeError:
        raise MetalmError(f"model.device: unknown device {name!r}; use auto, cpu or cuda") from None


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_type(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetalmError("model.device=cuda but no CUDA device is available; use auto or cpu")
    return device


@dataclass
class EncoderConfig:
    """How texts become vectors.

    `name_or_path`: a Hugging Face model id or local directory; empty means the shipped
    all-MiniLM-L6-v2. `pooling`: `mean` or `cls`. `max_length`: tokens kept per text.
    `num_layers`: keep only the first k transformer layers (0: all; architecture search).
    `num_heads`: keep k attention heads in every layer (0: all; see `prune_heads`).
    `device`: `auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ...
    `kind`: `encoder` (a sentence encoder, above) or `causal` (a causal LM for the
    in-context learners `icl` and `metaicl`; empty `name_or_path` then means the shipped
    SmolLM2-135M-Instruct, and a `.gguf` file works too; see `metalm.models.causal`).
    `dtype` (causal LMs): `auto` (float32 on the CPU, bfloat16 on a GPU that has it, else
    float16), `float32`, `bfloat16` or `float16`; sentence encoders stay float32.
    `backend`: `torch`, or `onnx` to evaluate a sentence encoder on ONNX Runtime (after
    meta-training, which stays in PyTorch; CPU only; see `metalm.models.onnx_runtime`).
    """

    kind: ModelKind = "encoder"
    name_or_path: str = ""
    pooling: Pooling = "mean"
    normalize: bool = True
    max_length: int = 64
    batch_size: int = 64
    trust_remote_code: bool = False
    num_layers: int = 0
    num_heads: int = 0
    device: str = "auto"
    dtype: Dtype = "auto"
    backend: Backend = "torch"

    def __post_init__(self) -> None:
        check_choices(self, "model")
        if self.kind == "encoder" and self.dtype not in ("auto", "float32"):
            raise MetalmError(
                f"model.dtype={self.dtype} is for causal LMs (model.kind=causal); sentence "
                "encoders meta-train in float32: leave model.dtype=auto"
            )

        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise MetalmError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_layers", "num_heads"):  # their upper bounds depend on the model
            if getattr(self, name) < 0:
                raise MetalmError(f"model.{name} must be >= 0 (0: all), got {getattr(self, name)}")
        if self.device != "auto":
            device_type(self.device)  # whether CUDA is there is checked when loading
        if self.backend == "onnx" and self.kind != "encoder":
            raise MetalmError("model.backend=onnx is for sentence encoders (model.kind=encoder)")


def model_class(kind: str) -> type[TextEncoder] | type[CausalLM]:
    """The class of the models of kind `kind` (`model.kind`)."""
    if kind not in MODEL_CLASSES:
        raise MetalmError(f"model.kind must be one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    module, name = MODEL_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def build_model(config: EncoderConfig, safetensors_only: bool = False) -> TextEncoder | CausalLM:
    """The model `config.kind` names: a `TextEncoder` or a `CausalLM`."""
    return model_class(config.kind).from_config(config, safetensors_only=safetensors_only)
