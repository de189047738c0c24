"""`metalm.checkpoint`: checkpoints round-trip weights, optimizer, scheduler and RNG, and
survive an interrupted swap."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from run_tools import assert_same_tensors, checkpoint_twice, toy, toy_step, weights_of
from torch import nn

from metalm import atomic
from metalm.atomic import new_path, old_path
from metalm.checkpoint import (
    load_checkpoint,
    load_extra,
    load_weights,
    save_checkpoint,
    save_weights_atomic,
)
from metalm.errors import MetalmError
from metalm.runs.directory import find_checkpoint


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, slots in a["state"].items():
        assert slots.keys() == b["state"][index].keys()
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name]))


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path: Path):
    net, optimizer, scheduler = toy(seed=0)
    for _ in range(3):
        toy_step(net, optimizer, scheduler)
    state = {"step": 3, "best_step": None, "val_history": [{"step": 2, "val_accuracy": 0.5}]}
    save_checkpoint(tmp_path / "checkpoint", net, optimizer, scheduler, state)
    saved_weights = weights_of(net)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_lr = scheduler.get_last_lr()
    rand_after_save = torch.rand(5)
    toy_step(net, optimizer, scheduler)  # what the uninterrupted run does next
    continued = weights_of(net)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    fresh, fresh_optimizer, fresh_scheduler = toy(seed=123)  # other weights, other RNG
    assert not torch.equal(fresh.lin.weight, saved_weights["lin.weight"])
    found = find_checkpoint(tmp_path / "checkpoint")
    assert found == tmp_path / "checkpoint"
    assert load_checkpoint(found, fresh, fresh_optimizer, fresh_scheduler) == state
    assert_same_tensors(weights_of(fresh), saved_weights)
    _assert_same_optimizer_state(fresh_optimizer.state_dict(), saved_optimizer)
    assert fresh_scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == saved_lr
    assert torch.equal(torch.rand(5), rand_after_save)
    toy_step(fresh, fresh_optimizer, fresh_scheduler)  # dropout + AdamW + schedule
    assert_same_tensors(weights_of(fresh), continued)


@pytest.mark.parametrize("exchange", [True, False])
def test_checkpoint_swap_cut_short_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
):
    """Checkpoints are replaced by `metalm.atomic.replace_dir`; where its fallback swap
    (no renameat2) is cut between parking the old checkpoint and renaming the new one in,
    `find_checkpoint` restores the old one whole."""
    monkeypatch.setattr(atomic, "use_exchange", exchange)
    directory = tmp_path / "checkpoint"
    step2 = checkpoint_twice(directory)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    os.replace(directory, old_path(directory))  # the crash: old parked, new half-written
    new_path(directory).mkdir()
    (new_path(directory) / "learner.safetensors").write_bytes(b"\0" * 10)
    assert find_checkpoint(directory) == directory
    other, other_optimizer, other_scheduler = toy(seed=5)
    assert load_checkpoint(directory, other, other_optimizer, other_scheduler) == {"step": 2}
    assert_same_tensors(weights_of(other), step2)
    save_checkpoint(directory, other, other_optimizer, other_scheduler, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((directory / "state.json").read_text()) == {"step": 3}


def test_weights_round_trip_and_mismatch(tmp_path: Path):
    net, _, _ = toy(seed=0)
    path = tmp_path / "w.safetensors"
    save_weights_atomic(net, path)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    other, _, _ = toy(seed=1)
    load_weights(other, path)
    assert_same_tensors(weights_of(other), weights_of(net))
    with pytest.raises(MetalmError, match="do not fit"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(MetalmError, match="no such weights file"):
        load_weights(net, tmp_path / "missing.safetensors")


def test_resume_reads_onto_the_cpu_and_skips_a_cuda_state_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A checkpoint written on a GPU machine (CUDA RNG state inside) resumes on a CPU-only
    one: everything is read with map_location="cpu", and the CUDA state is skipped with a
    warning instead of failing."""
    import metalm.checkpoint as checkpoint
    from metalm.runs.directory import OPTIMIZER_STATE

    net, optimizer, scheduler = toy(seed=0)
    toy_step(net, optimizer, scheduler)
    save_checkpoint(tmp_path / "c", net, optimizer, scheduler, {"step": 1})
    blob = torch.load(tmp_path / "c" / OPTIMIZER_STATE, weights_only=True)
    blob["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)]  # the old one-per-GPU format
    torch.save(blob, tmp_path / "c" / OPTIMIZER_STATE)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: False)
    fresh, fresh_optimizer, fresh_scheduler = toy(seed=1)
    with pytest.warns(UserWarning, match="CUDA random state but there is no GPU"):
        assert load_checkpoint(tmp_path / "c", fresh, fresh_optimizer, fresh_scheduler) == {
            "step": 1
        }
    assert calls and all(c.get("map_location") == "cpu" for c in calls)
    assert_same_tensors(weights_of(fresh), weights_of(net))


@pytest.mark.parametrize(
    "name", ["learner.safetensors", "optimizer.pt", "state.json", "samplers.safetensors"]
)
def test_a_truncated_checkpoint_file_is_a_one_line_error(tmp_path: Path, name: str):
    net, optimizer, scheduler = toy(seed=0)
    toy_step(net, optimizer, scheduler)
    extra = {"clusters": torch.arange(100)}
    save_checkpoint(tmp_path / "c", net, optimizer, scheduler, {"step": 1}, extra=extra)
    path = tmp_path / "c" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MetalmError, match=f"{name}: broken or truncated"):
        load_checkpoint(tmp_path / "c", *toy(seed=1))
        load_extra(tmp_path / "c")
