"""`metalm.serve.serve`: SIGTERM lets the request in flight finish, then the server exits 0."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import API_KEY, EXAMPLES, small_server


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(model_dir, tmp_path):
    """SIGTERM while a classify request is half-sent: the server waits for it, answers
    200, then exits 0. (--api-key given as a flag here.)"""
    server = small_server(model_dir, tmp_path / "tasks", extra=("--api-key", API_KEY))
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
