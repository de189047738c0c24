"""Helpers of the top-level tests: shared texts and files, toy modules, run logs, kill-resume."""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from metalm import FewShotClassifier
from metalm.checkpoint import save_checkpoint
from metalm.config import TrainConfig, parse_learner_config
from metalm.learners import LEARNERS, build_learner
from metalm.models.base import build_model
from metalm.models.encoder import EncoderConfig
from metalm.runs.directory import find_checkpoint
from metalm.scoring import ScoreResult
from metalm.trainer import lr_lambda

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SUPPORT = REPO_ROOT / "examples" / "intents_train_3.csv"
EXAMPLE_QUERY = REPO_ROOT / "examples" / "intents_test.csv"
OWN_FILES = [f"data.test.support={EXAMPLE_SUPPORT}", f"data.test.query={EXAMPLE_QUERY}"]


# -- a 3-way 2-shot task with string labels, and texts to classify -----------------------
TEXTS = [
    "set an alarm for six",
    "wake me up at seven",
    "what is the weather in paris",
    "will it rain tomorrow",
    "play some jazz music",
    "put on my workout playlist",
]
LABELS = ["alarm", "alarm", "weather", "weather", "music", "music"]
QUERIES = ["alarm at noon please", "is it sunny", "play a song", "rain in london", "hello"]
TEST_TEXTS = ["alarm at noon please", "is it sunny", "play a song", "rain in london", "music now"]
TEST_LABELS = ["alarm", "weather", "music", "weather", "music"]


@functools.cache
def _loaded_model(kind: str, model_dir: str, num_layers: int):
    """The model in `model_dir` (`max_length` 16), loaded once a process: `tiny_learner`
    takes a copy of it, sharing the tokenizer (which nothing changes)."""
    return build_model(
        EncoderConfig(kind=kind, name_or_path=model_dir, max_length=16, num_layers=num_layers)
    )


def tiny_learner(model_dir: Path, name: str, num_layers: int = 0, **config):
    """Learner `name` on the model in `model_dir`, with weights nudged away from any fresh
    load (a causal LM's own weights stay: only its adapters are saved), in eval mode."""
    kind = LEARNERS[name].model_kind
    loaded = _loaded_model(kind, str(model_dir), num_layers)
    model = copy.deepcopy(loaded, {id(loaded.tokenizer): loaded.tokenizer})
    learner = build_learner(model, parse_learner_config({"name": name, **config}))
    name_of = {id(p): n for n, p in learner.named_parameters()}
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in learner.parameters():
            if kind == "encoder" or "lora_" in name_of[id(parameter)]:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return learner.eval()


def probabilities(learner, queries: list[str]) -> np.ndarray:
    """`learner`'s class probabilities for `queries`, adapted to TEXTS / LABELS."""
    return FewShotClassifier(learner).adapt(TEXTS, LABELS).predict_proba(queries)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """`stderr` is what the CLI prints for an error users can fix: `error: ...` on one
    line, no traceback, each of `fragments` in it."""
    assert stderr.startswith("error: "), stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, repr(stderr)
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in {stderr!r}"


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tagged_rows(classes: dict[str, int], tag: str) -> list[tuple[str, str]]:
    """`n` made-up texts of each class `c` in `classes` (`{c: n}`), marked with `tag`."""
    return [(f"{tag} text {i} about {c}", c) for c, n in classes.items() for i in range(n)]


def assert_consistent(result: ScoreResult | dict) -> None:
    """Per-class numbers and confused pairs follow from the confusion matrix."""
    data = result.as_dict() if isinstance(result, ScoreResult) else result
    classes, counts = data["classes"], np.asarray(data["confusion"])
    assert counts.shape == (len(classes), len(classes))
    assert data["accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    for i, row in enumerate(data["per_class"]):
        assert row["label"] == classes[i] and row["support"] == counts[i].sum()
        assert row["predicted"] == counts[:, i].sum()
    off = counts.copy()
    np.fill_diagonal(off, 0)
    pairs = data["confused_pairs"]
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    for pair in pairs:
        i, j = classes.index(pair["true"]), classes.index(pair["predicted"])
        assert i != j and pair["count"] == counts[i, j] > 0
        assert pair["rate"] == pytest.approx(counts[i, j] / counts[i].sum())
    # the listed pairs are the largest off-diagonal cells
    largest = sorted(off.ravel(), reverse=True)[: len(pairs)]
    assert [p["count"] for p in pairs] == [c for c in largest if c > 0]


# -- a toy module, its training step, and bitwise comparisons ----------------------------
class ToyNet(nn.Module):
    """A toy module with dropout, so that the torch RNG matters to training."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x))


def toy(seed: int = 0):
    """A ToyNet seeded with `seed`, its AdamW and a warm-up-then-decay schedule."""
    torch.manual_seed(seed)
    net = ToyNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(TrainConfig(steps=10, warmup_steps=2))
    )
    return net, optimizer, scheduler


def toy_step(net: nn.Module, optimizer, scheduler) -> None:
    net.train()
    loss = net(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def checkpoint_twice(directory: Path) -> dict[str, torch.Tensor]:
    """A toy's checkpoint of step 1 saved to `directory`, then replaced by that of step 2;
    the weights of step 2."""
    net, optimizer, scheduler = toy()
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 1})
    toy_step(net, optimizer, scheduler)
    save_checkpoint(directory, net, optimizer, scheduler, {"step": 2})
    return weights_of(net)


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], context: str = ""
) -> None:
    assert a.keys() == b.keys(), context
    for key in a:
        assert torch.equal(a[key], b[key]), f"tensor {key!r} differs {context}".rstrip()


# -- servers -------------------------------------------------------------------------------
def tree_digest(directory: Path) -> str:
    """A hash of every file's relative path and bytes under `directory`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# every operation of `metalm serve`'s API
OPERATIONS = [
    ("/health", "GET"),
    ("/tasks", "GET"),
    ("/tasks", "POST"),
    ("/tasks/{task_id}", "GET"),
    ("/tasks/{task_id}", "DELETE"),
    ("/tasks/{task_id}/classify", "POST"),
    ("/tasks/{task_id}/score", "POST"),
]


class Server:
    """`metalm serve --model MODEL --tasks-dir TASKS_DIR` in a subprocess on a free
    localhost port (each of `limits` as its flag: `max_tasks=2` is `--max-tasks 2`, the
    shipped defaults otherwise); `url` once /health answers, its output in `log`."""

    def __init__(
        self,
        model: Path,
        tasks_dir: Path,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
        **limits: float,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
        args += ["--port", str(self.port), "--tasks-dir", str(tasks_dir), *extra]
        for key, value in limits.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.log = tasks_dir.parent / f"server-{self.port}.log"
        with open(self.log, "w") as log:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- run directories; a run killed by SIGKILL, then resumed -------------------------------
def read_log(run_dir: Path) -> list[dict]:
    """The records of a finished run's log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def logged_steps(log: Path) -> list[int]:
    """Steps of the complete lines of a log that another process may be appending to."""
    if not log.exists():
        return []
    complete = log.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line)["step"] for line in complete]


def one_thread_env(**extra: str) -> dict[str, str]:
    """This environment with one torch thread per process (as one machine would give all
    of them the same count), so that runs side by side share the cores; plus `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return {**env, **extra}


class Killed(NamedTuple):
    """Run B at its SIGKILL: the steps it had logged, the step of its checkpoint."""

    logged: list[int]
    step: int


def kill_b_then_resume(
    train_a: list[str],
    train_b: list[str],
    resume_b: list[str],
    run_b: Path,
    *,
    kill_after: int,
    steps: int,
    env: dict[str, str],
    timeout: float,
    errors: Path,
    victim: Callable[[int], int | None] = lambda pid: pid,
) -> Killed:
    """Start runs A and B (commands `train_a`, `train_b`; B's run directory `run_b`) side
    by side; once B has logged step `kill_after`, SIGKILL `victim(pid of B)` (B's own
    process by default) and check that the kill landed mid-run (B running, a checkpoint
    before step `steps`, no report); then `resume_b`, and let A finish. The stderr of A,
    B and the resume go to a.err, b.err, resume.err in `errors`."""
    err_a, err_b, err_resume = (errors / f"{n}.err" for n in ("a", "b", "resume"))
    deadline = time.monotonic() + timeout
    with open(err_a, "w") as ea, open(err_b, "w") as eb:
        out = subprocess.DEVNULL
        proc_a = subprocess.Popen(train_a, env=env, stdout=out, stderr=ea)
        proc_b = subprocess.Popen(train_b, env=env, stdout=out, stderr=eb)
    try:
        while max(logged_steps(run_b / "log.jsonl"), default=0) < kill_after:
            if proc_b.poll() is not None:
                pytest.fail(
                    f"run B exited (rc {proc_b.returncode}) before logging step "
                    f"{kill_after}:\n{err_b.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"run B did not reach step {kill_after} in {timeout:.0f} s")
            time.sleep(0.005)
        alive = proc_b.poll() is None
        pid = victim(proc_b.pid)
        assert pid is not None, "the process to kill in run B was not found"
        os.kill(pid, signal.SIGKILL)
        assert proc_b.wait(timeout=60) != 0, "run B ended well after the SIGKILL"

        killed_log = logged_steps(run_b / "log.jsonl")
        found = find_checkpoint(run_b / "checkpoint")  # may be checkpoint.old mid-swap
        assert found is not None, f"no checkpoint after the kill (log {killed_log})"
        killed_at = json.loads((found / "state.json").read_text())["step"]
        assert alive and killed_at < steps and not (run_b / "report.json").exists(), (
            f"the SIGKILL landed after run B had finished training (checkpoint at step "
            f"{killed_at} of {steps}, log {killed_log}); the test needs a mid-run kill"
        )

        with open(err_resume, "w") as er:
            resumed = subprocess.run(
                resume_b,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=er,
                timeout=max(10.0, deadline - time.monotonic()),
            )
        assert resumed.returncode == 0, f"resume failed:\n{err_resume.read_text()[-3000:]}"
        try:
            proc_a.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run A did not finish in {timeout:.0f} s")
        assert proc_a.returncode == 0, f"run A failed:\n{err_a.read_text()[-3000:]}"
    finally:
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Killed(killed_log, killed_at)


def assert_same_runs(run_a: Path, run_b: Path, steps: int, context: str) -> tuple[dict, dict]:
    """Runs A and B trained alike: B logged every step once, both the same loss, lr and
    validation accuracy at each; the same best and final checkpoint weights, bitwise; the
    same training summary in report.json. Returns both reports."""
    log_a, log_b = read_log(run_a), read_log(run_b)
    assert [r["step"] for r in log_b] == list(range(1, steps + 1)), context
    fields = ("step", "loss", "lr", "val_accuracy")
    assert [[r.get(f) for f in fields] for r in log_a] == [
        [r.get(f) for f in fields] for r in log_b
    ], context
    for name in ("best.safetensors", "checkpoint/learner.safetensors"):
        assert_same_tensors(load_file(run_a / name), load_file(run_b / name), f"{name} {context}")
    report_a = json.loads((run_a / "report.json").read_text())
    report_b = json.loads((run_b / "report.json").read_text())
    assert report_a["train"] == report_b["train"], context
    return report_a, report_b
