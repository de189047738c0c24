"""Fuzzing the HTTP API with schemathesis (Hypothesis underneath) against its own OpenAPI
document, over real HTTP to `metalm serve` in a subprocess: generated requests (valid and
not) to every operation, and stateful sequences create task → get / classify → delete
(→ use after delete), follow the links added here. Property: every answer is documented
(status, content type, body shape), never a 5xx, and every 4xx carries a `detail`
message; the server stays up and answers within the time limit (no hang)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fuzzing import DEFAULT_EXAMPLES, EXAMPLES, fuzz_settings
from hypothesis import given
from run_tools import OPERATIONS, free_port
from schemathesis import checks

from metalm import save_pretrained
from metalm.config import parse_learner_config
from metalm.learners import build_learner
from metalm.models.encoder import EncoderConfig, TextEncoder

# small limits, so that generated requests reach them; a short time limit: a hang is a 503
LIMITS = ["--max-tasks", "100000", "--max-task-examples", "8", "--max-batch-texts", "8"]
LIMITS += ["--max-text-chars", "200"]
LIMITS += ["--max-labels", "4", "--max-body-bytes", "20000", "--request-timeout", "20"]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`metalm serve` on a free localhost port, serving the tiny model; its base URL."""
    root = tmp_path_factory.mktemp("fuzz-serve")
    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir)))
    model = save_pretrained(
        build_learner(encoder, parse_learner_config({"name": "protonet"})), root / "model"
    )
    port = free_port()
    args = [sys.executable, "-m", "metalm.cli", "serve", "--model", str(model)]
    args += ["--port", str(port), "--tasks-dir", str(root / "tasks"), *LIMITS]
    env = {k: v for k, v in os.environ.items() if k != "METALM_API_KEY"}
    log = root / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
        assert process.poll() is None, f"the server died:\n{log.read_text()}"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def clear(server: str) -> None:
    """Delete every task of the service."""
    for task in httpx.get(server + "/tasks", timeout=60).json()["tasks"]:
        httpx.delete(f"{server}/tasks/{task['task_id']}", timeout=60)


def detail_on_4xx(_ctx: Any, response: Any, _case: Any) -> bool:
    """A 4xx answer says what was wrong: a non-empty `detail`."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), response.text
    return True


@pytest.fixture(scope="module")
def document(server: str) -> dict[str, Any]:
    """The service's OpenAPI document, with links from POST /tasks to the operations on
    the task it created (schemathesis follows them in the stateful run)."""
    document = httpx.get(server + "/openapi.json", timeout=30).json()
    paths = document["paths"]
    task = {"task_id": "$response.body#/task_id"}
    links = {
        "GetTask": {"operationId": paths["/tasks/{task_id}"]["get"]["operationId"]},
        "Classify": {"operationId": paths["/tasks/{task_id}/classify"]["post"]["operationId"]},
        "Score": {"operationId": paths["/tasks/{task_id}/score"]["post"]["operationId"]},
        "DeleteTask": {"operationId": paths["/tasks/{task_id}"]["delete"]["operationId"]},
    }
    for link in links.values():
        link["parameters"] = task
    paths["/tasks"]["post"]["responses"]["201"]["links"] = links
    deleted = {"GetDeleted": {"operationId": links["GetTask"]["operationId"]}}
    deleted["GetDeleted"]["parameters"] = {"task_id": "$request.path.task_id"}
    paths["/tasks/{task_id}"]["delete"]["responses"]["204"]["links"] = deleted
    return document


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("path, method", OPERATIONS)
def test_every_operation_answers_as_documented(
    path: str, method: str, examples: int, server: str, document: dict[str, Any]
) -> None:
    """Generated requests to each operation: DEFAULT_EXAMPLES / 4 each in the default
    run (300 in all), a third of `examples` each in the long one."""
    schema = schemathesis.openapi.from_dict(document)
    operation = schema[path][method]
    count = examples // (4 if examples == DEFAULT_EXAMPLES else 3)

    @fuzz_settings(count)
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=server, timeout=60)  # once: this answer is checked
        case.validate_response(response, checks=CHECKS)
        detail_on_4xx(None, response, case)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_stateful_create_classify_delete(
    examples: int, server: str, document: dict[str, Any]
) -> None:
    """schemathesis' state machine: sequences of create → get / classify → delete →
    get again (404), with generated bodies, checked like the single requests (50
    sequences, about 2,500 calls, in the default run; a tenth of `examples` in the long)."""
    schema = schemathesis.openapi.from_dict(document)
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": server, "timeout": 60}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen[f"{case.method} {case.operation.path} {response.status_code}"] += 1
            case.validate_response(response, checks=CHECKS)
            detail_on_4xx(None, response, case)

        def teardown(self) -> None:
            """Each sequence starts from an empty service: the same sequence, replayed
            while Hypothesis shrinks a failure, then meets the same state."""
            clear(server)

    seen: Counter[str] = Counter()
    clear(server)
    sequences = examples // (4 if examples == DEFAULT_EXAMPLES else 10)
    Workflow.run(settings=fuzz_settings(sequences))
    print(f"stateful: {sequences} sequences, {sum(seen.values())} calls", sorted(seen.items()))
    for call in ("POST /tasks 201", "POST /tasks/{task_id}/classify 200"):
        assert seen[call], f"no {call} in the sequences: {seen}"
    assert seen["DELETE /tasks/{task_id} 204"], f"no task deleted: {seen}"
