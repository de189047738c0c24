"""Atomic checkpoints: safetensors weights, `weights_only` optimizer state, JSON progress."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from metalm.atomic import out_of_room, replace_dir, write_failed
from metalm.errors import MetalmError, first_line
from metalm.runs.directory import (
    LEARNER_WEIGHTS,
    OPTIMIZER_STATE,
    PROGRESS_STATE,
    SAMPLER_STATE,
)


def _save_weights(module: nn.Module, path: Path) -> None:
    """`module`'s weights as safetensors; only its trainable ones when it says the rest
    never change (`trainable_weights_only`: a LoRA-adapted LM, whose frozen base is
    reloaded from where it came)."""
    if not getattr(module, "trainable_weights_only", False):
        save_model(module, str(path))
        return
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k in trainable}
    save_file(tensors, str(path))


def save_weights_atomic(module: nn.Module, path: Path) -> None:
    """Write `module`'s weights to `path` (safetensors) via a temporary file + rename; a
    write out of room (`WriteFailed`) leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        _save_weights(module, tmp)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if out_of_room(err):
            raise write_failed(path, err, kept=path.exists()) from None
        raise
    os.replace(tmp, path)


def load_weights(module: nn.Module, path: Path) -> None:
    if not path.exists():
        raise MetalmError(f"{path}: no such weights file")
    try:
        _missing, unexpected = load_model(module, str(path), strict=False)
    except SafetensorError as err:
        raise MetalmError(
            f"{path}: broken or truncated weights ({first_line(err)}); resume from "
            "another checkpoint or train again"
        ) from None
    if unexpected:
        raise MetalmError(f"{path}: weights do not fit this learner (unexpected {unexpected[:3]})")


def save_checkpoint(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a complete checkpoint to `directory`, replacing the old one atomically.

    `extra` holds tensors of the task samplers (hard-negative neighbours, cluster
    assignments), stored as safetensors beside the weights.

    The new checkpoint is written beside the old one and swapped in by
    `metalm.atomic.replace_dir`: a crash at any moment leaves either the old or the new
    checkpoint whole (see `metalm.runs.directory.find_checkpoint`).
    """
    blob = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # this process's own GPU only: another machine or rank may have fewer or others
        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }

    def write(tmp: Path) -> None:
        _save_weights(module, tmp / LEARNER_WEIGHTS)
        buffer = io.BytesIO()  # torch's file writer reports a short write without the reason
        torch.save(blob, buffer)
        (tmp / OPTIMIZER_STATE).write_bytes(buffer.getbuffer())
        if extra:
            tensors = {k: v.contiguous() for k, v in extra.items()}
            save_file(tensors, str(tmp / SAMPLER_STATE))
        (tmp / PROGRESS_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")

    replace_dir(directory, write)


def load_checkpoint(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the progress state."""
    load_weights(module, directory / LEARNER_WEIGHTS)
    # on the CPU first, whatever device wrote it: the optimizer moves its state to the
    # parameters' device, and RNG states are CPU tensors
    try:
        blob = torch.load(directory / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise MetalmError(
            f"{directory / OPTIMIZER_STATE}: broken or truncated optimizer state "
            f"({first_line(err)}); resume from "
            "another checkpoint or train again"
        ) from None
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    restore_cuda_rng(blob.get("cuda_rng"), directory)
    path = directory / PROGRESS_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetalmError(
            f"{path}: broken or truncated progress state ({err}); resume from another "
            "checkpoint or train again"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise MetalmError(f"{path}: not a checkpoint's progress state (no 'step')")
    return state


def restore_cuda_rng(state: torch.Tensor | list[torch.Tensor] | None, where: Path) -> None:
    """Set this process's GPU generator from a checkpoint's CUDA RNG state: one state
    (this format) or one per GPU of the machine that saved it (older checkpoints: the
    current device's, if it had one). Skipped, with a warning, without a GPU."""
    if state is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            f"{where}: the checkpoint holds a CUDA random state but there is no GPU here; "
            "resuming on the CPU (GPU random draws, e.g. dropout, will differ)",
            UserWarning,
            stacklevel=3,
        )
        return
    if isinstance(state, list | tuple):
        index = torch.cuda.current_device()
        if index >= len(state):
            return
        state = state[index]
    torch.cuda.set_rng_state(state)


def load_extra(directory: Path) -> dict[str, torch.Tensor]:
    """The task samplers' tensors saved with a checkpoint (empty if there are none)."""
    path = directory / SAMPLER_STATE
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise MetalmError(
            f"{path}: broken or truncated sampler state ({first_line(err)}); "
            "resume from another checkpoint or train again"
        ) from None
