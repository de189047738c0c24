"""`metalm serve` over real HTTP: a uvicorn server in a subprocess on a free localhost
port, serving a model saved from the tiny random BERT of conftest.

Covers the endpoints, every kind of bad request, restarts that keep the tasks, the
OpenAPI document (schemathesis: generated requests against the live server), the
separate task/batch limits, bearer-token auth, the stored-bytes cap, the time limit and
graceful shutdown on SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from run_tools import LABELS, OPERATIONS, QUERIES, TEXTS, free_port
from schemathesis import checks

from metalm import FewShotClassifier, save_pretrained
from metalm.atomic import NEW_SUFFIX
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.serve import ServeLimits, create_app

LIMITS = {
    "max-tasks": 20,
    "max-task-examples": 10,
    "max-batch-texts": 8,
    "max-text-chars": 200,
    "max-labels": 3,
}
MAX_BODY = 20_000
EXAMPLES = [
    {"text": "set an alarm for six", "label": "alarm"},
    {"text": "wake me up at seven", "label": "alarm"},
    {"text": "what is the weather in paris", "label": "weather"},
    {"text": "will it rain tomorrow", "label": "weather"},
]


class Server:
    """`metalm serve` in a subprocess; `url` once /health answers."""

    def __init__(
        self,
        model: Path,
        tasks_dir: Path,
        defaults: bool = False,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
        **limits: float,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
        args += ["--port", str(self.port), "--tasks-dir", str(tasks_dir), *extra]
        if not defaults:  # the small limits of these tests, else the shipped defaults
            args += ["--max-body-bytes", str(MAX_BODY)]
            limits = {**LIMITS, **{k.replace("_", "-"): v for k, v in limits.items()}}
        for key, value in limits.items():
            args += [f"--{key}", str(value)]
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


@pytest.mark.parametrize("tid", ["0" * 32, "not-a-task", "..", "..%2F..%2Fetc"])
def test_unknown_task_is_404(client, tid):
    response = client.post(f"/tasks/{tid}/classify", json={"texts": ["hello"]})
    assert response.status_code == 404
    got = client.get(f"/tasks/{tid}")
    if tid == "..":  # the client resolves /tasks/.. to /: the page, not a task
        assert got.status_code == 200 and "text/html" in got.headers["content-type"]
    else:
        assert got.status_code == 404
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


@pytest.mark.slow
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
        server = Server(model_dir, tasks_dir, max_tasks=1000)
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
    last = Server(model_dir, tasks_dir, max_tasks=1000)
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


# -- OpenAPI: the document is valid, and the live server keeps to it --------------------
def test_openapi_document(client):
    document = client.get("/openapi.json").json()
    loaded = schemathesis.openapi.from_dict(document)  # raises on an invalid document
    paths = document["paths"]
    assert set(paths) == {
        "/health",
        "/tasks",
        "/tasks/{task_id}",
        "/tasks/{task_id}/classify",
        "/tasks/{task_id}/score",
    }  # the page at / and its files are left out of the API document
    assert {"409", "413", "422", "507"} <= set(paths["/tasks"]["post"]["responses"])
    assert "404" in paths["/tasks/{task_id}/classify"]["post"]["responses"]
    assert "404" in paths["/tasks/{task_id}/score"]["post"]["responses"]
    schemas = document["components"]["schemas"]
    text = schemas["ClassifyRequest"]["properties"]["texts"]
    assert text["maxItems"] == 8 and text["items"]["maxLength"] == 200
    assert schemas["CreateTask"]["properties"]["examples"]["maxItems"] == 10
    assert len(list(loaded.get_all_operations())) == 7


@pytest.fixture(scope="module")
def live_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


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


# -- limits, auth, stored bytes, time limit, graceful shutdown ---------------------------
def test_task_and_batch_limits_are_separate(client):
    """10 examples fit a task (--max-task-examples 10) though a batch holds 8 texts."""
    task = client.post("/tasks", json={"examples": _examples(2, 5)})
    assert task.status_code == 201 and task.json()["n_examples"] == 10
    tid = task.json()["task_id"]
    assert client.post(f"/tasks/{tid}/classify", json={"texts": ["a"] * 8}).status_code == 200
    assert client.post(f"/tasks/{tid}/classify", json={"texts": ["a"] * 9}).status_code == 422
    client.delete(f"/tasks/{tid}")


def _banking_sized(n_way: int = 77, k_shot: int = 5) -> list[dict]:
    """A task the size of BANKING77's 77-way 5-shot one (385 examples)."""
    return [
        {"text": f"question {j} about topic {i}", "label": f"intent_{i}"}
        for i in range(n_way)
        for j in range(k_shot)
    ]


API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def locked_server(model_dir, tmp_path_factory) -> Iterator[Server]:
    """The shipped default limits, the API key from METALM_API_KEY."""
    tasks = tmp_path_factory.mktemp("locked") / "tasks"
    running = Server(model_dir, tasks, defaults=True, env={"METALM_API_KEY": API_KEY})
    yield running
    running.stop()


@pytest.mark.slow
def test_default_limits_take_a_77_way_5_shot_task(locked_server):
    """The defaults take a 385-example task and a batch of 200 (one limit of 256 did not)."""
    auth = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=locked_server.url, timeout=60, headers=auth) as http:
        created = http.post("/tasks", json={"examples": _banking_sized()})
        assert created.status_code == 201, created.text
        assert created.json()["n_examples"] == 385 and len(created.json()["classes"]) == 77
        tid = created.json()["task_id"]
        texts = [f"a question about topic {i % 77}" for i in range(200)]
        result = http.post(f"/tasks/{tid}/classify", json={"texts": texts})
        assert result.status_code == 200 and len(result.json()["predictions"]) == 200
        assert http.get("/health").json()["stored_bytes"] > 0
        assert http.delete(f"/tasks/{tid}").status_code == 204
    assert ServeLimits().max_task_examples >= 2000


@pytest.mark.slow
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", ""],
    ids=["none", "wrong", "basic", "longer", "no-token", "empty"],
)
def test_auth_refuses_without_the_key(locked_server, header):
    headers = {} if header is None else {"authorization": header}
    for method, path in [("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/" + "0" * 32)]:
        response = httpx.request(
            method, locked_server.url + path, headers=headers, json={"examples": EXAMPLES}
        )
        assert response.status_code == 401, (method, path, response.text)
        assert "Authorization: Bearer" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.slow
def test_auth_accepts_the_key(locked_server):
    assert httpx.get(locked_server.url + "/health").status_code == 200  # open, for probes
    auth = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=locked_server.url, timeout=30, headers=auth) as http:
        assert http.get("/tasks").status_code == 200
        created = http.post("/tasks", json={"examples": EXAMPLES})
        assert created.status_code == 201
        tid = created.json()["task_id"]
        assert http.post(f"/tasks/{tid}/classify", json={"texts": ["hi"]}).status_code == 200
        assert http.delete(f"/tasks/{tid}").status_code == 204
    document = httpx.get(locked_server.url + "/openapi.json").json()
    assert "401" in document["paths"]["/tasks/{task_id}/classify"]["post"]["responses"]


@pytest.fixture(scope="module")
def loaded_model(model_dir):
    from metalm import FewShotClassifier

    return FewShotClassifier.from_pretrained(model_dir)


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


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(model_dir, tmp_path):
    """SIGTERM while a classify request is half-sent: the server waits for it, answers
    200, then exits 0. (--api-key given as a flag here.)"""
    server = Server(model_dir, tmp_path / "tasks", extra=("--api-key", API_KEY))
    auth = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=auth) as http:
        tid = http.post("/tasks", json={"examples": EXAMPLES}).json()["task_id"]
    go_on = threading.Event()
    outcome: dict[str, object] = {}

    def body() -> Iterator[bytes]:
        yield b'{"texts": ["alarm at noon", '
        go_on.wait(30)
        yield b'"is it sunny"]}'

    def client() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{server.url}/tasks/{tid}/classify",
                content=body(),
                headers={**auth, "content-type": "application/json"},
                timeout=60,
            )
        except httpx.HTTPError as err:
            outcome["error"] = err

    sender = threading.Thread(target=client)
    sender.start()
    try:
        time.sleep(1.0)  # the headers and half the body are in
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert server.process.poll() is None, "the server quit with a request in flight"
        go_on.set()
        sender.join(30)
        response = outcome.get("response")
        assert isinstance(response, httpx.Response), outcome
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 2
        assert server.process.wait(timeout=30) == 0
        assert "metalm serve: stopped" in server.log.read_text()
    finally:
        go_on.set()
        if server.process.poll() is None:
            server.stop()


def test_bad_settings_are_metalm_errors(loaded_model):
    from metalm.errors import MetalmError

    with pytest.raises(MetalmError, match="request_timeout must be > 0"):
        ServeLimits(request_timeout=0)
    with pytest.raises(MetalmError, match="max_batch_texts must be >= 1"):
        ServeLimits(max_batch_texts=0)
    with pytest.raises(MetalmError, match="API key is empty"):
        create_app(loaded_model, api_key=" ")


@pytest.mark.slow
def test_serve_runs_on_an_untrained_export(frozen_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from metalm.serve import create_app

    client = TestClient(create_app(frozen_model))
    examples = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=True)]
    created = client.post("/tasks", json={"examples": examples})
    assert created.status_code == 201 and created.json()["classes"] == sorted(set(LABELS))
    answer = client.post(f"/tasks/{created.json()['task_id']}/classify", json={"texts": TEXTS})
    assert [p["label"] for p in answer.json()["predictions"]] == (
        FewShotClassifier.from_pretrained(frozen_model).adapt(TEXTS, LABELS).predict(TEXTS)
    )
