"""ASGI middleware that answers before the application reads a request: body size, API key.

`BodySizeLimit` answers 413 for a body over the limit; `BearerAuth` answers 401 without
the API key (`API_KEY_ENV` names its environment variable), except on `OPEN_PATHS`.
"""

import hmac
import json
from typing import Any

API_KEY_ENV = "METALM_API_KEY"
OPEN_PATHS = frozenset(
    {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    | {"/", "/ui/app.js", "/ui/style.css"}  # the page; it sends the key with its requests
)


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (by its Content-Length,
    or counted while it streams in), before the application reads it."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _plain(send, 400, "invalid Content-Length header")
                return
            if int(length) > self.max_bytes:
                await _plain(send, 413, f"request body over {self.max_bytes} bytes")
                return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _plain(send, 413, f"request body over {self.max_bytes} bytes")
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: 401 for a request without `Authorization: Bearer <api_key>`
    (compared in constant time), before its body is read; /health and the API docs
    stay open."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = b""
            for name, value in scope.get("headers") or []:
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                detail = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                await _plain(send, 401, detail, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def _plain(
    send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(payload)),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
