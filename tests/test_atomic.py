"""Nothing saved is lost: a process saves a model directory (`save_pretrained`) and
a task directory (`save_task`) over and over, alternating two versions, and is killed
with SIGKILL at random points; after every kill both directories load, each whole as
one of the two versions.

The saving loops are forked from one saver process (which loads the models once), so
each kill costs a fork, not a Python start-up. Half of the kills come from this process
after a random delay; the other half the loop deals itself just before its k-th
filesystem operation (k random, counted by an audit hook), so every step of a save is hit,
not only the slow ones. Every other kill runs the portable fallback swap (rename to a
backup) instead of Linux's atomic exchange."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_tools import tree_digest

from metalm.atomic import clear_unfinished, new_path, old_path, replace_dir
from metalm.classifier import FewShotClassifier
from metalm.pretrained import save_pretrained

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
KILLS = int(os.environ.get("METALM_KILLS", "40"))

# The saver: loads everything once, then forks one save loop per line of stdin
# ("<mode> <kill_at>"); it prints each loop's pid, then "exit <code>" once it is gone.
SAVER = r"""
import os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import metalm.pretrained as pretrained
from metalm import atomic
from metalm.classifier import FewShotClassifier
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder

tiny, base, model_dir, task_dir, errors = sys.argv[1:6]
versions = []
for shift in (0.0, 0.5):
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=tiny, max_length=16))
    learner = build_learner(encoder, parse_learner_config({"name": "protonet"}))
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(shift)
    versions.append(learner)
clf = FewShotClassifier.from_pretrained(base, device="cpu")
tasks = [
    clf.unfitted().adapt(["one", "two", "three", "four"], ["a", "a", "b", "b"]),
    clf.unfitted().adapt(["five", "six", "seven"], ["x", "y", "z"]),
]
EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"}


def save_forever(mode, kill_at):
    atomic.use_exchange = mode == "exchange"
    count = 0

    def hook(event, args):
        nonlocal count
        if event in EVENTS:
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    start, i = time.perf_counter(), 0
    while True:
        pretrained.save_pretrained(versions[i % 2], model_dir)
        tasks[i % 2].save_task(task_dir, info={"version": i % 2})
        i += 1
        if kill_at < 0 and i == 2:  # measuring: events and seconds per pair; version 0 aside
            with open(errors + ".measure", "w") as out:
                out.write(f"{count} {time.perf_counter() - start}")
            pretrained.save_pretrained(versions[0], model_dir + "-v0")
            tasks[0].save_task(task_dir + "-v0", info={"version": 0})
            return


print("ready", flush=True)
for line in sys.stdin:
    mode, kill_at = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(mode, int(kill_at))
        except BaseException:
            with open(errors, "a") as out:
                out.write(traceback.format_exc())
            if int(kill_at) >= 0:
                while True:  # stay until killed, so that the parent never kills a reused pid
                    signal.pause()
        os._exit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""


class Saver:
    """The saver process (our child) and its forked save loops (its children)."""

    def __init__(self, tiny: Path, base: Path, model: Path, task: Path, errors: Path):
        args = [sys.executable, "-c", SAVER, str(tiny), str(base), str(model), str(task)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.errors = errors
        self.process = subprocess.Popen(
            [*args, str(errors)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            self.process.wait(timeout=60)
            raise AssertionError(f"the saver exited ({self.process.returncode})")
        return line

    def start(self, mode: str, kill_at: int) -> int:
        """Fork a save loop; its pid."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{mode} {kill_at}\n")
        self.process.stdin.flush()
        return int(self.readline())

    def exit_code(self) -> int:
        """Wait for the save loop to end; its exit code (-9: killed)."""
        line = self.readline()
        assert line.startswith("exit"), line
        assert not self.errors.exists(), self.errors.read_text()
        return int(line.split()[1])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def load_both(model: Path, task: Path, base: FewShotClassifier) -> tuple[str, str]:
    """Load the model and the task (must succeed); the digests of their directories."""
    FewShotClassifier.from_pretrained(model, device="cpu")
    FewShotClassifier.load_task(task, model=base).predict(["one more"])
    return tree_digest(model), tree_digest(task)


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_old_or_new(tiny_model_dir, tmp_path):
    """After each of KILLS kills, the model and the task load, each byte for byte one of
    the two versions; kills leave both versions in place over the run."""
    from metalm.config import parse_learner_config
    from metalm.learners import build_learner
    from metalm.models.encoder import EncoderConfig, TextEncoder

    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    base_dir = save_pretrained(
        build_learner(encoder, parse_learner_config({"name": "protonet"})), tmp_path / "base"
    )
    base = FewShotClassifier.from_pretrained(base_dir, device="cpu")
    model, task = tmp_path / "out" / "model", tmp_path / "out" / "task"
    ref, errors = tmp_path / "ref", tmp_path / "errors"
    saver = Saver(tiny_model_dir, base_dir, model, task, errors)
    try:
        # the two versions, saved by a loop that is not killed; it also counts the
        # filesystem operations and seconds of one pair of saves
        saver.start("exchange", -1)
        assert saver.exit_code() == 0
        events, seconds = errors.with_suffix(".measure").read_text().split()
        events_per_pair, pair_seconds = int(events), float(seconds)
        versions = []
        for name, suffix in (("v0", "-v0"), ("v1", "")):
            shutil.copytree(model.with_name("model" + suffix), ref / name / "model")
            shutil.copytree(task.with_name("task" + suffix), ref / name / "task")
            versions.append(load_both(ref / name / "model", ref / name / "task", base))
        assert versions[0][0] != versions[1][0] and versions[0][1] != versions[1][1]

        rng = random.Random(0)
        seen = []
        for kill in range(KILLS):
            mode = "exchange" if kill % 2 == 0 else "fallback"
            by_event = kill % 4 in (0, 1)
            kill_at = rng.randint(1, 2 * events_per_pair) if by_event else 0
            pid = saver.start(mode, kill_at)
            if not by_event:
                time.sleep(rng.uniform(0, 3 * pair_seconds))
                os.kill(pid, signal.SIGKILL)  # the saver's child: it lives until killed
            assert saver.exit_code() == -signal.SIGKILL
            model_digest, task_digest = load_both(model, task, base)
            where = f"kill {kill} ({mode}, {f'event {kill_at}' if by_event else 'timed'})"
            assert model_digest in (versions[0][0], versions[1][0]), f"model mixed: {where}"
            assert task_digest in (versions[0][1], versions[1][1]), f"task mixed: {where}"
            seen.append((model_digest, task_digest))
    finally:
        saver.close()
    assert len({m for m, _ in seen}) == 2, "the kills never left the second model version"


def test_replace_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    """A writer that raises leaves the target as it was, and no temporary directory."""
    target = tmp_path / "model"
    replace_dir(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(directory: Path) -> None:
        (directory / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_dir(target, broken)
    assert (target / "a.txt").read_text() == "old" and not new_path(target).exists()


def test_an_interrupted_fallback_swap_is_recovered(tmp_path):
    """Killed between the fallback's two renames: no target, a whole backup; the next
    load puts the backup back."""
    target = tmp_path / "task"
    clf_dir = old_path(target)
    clf_dir.mkdir()
    (clf_dir / "task.json").write_text("{}")
    with pytest.raises(Exception, match="format_version"):
        FewShotClassifier.read_task_info(target)  # found it (then refused the empty JSON)
    assert (target / "task.json").exists() and not clf_dir.exists()


def test_saved_files_get_the_usual_permissions(tmp_path):
    def write(directory: Path) -> None:
        private = directory / "weights.bin"
        private.write_bytes(b"x")
        private.chmod(0o600)  # as safetensors creates its files

    target = replace_dir(tmp_path / "model", write)
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_clear_unfinished_deletes_cut_short_saves_and_restores_backups(tmp_path):
    """What a killed save leaves in a directory: a half-written `.x.metalm-new` (deleted)
    and, from the fallback swap, a whole `.y.metalm-old` without `y` (put back)."""
    kept = replace_dir(tmp_path / "kept", lambda d: (d / "a.txt").write_text("kept"))
    half = new_path(tmp_path / "x")
    half.mkdir()
    (half / "a.txt").write_text("half")
    backup = old_path(tmp_path / "y")
    backup.mkdir()
    (backup / "a.txt").write_text("whole")
    assert clear_unfinished(tmp_path) == [half]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "y"]
    assert (tmp_path / "y" / "a.txt").read_text() == "whole"
    assert (kept / "a.txt").read_text() == "kept"
