"""`metalm.serve.limits`: the shipped limits take a BANKING77-sized task, a request past
its time limit gets 503 and the service goes on, bad settings are clear errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from metalm.serve import ServeLimits, create_app

from .conftest import API_KEY, EXAMPLES


def _banking_sized(n_way: int = 77, k_shot: int = 5) -> list[dict]:
    """A task the size of BANKING77's 77-way 5-shot one (385 examples)."""
    return [
        {"text": f"question {j} about topic {i}", "label": f"intent_{i}"}
        for i in range(n_way)
        for j in range(k_shot)
    ]


def test_default_limits_take_a_77_way_5_shot_task(locked):
    """The defaults take a 385-example task and a batch of 200 (one limit of 256 did not)."""
    auth = {"authorization": f"Bearer {API_KEY}"}
    created = locked.post("/tasks", json={"examples": _banking_sized()}, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["n_examples"] == 385 and len(created.json()["classes"]) == 77
    tid = created.json()["task_id"]
    texts = [f"a question about topic {i % 77}" for i in range(200)]
    result = locked.post(f"/tasks/{tid}/classify", json={"texts": texts}, headers=auth)
    assert result.status_code == 200 and len(result.json()["predictions"]) == 200
    assert locked.get("/health").json()["stored_bytes"] > 0
    assert locked.delete(f"/tasks/{tid}", headers=auth).status_code == 204
    assert ServeLimits().max_task_examples >= 2000


def test_time_limit(loaded_model):
    """A batch that cannot finish within --request-timeout gets 503 with a message, and
    the service keeps serving."""
    app = create_app(loaded_model, limits=ServeLimits(request_timeout=0.001))
    task_id, _ = app.state.store.create(
        [e["text"] for e in EXAMPLES], [e["label"] for e in EXAMPLES]
    )
    texts = [f"a long enough text number {i} " * 8 for i in range(1000)]
    with TestClient(app) as http:
        response = http.post(f"/tasks/{task_id}/classify", json={"texts": texts})
        assert response.status_code == 503, response.text
        assert "time limit of 0.001 s" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
        slow_task = http.post("/tasks", json={"examples": _banking_sized(20, 5)})
        assert slow_task.status_code == 503
        app.state.worker.submit(lambda: None).result()  # the abandoned work is over
        assert len(http.get("/tasks").json()["tasks"]) == 1  # the late task was not kept
        assert http.get("/health").status_code == 200
    roomy = create_app(loaded_model, limits=ServeLimits(request_timeout=60))
    task_id, _ = roomy.state.store.create(
        [e["text"] for e in EXAMPLES], [e["label"] for e in EXAMPLES]
    )
    with TestClient(roomy) as http:
        assert http.post(f"/tasks/{task_id}/classify", json={"texts": texts}).status_code == 200


def test_bad_settings_are_metalm_errors(loaded_model):
    from metalm.errors import MetalmError

    with pytest.raises(MetalmError, match="request_timeout must be > 0"):
        ServeLimits(request_timeout=0)
    with pytest.raises(MetalmError, match="max_batch_texts must be >= 1"):
        ServeLimits(max_batch_texts=0)
    with pytest.raises(MetalmError, match="API key is empty"):
        create_app(loaded_model, api_key=" ")
