"""`metalm.serve.schemas`: requests outside the models' limits (texts, examples, labels,
batches) or malformed are answered 422 with what is wrong, and change nothing."""

from __future__ import annotations

import json

import pytest

from .conftest import EXAMPLES


def _examples(n_labels: int, per_label: int = 1) -> list[dict]:
    return [
        {"text": f"text {i} {j}", "label": f"l{i}"}
        for i in range(n_labels)
        for j in range(per_label)
    ]


BAD_TASKS = {
    "empty text": ([{"text": "", "label": "a"}, *EXAMPLES], 422, "at least 1 character"),
    "blank text": ([{"text": "   ", "label": "a"}, *EXAMPLES], 422, "pattern"),
    "oversized text": ([{"text": "x" * 201, "label": "a"}, *EXAMPLES], 422, "at most 200"),
    "too many examples": (_examples(2, 6), 422, "at most 10 items"),
    "too many labels": (_examples(4), 422, "2 to 3 distinct labels, got 4"),
    "one label": ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], 422, "got 1"),
    "no examples": ([], 422, "at least 2 items"),
    "float label": ([{"text": "a", "label": 1.5}, *EXAMPLES], 422, "label"),
    "missing label": ([{"text": "a"}, *EXAMPLES], 422, "Field required"),
}


@pytest.mark.parametrize("case", BAD_TASKS, ids=list(BAD_TASKS))
def test_bad_task_requests(case, client):
    examples, status, message = BAD_TASKS[case]
    before = len(client.get("/tasks").json()["tasks"])
    response = client.post("/tasks", json={"examples": examples})
    assert response.status_code == status
    assert message in json.dumps(response.json()["detail"])
    assert len(client.get("/tasks").json()["tasks"]) == before


BAD_CLASSIFY = {
    "empty text": ({"texts": ["ok", ""]}, 422, "at least 1 character"),
    "oversized text": ({"texts": ["y" * 201]}, 422, "at most 200"),
    "too many texts": ({"texts": ["t"] * 9}, 422, "at most 8 items"),
    "no texts": ({"texts": []}, 422, "at least 1 item"),
    "not a list": ({"texts": "hello"}, 422, "list"),
    "extra field": ({"texts": ["a"], "top_k": 3}, 422, "Extra inputs"),
    "not an object": ([1, 2], 422, "dictionary"),
}


@pytest.mark.parametrize("case", BAD_CLASSIFY, ids=list(BAD_CLASSIFY))
def test_bad_classify_requests(case, client, task_id):
    body, status, message = BAD_CLASSIFY[case]
    response = client.post(f"/tasks/{task_id}/classify", json=body)
    assert response.status_code == status
    assert message in json.dumps(response.json()["detail"])


def test_malformed_json(client, task_id):
    response = client.post(
        f"/tasks/{task_id}/classify",
        content=b'{"texts": ["a",',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_task_and_batch_limits_are_separate(client):
    """10 examples fit a task (--max-task-examples 10) though a batch holds 8 texts."""
    task = client.post("/tasks", json={"examples": _examples(2, 5)})
    assert task.status_code == 201 and task.json()["n_examples"] == 10
    tid = task.json()["task_id"]
    assert client.post(f"/tasks/{tid}/classify", json={"texts": ["a"] * 8}).status_code == 200
    assert client.post(f"/tasks/{tid}/classify", json={"texts": ["a"] * 9}).status_code == 422
    client.delete(f"/tasks/{tid}")
