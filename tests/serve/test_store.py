"""`metalm.serve.store`: the number of tasks and their stored bytes are capped; a tasks
directory keeps them across restarts, and every task answered 201 survives SIGKILL
under load with no half-written directory left."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from run_tools import LABELS, QUERIES, TEXTS

from metalm import FewShotClassifier
from metalm.atomic import NEW_SUFFIX
from metalm.serve import ServeLimits, create_app

from .conftest import EXAMPLES, HOW, LIMITS, serving, small_server


@pytest.mark.parametrize("how", HOW)
def test_too_many_tasks_then_restart_keeps_tasks(how, model_dir, tmp_path):
    tasks_dir = tmp_path / "tasks"
    limits = {**LIMITS, "max_tasks": 2}
    with serving(how, model_dir, tasks_dir, **limits) as http:
        ids = [http.post("/tasks", json={"examples": EXAMPLES}).json()["task_id"] for _ in "ab"]
        full = http.post("/tasks", json={"examples": EXAMPLES})
        assert full.status_code == 409 and "maximum of 2 tasks" in full.json()["detail"]
        texts = {"texts": ["alarm at noon", "is it sunny"]}
        before = http.post(f"/tasks/{ids[0]}/classify", json=texts).json()
        assert http.delete(f"/tasks/{ids[1]}").status_code == 204
    stored = sorted(p.name for p in tasks_dir.iterdir())
    assert stored == [ids[0]]
    assert sorted(p.name for p in (tasks_dir / ids[0]).iterdir()) == [
        "task.json",
        "task.safetensors",
    ]
    with serving(how, model_dir, tasks_dir, **limits) as http:
        listed = http.get("/tasks").json()["tasks"]
        assert [t["task_id"] for t in listed] == [ids[0]] and listed[0]["n_examples"] == 4
        after = http.post(f"/tasks/{ids[0]}/classify", json=texts).json()
        assert after == before
        assert http.get("/health").json()["tasks"] == 1


def _create_until_gone(
    url: str, stop: threading.Event, numbers: Iterator[int], created: dict, answered: list
) -> None:
    """Create tasks (each with its own texts) until `stop` or the server is gone; record
    each answer's status in `answered`, and each task answered 201 in `created` (id →
    examples)."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            n = next(numbers)
            texts = [f"{text} (task {n})" for text in TEXTS]
            examples = [{"text": t, "label": y} for t, y in zip(texts, LABELS, strict=True)]
            try:
                response = http.post("/tasks", json={"examples": examples})
            except httpx.HTTPError:
                return  # the server is gone
            answered.append(response.status_code)
            if response.status_code == 201:
                created[response.json()["task_id"]] = examples


@pytest.mark.slow
def test_sigkill_under_load_keeps_every_created_task(model_dir, tmp_path):
    """Four clients create tasks as fast as they can; the server is killed (SIGKILL) at a
    random moment, three times over. After the last restart, every task whose creation was
    answered 201 is listed and classifies exactly as the same task adapted in this process,
    and no half-written task directory is left behind."""
    tasks_dir = tmp_path / "tasks"
    created: dict[str, list[dict]] = {}
    numbers = itertools.count()
    rng = random.Random(0)
    for _round in range(3):
        server = small_server(model_dir, tasks_dir, max_tasks=1000)
        stop, answered = threading.Event(), []
        clients = [
            threading.Thread(
                target=_create_until_gone, args=(server.url, stop, numbers, created, answered)
            )
            for _ in "abcd"
        ]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while len(answered) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        server.process.kill()
        server.process.wait()
        stop.set()
        for client in clients:
            client.join(30)
        assert len(answered) >= 5 and set(answered) == {201}, server.log.read_text()

    reference = FewShotClassifier.from_pretrained(model_dir, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server: the head's fit stops where the sums take it
    last = small_server(model_dir, tasks_dir, max_tasks=1000)
    try:
        with httpx.Client(base_url=last.url, timeout=30) as http:
            listed = {t["task_id"] for t in http.get("/tasks").json()["tasks"]}
            assert set(created) <= listed, f"lost {len(set(created) - listed)} tasks"
            for task_id, examples in created.items():
                body = {"texts": QUERIES[:3]}
                served = http.post(f"/tasks/{task_id}/classify", json=body).json()
                own = reference.unfitted().adapt(
                    [e["text"] for e in examples], [e["label"] for e in examples]
                )
                expected = own.predict_proba(QUERIES[:3])
                got = [p["probabilities"] for p in served["predictions"]]
                assert served["classes"] == list(own.classes_)
                assert abs(expected - got).max() < 1e-5, task_id
    finally:
        torch.set_num_threads(threads)
        last.stop()
    assert not [p for p in tasks_dir.iterdir() if p.name.endswith(NEW_SUFFIX)]
    assert "skipping stored task" not in last.log.read_text()


def test_stored_bytes_cap(loaded_model, tmp_path):
    with TestClient(create_app(loaded_model)) as http:  # the default cap: one task's size
        assert http.post("/tasks", json={"examples": EXAMPLES}).status_code == 201
        size = http.get("/health").json()["stored_bytes"]
    assert size > 0
    limits = ServeLimits(max_store_bytes=size + size // 2)
    with TestClient(create_app(loaded_model, tmp_path / "tasks", limits)) as http:
        first = http.post("/tasks", json={"examples": EXAMPLES})
        assert first.status_code == 201
        second = http.post("/tasks", json={"examples": EXAMPLES})
        assert second.status_code == 409
        detail = second.json()["detail"]
        assert f"over the limit of {size + size // 2}" in detail and "delete a task" in detail
        assert len(http.get("/tasks").json()["tasks"]) == 1
        assert len(list((tmp_path / "tasks").iterdir())) == 1  # nothing written for it
        assert http.delete(f"/tasks/{first.json()['task_id']}").status_code == 204
        assert http.post("/tasks", json={"examples": EXAMPLES}).status_code == 201
    with TestClient(create_app(loaded_model, limits=ServeLimits(max_store_bytes=1))) as http:
        refused = http.post("/tasks", json={"examples": EXAMPLES})
        assert refused.status_code == 409
        assert "over the limit of 1 bytes for all stored tasks" in refused.json()["detail"]
