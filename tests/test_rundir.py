"""`metalm.rundir`: finding a run's checkpoint, also after an interrupted swap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from metalm.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from metalm.config import TrainConfig
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


def test_find_checkpoint_falls_back_to_old_after_an_interrupted_swap(tmp_path: Path):
    directory = tmp_path / "checkpoint"
    assert find_checkpoint(directory) is None
    net, optimizer, scheduler = _toy()
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 1})
    _toy_step(net, optimizer, scheduler)
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 2})
    step2 = _weights(net)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    # a run of an earlier metalm, which swapped through checkpoint.tmp/.old: a crash
    # between `checkpoint -> checkpoint.old` and `checkpoint.tmp -> checkpoint`, with the
    # next checkpoint half-written in checkpoint.tmp
    os.replace(directory, tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "learner.safetensors").write_bytes(b"\0" * 10)
    assert find_checkpoint(directory) == tmp_path / "checkpoint.old"
    other, other_optimizer, other_scheduler = _toy(seed=5)
    state = load_checkpoint(find_checkpoint(directory), other, other_optimizer, other_scheduler)
    assert state == {"step": 2}
    _assert_same_tensors(_weights(other), step2)

    # the next save completes the swap and clears both leftovers
    save_checkpoint(directory, other, other_optimizer, other_scheduler, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((directory / "state.json").read_text()) == {"step": 3}

    # a crash while deleting checkpoint.old: the new checkpoint wins
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text('{"step": 2}')
    assert find_checkpoint(directory) == directory
