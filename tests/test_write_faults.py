"""Saves that run out of room: a process under a small file-size limit (`ulimit -f`)
saves a model directory, a task directory and a checkpoint over earlier versions; each
save fails with a `WriteFailed` error that says what happened, and each earlier version
is still there, byte for byte, and loads. The service answers such a failure with 507
and keeps nothing of the task.

Each test runs in this process (`here`: Python ignores SIGXFSZ, so a write past the
limit fails with EFBIG; the limit is lifted again right after) and, marked slow, in a
child process (`child`: `write_fault_child.py`, `metalm serve` under `ulimit -f`)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import write_fault_child
from fastapi.testclient import TestClient
from run_tools import LABELS, QUERIES, TEXTS, free_port, tiny_learner, tree_digest

from metalm import FewShotClassifier, save_pretrained
from metalm.atomic import NEW_SUFFIX
from metalm.checkpoint import load_checkpoint, save_checkpoint
from metalm.serve import create_app

HERE = Path(__file__).parent
# in this process, or (slow) in a child process
WHERE = ["here", pytest.param("child", marks=pytest.mark.slow)]


def _first_versions(tiny_model_dir: Path, work: Path) -> None:
    learner = tiny_learner(tiny_model_dir, "protonet")
    save_pretrained(learner, work / "model")
    task = FewShotClassifier.from_pretrained(work / "model", device="cpu").adapt(TEXTS, LABELS)
    task.save_task(work / "task")
    optimizer = torch.optim.AdamW(learner.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    save_checkpoint(work / "checkpoint", learner, optimizer, scheduler, {"step": 1})


def _predictions(work: Path) -> tuple[list[str], list[str]]:
    model = FewShotClassifier.from_pretrained(work / "model", device="cpu")
    own = model.unfitted().adapt(TEXTS, LABELS).predict(QUERIES)
    stored = FewShotClassifier.load_task(work / "task", model=model).predict(QUERIES)
    return list(own), list(stored)


@pytest.mark.parametrize("where", WHERE)
def test_saves_out_of_room_keep_the_earlier_versions(where, tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "work"
    _first_versions(tiny_model_dir, work)
    digests = {name: tree_digest(work / name) for name in ("model", "task", "checkpoint")}
    before = _predictions(work)

    if where == "child":
        child = [sys.executable, str(HERE / "write_fault_child.py"), str(tiny_model_dir)]
        done = subprocess.run([*child, str(work)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        printed = done.stdout
    else:
        capsys.readouterr()
        write_fault_child.main(tiny_model_dir, work)
        printed = capsys.readouterr().out
    outcome = json.loads(printed.strip().splitlines()[-1])

    for name, message in outcome.items():
        assert message.startswith(f"could not save {work / name}: "), (name, message)
        assert "File too large" in message and "file-size limit" in message
        assert "the version saved before is intact" in message
        assert tree_digest(work / name) == digests[name], f"{name} changed"
    assert sorted(outcome) == ["checkpoint", "model", "task"]
    assert not [p for p in work.iterdir() if p.name.endswith(NEW_SUFFIX)]
    assert _predictions(work) == before
    learner = tiny_learner(tiny_model_dir, "protonet")
    optimizer = torch.optim.AdamW(learner.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    assert load_checkpoint(work / "checkpoint", learner, optimizer, scheduler) == {"step": 1}


EXAMPLES = [{"text": t, "label": label} for t, label in zip(TEXTS, LABELS, strict=True)]


def _serve(model: Path, tasks: Path, file_limit: int | None) -> tuple[subprocess.Popen, str]:
    """`metalm serve` in a subprocess (its output to /dev/null, which no file-size limit
    touches); the process and its URL once /health answers."""
    port = free_port()
    args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
    args += ["--port", str(port), "--tasks-dir", str(tasks)]

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def _serving(where: str, model: Path, tasks: Path, file_limit: int | None) -> Iterator:
    """A client of the service on `model` with `tasks`, its files under `file_limit`
    bytes: the application in this process (the limit set while the client is open), or
    `metalm serve` in a child process under the limit."""
    if where == "child":
        process, url = _serve(model, tasks, file_limit)
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                yield http
        finally:
            _stop(process)
        return
    with TestClient(create_app(model, tasks, device="cpu")) as http:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, hard))
        try:
            yield http
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def served_model(tiny_model_dir, tmp_path_factory) -> Path:
    learner = tiny_learner(tiny_model_dir, "protonet")
    return save_pretrained(learner, tmp_path_factory.mktemp("write-faults") / "model")


@pytest.mark.parametrize("where", WHERE)
def test_serve_answers_507_when_the_tasks_directory_is_out_of_room(where, served_model, tmp_path):
    """Under a file-size limit that a 3-class task fits in and a 40-class one does not: the
    small task is 201, the large one 507 with a message, and nothing of it is kept; after
    a restart without the limit, the small task is there and classifies as before."""
    tasks = tmp_path / "tasks"
    many = [{"text": f"example {i} of class {i % 40}", "label": f"c{i % 40}"} for i in range(80)]
    probe = FewShotClassifier.from_pretrained(served_model, device="cpu")
    small_dir = probe.unfitted().adapt(TEXTS, LABELS).save_task(tmp_path / "small")
    large_dir = probe.unfitted().adapt([e["text"] for e in many], [e["label"] for e in many])
    large_dir = large_dir.save_task(tmp_path / "large")
    largest = {d: max(p.stat().st_size for p in d.iterdir()) for d in (small_dir, large_dir)}
    assert largest[small_dir] < largest[large_dir]
    file_limit = (largest[small_dir] + largest[large_dir]) // 2

    with _serving(where, served_model, tasks, file_limit) as http:
        small = http.post("/tasks", json={"examples": EXAMPLES})
        assert small.status_code == 201, small.text
        task_id = small.json()["task_id"]
        before = http.post(f"/tasks/{task_id}/classify", json={"texts": QUERIES}).json()
        large = http.post("/tasks", json={"examples": many})
        assert large.status_code == 507, large.text
        detail = large.json()["detail"]
        assert "could not save" in detail and "File too large" in detail
        assert [t["task_id"] for t in http.get("/tasks").json()["tasks"]] == [task_id]
    assert sorted(p.name for p in tasks.iterdir()) == [task_id]

    with _serving(where, served_model, tasks, None) as http:
        after = http.post(f"/tasks/{task_id}/classify", json={"texts": QUERIES}).json()
    assert after == before
