"""What the tests of `metalm.serve` share: a model saved from the tiny random BERT of
tests/conftest.py, and `metalm serve` on it in a subprocess on a free localhost port
(one for the package: small limits; one with the shipped limits and an API key)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from run_tools import Server

from metalm import FewShotClassifier, save_pretrained
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder

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


def small_server(model: Path, tasks_dir: Path, extra: tuple[str, ...] = (), **limits) -> Server:
    """`metalm serve` under the small `LIMITS` (those in `limits` changed)."""
    return Server(model, tasks_dir, extra=extra, **{**LIMITS, **limits})


@pytest.fixture(scope="package")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    learner = build_learner(encoder, parse_learner_config({"name": "protonet"}))
    return save_pretrained(learner, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="package")
def loaded_model(model_dir) -> FewShotClassifier:
    return FewShotClassifier.from_pretrained(model_dir)


@pytest.fixture(scope="package")
def server(model_dir, tmp_path_factory) -> Iterator[Server]:
    running = small_server(model_dir, tmp_path_factory.mktemp("serve-tasks") / "tasks")
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


@pytest.fixture(scope="package")
def locked_server(model_dir, tmp_path_factory) -> Iterator[Server]:
    """The shipped default limits, the API key from METALM_API_KEY."""
    tasks = tmp_path_factory.mktemp("locked") / "tasks"
    running = Server(model_dir, tasks, env={"METALM_API_KEY": API_KEY})
    yield running
    running.stop()
