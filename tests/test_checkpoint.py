"""`metalm.checkpoint`: checkpoints round-trip weights, optimizer, scheduler and RNG, and
survive an interrupted swap."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from metalm import atomic
from metalm.atomic import new_path, old_path
from metalm.checkpoint import (
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights_atomic,
)
from metalm.config import TrainConfig
from metalm.errors import MetalmError
from metalm.rundir import find_checkpoint
from metalm.trainer import lr_lambda


class _Net(nn.Module):
    """A toy module with dropout, so that the torch RNG matters to training."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x))


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    net = _Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(TrainConfig(steps=10, warmup_steps=2))
    )
    return net, optimizer, scheduler


def _toy_step(net: nn.Module, optimizer, scheduler) -> None:
    net.train()
    loss = net(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"tensor {key!r} differs"


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, slots in a["state"].items():
        assert slots.keys() == b["state"][index].keys()
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name]))


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path: Path):
    net, optimizer, scheduler = _toy(seed=0)
    for _ in range(3):
        _toy_step(net, optimizer, scheduler)
    state = {"step": 3, "best_step": None, "val_history": [{"step": 2, "val_accuracy": 0.5}]}
    save_checkpoint(tmp_path / "checkpoint", net, optimizer, scheduler, state)
    saved_weights = _weights(net)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_lr = scheduler.get_last_lr()
    rand_after_save = torch.rand(5)
    _toy_step(net, optimizer, scheduler)  # what the uninterrupted run does next
    continued = _weights(net)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    fresh, fresh_optimizer, fresh_scheduler = _toy(seed=123)  # other weights, other RNG
    assert not torch.equal(fresh.lin.weight, saved_weights["lin.weight"])
    found = find_checkpoint(tmp_path / "checkpoint")
    assert found == tmp_path / "checkpoint"
    assert load_checkpoint(found, fresh, fresh_optimizer, fresh_scheduler) == state
    _assert_same_tensors(_weights(fresh), saved_weights)
    _assert_same_optimizer_state(fresh_optimizer.state_dict(), saved_optimizer)
    assert fresh_scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == saved_lr
    assert torch.equal(torch.rand(5), rand_after_save)
    _toy_step(fresh, fresh_optimizer, fresh_scheduler)  # dropout + AdamW + schedule
    _assert_same_tensors(_weights(fresh), continued)


@pytest.mark.parametrize("exchange", [True, False])
def test_checkpoint_swap_cut_short_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
):
    """Checkpoints are replaced by `metalm.atomic.replace_dir`; where its fallback swap
    (no renameat2) is cut between parking the old checkpoint and renaming the new one in,
    `find_checkpoint` restores the old one whole."""
    monkeypatch.setattr(atomic, "use_exchange", exchange)
    directory = tmp_path / "checkpoint"
    net, optimizer, scheduler = _toy()
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 1})
    _toy_step(net, optimizer, scheduler)
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 2})
    step2 = _weights(net)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    os.replace(directory, old_path(directory))  # the crash: old parked, new half-written
    new_path(directory).mkdir()
    (new_path(directory) / "learner.safetensors").write_bytes(b"\0" * 10)
    assert find_checkpoint(directory) == directory
    other, other_optimizer, other_scheduler = _toy(seed=5)
    assert load_checkpoint(directory, other, other_optimizer, other_scheduler) == {"step": 2}
    _assert_same_tensors(_weights(other), step2)
    save_checkpoint(directory, other, other_optimizer, other_scheduler, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((directory / "state.json").read_text()) == {"step": 3}


def test_weights_round_trip_and_mismatch(tmp_path: Path):
    net, _, _ = _toy(seed=0)
    path = tmp_path / "w.safetensors"
    save_weights_atomic(net, path)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    other, _, _ = _toy(seed=1)
    load_weights(other, path)
    _assert_same_tensors(_weights(other), _weights(net))
    with pytest.raises(MetalmError, match="do not fit"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(MetalmError, match="no such weights file"):
        load_weights(net, tmp_path / "missing.safetensors")
