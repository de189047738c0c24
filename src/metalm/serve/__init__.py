"""`metalm serve`: an HTTP service over one pretrained model (FastAPI + uvicorn).

Clients create tasks from labeled examples, then classify texts with them::

    POST   /tasks                  {"examples": [{"text": ..., "label": ...}, ...]} -> task id
    POST   /tasks/{id}/classify    {"texts": [...]} -> label and probabilities per text
    GET    /tasks, GET /tasks/{id}, DELETE /tasks/{id}, GET /health, GET /openapi.json

Tasks are kept in memory and, with a tasks directory, on disk as safetensors + JSON
(never pickle), reloaded on restart. Requests are validated (pydantic) against the
limits of `ServeLimits`; bodies over `max_body_bytes` get 413 before they are parsed.
With an API key, every path but /health and the docs needs `Authorization: Bearer KEY`
(401 otherwise). Model calls run one at a time on one worker thread; a request that has
not finished within `request_timeout` seconds gets 503 and its model work stops at the
next batch. SIGTERM/SIGINT stop accepting connections and finish the requests in flight.

Modules: `app` (create_app: the routes), `store` (TaskStore), `schemas` (the request and
response models), `middleware` (body size, API key), `limits` (ServeLimits, Deadline).

Example:
    >>> app = create_app(saved_model, tasks_dir="tasks")    # e.g. "protonet-minilm"
    >>> sorted({route.path for route in app.routes if route.path.startswith("/tasks/")})
    ['/tasks/{task_id}', '/tasks/{task_id}/classify', '/tasks/{task_id}/score']
    >>> serve("protonet-minilm", port=8000)  # or: metalm serve --model ...  # doctest: +SKIP
"""

import logging
import signal
from pathlib import Path
from typing import Any

from metalm.serve.app import _require_fastapi, create_app
from metalm.serve.limits import Deadline, ServeLimits, TimeLimit
from metalm.serve.middleware import API_KEY_ENV, OPEN_PATHS, BearerAuth, BodySizeLimit
from metalm.serve.schemas import api_models
from metalm.serve.store import TASK_ID, StoreFull, TaskStore, TooManyTasks, state_bytes

__all__ = [
    "API_KEY_ENV",
    "OPEN_PATHS",
    "TASK_ID",
    "BearerAuth",
    "BodySizeLimit",
    "Deadline",
    "ServeLimits",
    "StoreFull",
    "TaskStore",
    "TimeLimit",
    "TooManyTasks",
    "api_models",
    "create_app",
    "serve",
    "state_bytes",
]


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    tasks_dir: str | Path | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    quantize: str = "none",
    backend: str = "torch",
) -> None:
    """Load `model` and serve it with uvicorn until SIGTERM/SIGINT, which stop new
    connections and let requests in flight finish (for up to `shutdown_timeout` s).

    Example:
        >>> serve("protonet-minilm", port=8000, tasks_dir="tasks",
        ...       api_key="s3cret")  # doctest: +SKIP
    """
    _, uvicorn = _require_fastapi()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # uvicorn handles SIGTERM itself while it serves (a graceful stop), then raises it again
    # under the handler it found: this one, so that the stop ends with exit status 0
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        app = create_app(model, tasks_dir, limits, device, api_key, quantize, backend)
        auth = ", bearer-token auth" if api_key else ""
        print(f"metalm serve: {model} on http://{host}:{port} (docs at /docs{auth})", flush=True)
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=shutdown_timeout,
        )
    finally:
        print("metalm serve: stopped", flush=True)


def _exit_quietly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)
