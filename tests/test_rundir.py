"""`metalm.rundir`: finding a run's checkpoint, also after an interrupted swap."""

from __future__ import annotations

import json
import os
from pathlib import Path

from run_tools import assert_same_tensors, checkpoint_twice, toy, weights_of

from metalm.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from metalm.rundir import find_checkpoint


def test_find_checkpoint_falls_back_to_old_after_an_interrupted_swap(tmp_path: Path):
    directory = tmp_path / "checkpoint"
    assert find_checkpoint(directory) is None
    step2 = checkpoint_twice(directory)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]

    # a run of an earlier metalm, which swapped through checkpoint.tmp/.old: a crash
    # between `checkpoint -> checkpoint.old` and `checkpoint.tmp -> checkpoint`, with the
    # next checkpoint half-written in checkpoint.tmp
    os.replace(directory, tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "learner.safetensors").write_bytes(b"\0" * 10)
    assert find_checkpoint(directory) == tmp_path / "checkpoint.old"
    other, other_optimizer, other_scheduler = toy(seed=5)
    state = load_checkpoint(find_checkpoint(directory), other, other_optimizer, other_scheduler)
    assert state == {"step": 2}
    assert_same_tensors(weights_of(other), step2)

    # the next save completes the swap and clears both leftovers
    save_checkpoint(directory, other, other_optimizer, other_scheduler, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((directory / "state.json").read_text()) == {"step": 3}

    # a crash while deleting checkpoint.old: the new checkpoint wins
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text('{"step": 2}')
    assert find_checkpoint(directory) == directory
