"""`metalm.serve.app`: the routes of the service on a model saved from the tiny random
BERT, each in this process (FastAPI's TestClient) and, marked slow, over real HTTP to
`metalm serve` in a subprocess (conftest's `client`): health, a task's life cycle,
labels, unknown tasks, the score route, the OpenAPI document and the service keeping to
it (schemathesis: generated requests)."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from run_tools import LABELS, OPERATIONS, TEXTS
from schemathesis import checks

from metalm import FewShotClassifier
from metalm.serve import ServeLimits, create_app

from .conftest import EXAMPLES, LIMITS


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


def test_score_endpoint(client):
    created = client.post("/tasks", json={"examples": EXAMPLES})
    task = created.json()["task_id"]
    labeled = [{"text": "alarm at noon", "label": "alarm"}, {"text": "sunny?", "label": "weather"}]
    answer = client.post(f"/tasks/{task}/score", json={"examples": labeled})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["classes"] == ["alarm", "weather"] and body["n_texts"] == 2
    assert sum(map(sum, body["confusion"])) == 2
    diagonal = body["confusion"][0][0] + body["confusion"][1][1]
    assert body["accuracy"] == pytest.approx(diagonal / 2)
    unknown = client.post(
        f"/tasks/{task}/score", json={"examples": [{"text": "x", "label": "music"}]}
    )
    assert unknown.status_code == 422 and "music" in unknown.text
    assert (
        client.post("/tasks/" + "0" * 32 + "/score", json={"examples": labeled}).status_code == 404
    )


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


@pytest.fixture
def live_schema(client, loaded_model, tmp_path):
    """The API document the service gives, and the base URL to send its cases to (none:
    an application of its own in this process, whose lifespan schemathesis runs)."""
    if isinstance(client, TestClient):
        app = create_app(loaded_model, tmp_path / "tasks", ServeLimits(**LIMITS))
        return schemathesis.openapi.from_asgi("/openapi.json", app), None
    base_url = str(client.base_url).rstrip("/")
    return schemathesis.openapi.from_url(base_url + "/openapi.json"), base_url


@pytest.mark.parametrize("path, method", OPERATIONS)
def test_api_conforms_to_its_schema(path, method, live_schema):
    """Generated requests (valid and invalid) never crash the service, and every answer
    has a documented status, content type and body shape. (Hypothesis driven directly:
    schemathesis' pytest plugin does not run under pytest 9.)"""
    schema, base_url = live_schema
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case) -> None:
        case.call_and_validate(
            base_url=base_url,
            checks=[
                checks.not_a_server_error,
                checks.status_code_conformance,
                checks.content_type_conformance,
                checks.response_schema_conformance,
            ],
        )

    check()


@pytest.mark.slow
def test_serve_runs_on_an_untrained_export(frozen_model):
    pytest.importorskip("fastapi")

    client = TestClient(create_app(frozen_model))
    examples = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=True)]
    created = client.post("/tasks", json={"examples": examples})
    assert created.status_code == 201 and created.json()["classes"] == sorted(set(LABELS))
    answer = client.post(f"/tasks/{created.json()['task_id']}/classify", json={"texts": TEXTS})
    assert [p["label"] for p in answer.json()["predictions"]] == (
        FewShotClassifier.from_pretrained(frozen_model).adapt(TEXTS, LABELS).predict(TEXTS)
    )
