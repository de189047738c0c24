"""`metalm.serve.middleware`: bodies over the limit get 413 (by Content-Length or counted
while they stream in); with an API key, every path but the open ones needs it (401)."""

from __future__ import annotations

import pytest

from .conftest import API_KEY, EXAMPLES


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


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", ""],
    ids=["none", "wrong", "basic", "longer", "no-token", "empty"],
)
def test_auth_refuses_without_the_key(locked, header):
    headers = {} if header is None else {"authorization": header}
    for method, path in [("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/" + "0" * 32)]:
        response = locked.request(method, path, headers=headers, json={"examples": EXAMPLES})
        assert response.status_code == 401, (method, path, response.text)
        assert "Authorization: Bearer" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_auth_accepts_the_key(locked):
    assert locked.get("/health").status_code == 200  # open, for probes
    auth = {"authorization": f"Bearer {API_KEY}"}
    assert locked.get("/tasks", headers=auth).status_code == 200
    created = locked.post("/tasks", json={"examples": EXAMPLES}, headers=auth)
    assert created.status_code == 201
    tid = created.json()["task_id"]
    classified = locked.post(f"/tasks/{tid}/classify", json={"texts": ["hi"]}, headers=auth)
    assert classified.status_code == 200
    assert locked.delete(f"/tasks/{tid}", headers=auth).status_code == 204
    document = locked.get("/openapi.json").json()
    assert "401" in document["paths"]["/tasks/{task_id}/classify"]["post"]["responses"]
