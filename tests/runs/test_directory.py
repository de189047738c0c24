"""`metalm.runs.directory`: finding a run's checkpoint, also after an interrupted swap."""

from __future__ import annotations

import json
import os
from pathlib import Path

from run_tools import assert_same_tensors, checkpoint_twice, toy, weights_of

from metalm.atomic import new_path, old_path
from metalm.checkpoint import load_checkpoint, save_checkpoint
from metalm.runs.directory import find_checkpoint


def test_find_checkpoint_restores_a_swap_cut_short(tmp_path: Path):
    directory = tmp_path / "checkpoint"
    assert find_checkpoint(directory) is None
    step2 = checkpoint_twice(directory)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    # a crash between moving the checkpoint aside and the next one into place, with the
    # next checkpoint half-written
    os.replace(directory, old_path(directory))
    new_path(directory).mkdir()
    (new_path(directory) / "learner.safetensors").write_bytes(b"\0" * 10)
    assert find_checkpoint(directory) == directory  # put back
    other, other_optimizer, other_scheduler = toy(seed=5)
    state = load_checkpoint(find_checkpoint(directory), other, other_optimizer, other_scheduler)
    assert state == {"step": 2}
    assert_same_tensors(weights_of(other), step2)

    # the next save replaces the half-written one and leaves nothing else
    save_checkpoint(directory, other, other_optimizer, other_scheduler, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((directory / "state.json").read_text()) == {"step": 3}
