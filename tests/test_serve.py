"""`metalm serve` over real HTTP: a uvicorn server in a subprocess on a free localhost
port, serving a model saved from the tiny random BERT of conftest.

Covers the endpoints, every kind of bad request, restarts that keep the tasks, and the
OpenAPI document (schemathesis: generated requests against the live server)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from metalm import save_pretrained
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder

LIMITS = {"max-tasks": 20, "max-texts": 8, "max-text-chars": 200, "max-labels": 3}
MAX_BODY = 20_000
EXAMPLES = [
    {"text": "set an alarm for six", "label": "alarm"},
    {"text": "wake me up at seven", "label": "alarm"},
    {"text": "what is the weather in paris", "label": "weather"},
    {"text": "will it rain tomorrow", "label": "weather"},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`metalm serve` in a subprocess; `url` once /health answers."""

    def __init__(self, model: Path, tasks_dir: Path, **limits: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
        args += ["--port", str(self.port), "--tasks-dir", str(tasks_dir)]
        args += ["--max-body-bytes", str(MAX_BODY)]
        for key, value in {**LIMITS, **{k.replace("_", "-"): v for k, v in limits.items()}}.items():
            args += [f"--{key}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = build_learner(encoder, parse_learner_config({"name": "protonet"}))
    return save_pretrained(learner, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[Server]:
    running = Server(model_dir, tmp_path_factory.mktemp("serve-tasks") / "tasks")
    yield running
    running.stop()


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture
def task_id(client) -> Iterator[str]:
    response = client.post("/tasks", json={"examples": EXAMPLES})
    assert response.status_code == 201, response.text
    yield response.json()["task_id"]
    client.delete(f"/tasks/{response.json()['task_id']}")


def test_health(client, model_dir):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["learner"] == "protonet"
    assert body["model"] == str(model_dir.resolve()) and body["max_tasks"] == 20


def test_task_life_cycle(client):
    created = client.post("/tasks", json={"examples": EXAMPLES})
    assert created.status_code == 201
    task = created.json()
    assert task["classes"] == ["alarm", "weather"] and task["n_examples"] == 4
    tid = task["task_id"]
    texts = ["alarm at noon", "is it sunny", "set an alarm for six"]
    result = client.post(f"/tasks/{tid}/classify", json={"texts": texts})
    assert result.status_code == 200
    body = result.json()
    assert body["classes"] == ["alarm", "weather"] and len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        probs = prediction["probabilities"]
        assert abs(sum(probs) - 1) < 1e-5 and prediction["probability"] == max(probs)
        assert prediction["label"] == body["classes"][probs.index(max(probs))]
    assert body["predictions"][2]["label"] == "alarm"  # a support text: its own class
    again = client.post(f"/tasks/{tid}/classify", json={"texts": texts}).json()
    assert again == body  # deterministic
    assert tid in [t["task_id"] for t in client.get("/tasks").json()["tasks"]]
    assert client.get(f"/tasks/{tid}").json() == task
    assert client.delete(f"/tasks/{tid}").status_code == 204
    assert client.get(f"/tasks/{tid}").status_code == 404
    assert client.delete(f"/tasks/{tid}").status_code == 404
    assert tid not in [t["task_id"] for t in client.get("/tasks").json()["tasks"]]


def test_integer_labels(client):
    examples = [{"text": e["text"], "label": i // 2} for i, e in enumerate(EXAMPLES)]
    task = client.post("/tasks", json={"examples": examples}).json()
    assert task["classes"] == [0, 1]
    body = client.post(f"/tasks/{task['task_id']}/classify", json={"texts": ["hi"]}).json()
    assert body["predictions"][0]["label"] in (0, 1)
    client.delete(f"/tasks/{task['task_id']}")


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
    "too many examples": (_examples(2, 5), 422, "at most 8 items"),
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


@pytest.mark.parametrize("tid", ["0" * 32, "not-a-task", "..", "..%2F..%2Fetc"])
def test_unknown_task_is_404(client, tid):
    response = client.post(f"/tasks/{tid}/classify", json={"texts": ["hello"]})
    assert response.status_code == 404
    assert client.get(f"/tasks/{tid}").status_code == 404
    if "%" not in tid and tid != "..":
        assert "no task" in response.json()["detail"]


def test_body_too_large_is_413(client, task_id):
    big = {"texts": ["z" * 150] * 200}  # ~31 kB, over the 20 kB limit
    response = client.post(f"/tasks/{task_id}/classify", json=big)
    assert response.status_code == 413 and "over 20000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"texts": ['
        for _ in range(300):
            yield b'"' + b"z" * 100 + b'",'
        yield b'"end"]}'

    streamed = client.post(
        f"/tasks/{task_id}/classify", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    # the server is still fine
    ok = client.post(f"/tasks/{task_id}/classify", json={"texts": ["hello"]})
    assert ok.status_code == 200


def test_too_many_tasks_then_restart_keeps_tasks(model_dir, tmp_path):
    tasks_dir = tmp_path / "tasks"
    first = Server(model_dir, tasks_dir, max_tasks=2)
    try:
        with httpx.Client(base_url=first.url, timeout=30) as http:
            ids = [http.post("/tasks", json={"examples": EXAMPLES}).json()["task_id"] for _ in "ab"]
            full = http.post("/tasks", json={"examples": EXAMPLES})
            assert full.status_code == 409 and "maximum of 2 tasks" in full.json()["detail"]
            texts = {"texts": ["alarm at noon", "is it sunny"]}
            before = http.post(f"/tasks/{ids[0]}/classify", json=texts).json()
            assert http.delete(f"/tasks/{ids[1]}").status_code == 204
    finally:
        first.stop()
    stored = sorted(p.name for p in tasks_dir.iterdir())
    assert stored == [ids[0]]
    assert sorted(p.name for p in (tasks_dir / ids[0]).iterdir()) == [
        "task.json",
        "task.safetensors",
    ]
    second = Server(model_dir, tasks_dir, max_tasks=2)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as http:
            listed = http.get("/tasks").json()["tasks"]
            assert [t["task_id"] for t in listed] == [ids[0]] and listed[0]["n_examples"] == 4
            after = http.post(f"/tasks/{ids[0]}/classify", json=texts).json()
            assert after == before
            assert http.get("/health").json()["tasks"] == 1
    finally:
        second.stop()


# -- OpenAPI: the document is valid, and the live server keeps to it --------------------
def test_openapi_document(client):
    document = client.get("/openapi.json").json()
    loaded = schemathesis.openapi.from_dict(document)  # raises on an invalid document
    paths = document["paths"]
    assert set(paths) == {"/health", "/tasks", "/tasks/{task_id}", "/tasks/{task_id}/classify"}
    assert {"409", "413", "422"} <= set(paths["/tasks"]["post"]["responses"])
    assert "404" in paths["/tasks/{task_id}/classify"]["post"]["responses"]
    text = document["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]
    assert text["maxItems"] == 8 and text["items"]["maxLength"] == 200
    assert len(list(loaded.get_all_operations())) == 6


@pytest.fixture(scope="module")
def live_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


OPERATIONS = [
    ("/health", "GET"),
    ("/tasks", "GET"),
    ("/tasks", "POST"),
    ("/tasks/{task_id}", "GET"),
    ("/tasks/{task_id}", "DELETE"),
    ("/tasks/{task_id}/classify", "POST"),
]


@pytest.mark.parametrize("path, method", OPERATIONS)
def test_api_conforms_to_its_schema(path, method, live_schema, server):
    """Generated requests (valid and invalid) never crash the server, and every answer
    has a documented status, content type and body shape. (Hypothesis driven directly:
    schemathesis' pytest plugin does not run under pytest 9.)"""
    operation = live_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case) -> None:
        case.call_and_validate(
            base_url=server.url,
            checks=[
                checks.not_a_server_error,
                checks.status_code_conformance,
                checks.content_type_conformance,
                checks.response_schema_conformance,
            ],
        )

    check()
