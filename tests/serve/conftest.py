"""What the tests of `metalm.serve` share: a model saved from the tiny random BERT of
tests/conftest.py, and the service on it, `serving` one of two ways: in this process
(`app`: FastAPI's TestClient on `create_app`, the fast lane) or as `metalm serve` in a
subprocess over real HTTP on a free localhost port (`server`: marked slow). The fixtures
`client` (the small `LIMITS`) and `locked` (the shipped limits and an API key) are each
one service for the package, in both ways."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from run_tools import Server

from metalm import FewShotClassifier, save_pretrained
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.serve import API_KEY_ENV, ServeLimits, create_app

# the small limits of these tests (`ServeLimits`' fields; `--max-tasks 20` and so on)
LIMITS = {
    "max_tasks": 20,
    "max_task_examples": 10,
    "max_batch_texts": 8,
    "max_text_chars": 200,
    "max_labels": 3,
    "max_body_bytes": 20_000,
}
EXAMPLES = [
    {"text": "set an alarm for six", "label": "alarm"},
    {"text": "wake me up at seven", "label": "alarm"},
    {"text": "what is the weather in paris", "label": "weather"},
    {"text": "will it rain tomorrow", "label": "weather"},
]
API_KEY = "s3cret-key"
# the two ways of serving: in this process, or `metalm serve` in a subprocess (slow)
HOW = ["app", pytest.param("server", marks=pytest.mark.slow)]


def small_server(model: Path, tasks_dir: Path, extra: tuple[str, ...] = (), **limits) -> Server:
    """`metalm serve` in a subprocess under the small `LIMITS` (those in `limits` changed)."""
    return Server(model, tasks_dir, extra=extra, **{**LIMITS, **limits})


@contextmanager
def serving(
    how: str, model: Path, tasks_dir: Path, api_key: str | None = None, **limits: float
) -> Iterator[httpx.Client]:
    """A client of the service on `model` with `tasks_dir` under `limits` (the shipped
    ones where not given), served `how`: "app" in this process, "server" by `metalm
    serve` in a subprocess (the API key from METALM_API_KEY)."""
    if how == "app":
        app = create_app(model, tasks_dir, ServeLimits(**limits), api_key=api_key)
        with TestClient(app) as http:
            yield http
        return
    env = {API_KEY_ENV: api_key} if api_key else None
    server = Server(model, tasks_dir, env=env, **limits)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield http
    finally:
        server.stop()


@pytest.fixture(scope="package")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = build_learner(encoder, parse_learner_config({"name": "protonet"}))
    return save_pretrained(learner, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="package")
def loaded_model(model_dir) -> FewShotClassifier:
    return FewShotClassifier.from_pretrained(model_dir)


@pytest.fixture(scope="package", params=HOW)
def client(request, model_dir, tmp_path_factory) -> Iterator[httpx.Client]:
    """The service under the small `LIMITS`, with a tasks directory."""
    tasks = tmp_path_factory.mktemp(f"serve-{request.param}") / "tasks"
    with serving(request.param, model_dir, tasks, **LIMITS) as http:
        yield http


@pytest.fixture
def task_id(client) -> Iterator[str]:
    response = client.post("/tasks", json={"examples": EXAMPLES})
    assert response.status_code == 201, response.text
    yield response.json()["task_id"]
    client.delete(f"/tasks/{response.json()['task_id']}")


@pytest.fixture(scope="package", params=HOW)
def locked(request, model_dir, tmp_path_factory) -> Iterator[httpx.Client]:
    """The service under the shipped default limits, with `API_KEY` (the client sends
    no key of its own)."""
    tasks = tmp_path_factory.mktemp(f"locked-{request.param}") / "tasks"
    with serving(request.param, model_dir, tasks, api_key=API_KEY) as http:
        yield http
