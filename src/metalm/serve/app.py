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

Example:
    >>> app = create_app(saved_model, tasks_dir="tasks")    # e.g. "protonet-minilm"
    >>> serve("protonet-minilm", port=8000)  # or: metalm serve --model ...  # doctest: +SKIP
"""

import asyncio
import hmac
import json
import logging
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import numpy as np

from metalm.classifier import FewShotClassifier
from metalm.errors import MetalmError

log = logging.getLogger("metalm.serve")
TASK_ID = re.compile(r"^[0-9a-f]{32}$")
API_KEY_ENV = "METALM_API_KEY"
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


@dataclass
class ServeLimits:
    """What one request and the whole service may hold.

    The defaults fit the standard benchmarks: a CLINC150 150-way 10-shot task (1,500
    examples) and BANKING77's test split in batches of up to 1,000 texts.
    """

    max_tasks: int = 100
    max_task_examples: int = 5000  # labeled examples in one POST /tasks
    max_batch_texts: int = 1000  # texts in one classify request
    max_text_chars: int = 2000
    max_labels: int = 200
    max_label_chars: int = 100
    max_body_bytes: int = 5_000_000
    max_store_bytes: int = 2_000_000_000  # task states of all stored tasks together
    request_timeout: float = 120.0  # seconds from a request's arrival to its answer

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name == "request_timeout" and not value > 0:
                raise MetalmError(f"serve limit {name} must be > 0 seconds, got {value}")
            if name != "request_timeout" and not value >= 1:
                raise MetalmError(f"serve limit {name} must be >= 1, got {value}")


def _require_fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise MetalmError(
            'metalm serve needs FastAPI and uvicorn: pip install "metalm[serve]"'
        ) from None
    return fastapi, uvicorn


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


class TooManyTasks(Exception):
    """The store holds its maximum number of tasks."""

    def __init__(self, limit: int):
        super().__init__(f"the service holds its maximum of {limit} tasks; delete one first")


class StoreFull(Exception):
    """A new task would take the stored task states over `max_store_bytes`."""

    def __init__(self, size: int, stored: int, limit: int):
        if size > limit:
            message = (
                f"this task's state takes {size} bytes, over the limit of {limit} bytes for "
                "all stored tasks (--max-store-bytes)"
            )
        else:
            message = (
                f"storing this task ({size} bytes) would take the stored tasks to "
                f"{stored + size} bytes, over the limit of {limit} (--max-store-bytes); "
                "delete a task first"
            )
        super().__init__(message)


class TimeLimit(Exception):
    """The request ran past its deadline; its model work stopped."""


class Deadline:
    """When a request must be answered by; `check` raises `TimeLimit` once it is past
    or the request was abandoned."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.abandoned = False

    @property
    def message(self) -> str:
        return (
            f"the request did not finish within the time limit of {self.seconds:g} s "
            "(--request-timeout); send fewer texts or retry later"
        )

    def check(self) -> None:
        if self.abandoned or time.monotonic() > self.at:
            raise TimeLimit(self.message)


def state_bytes(clf: FewShotClassifier) -> int:
    """Bytes of an adapted task's state tensors."""
    return sum(t.numel() * t.element_size() for t in (clf.state_ or {}).values())


class TaskStore:
    """Adapted tasks by id, in memory and (optionally) in `directory/<id>/`."""

    def __init__(
        self,
        model: FewShotClassifier,
        directory: str | Path | None,
        max_tasks: int,
        max_bytes: int = ServeLimits.max_store_bytes,
    ):
        self.model = model
        self.directory = Path(directory) if directory else None
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.tasks: dict[str, FewShotClassifier] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.sizes: dict[str, int] = {}
        self.lock = threading.Lock()  # guards the dicts and the directory
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._reload()

    def _reload(self) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.iterdir()):
            if not (path.is_dir() and TASK_ID.match(path.name)):
                continue
            try:
                clf = FewShotClassifier.load_task(path, model=self.model)
                meta = FewShotClassifier.read_task_info(path)
            except MetalmError as err:
                log.warning("skipping stored task %s: %s", path.name, err)
                continue
            self.tasks[path.name] = clf
            self.info[path.name] = dict(meta.get("info") or {})
            self.sizes[path.name] = state_bytes(clf)
        log.info("reloaded %d tasks from %s", len(self.tasks), self.directory)
        if self.stored_bytes > self.max_bytes:
            log.warning(
                "the reloaded tasks take %d bytes, over --max-store-bytes %d: new tasks are "
                "refused until some are deleted",
                self.stored_bytes,
                self.max_bytes,
            )

    @property
    def stored_bytes(self) -> int:
        """Bytes of all stored task states."""
        return sum(self.sizes.values())

    def create(
        self, texts: list[str], labels: list[Any], deadline: Deadline | None = None
    ) -> "tuple[str, FewShotClassifier]":
        """Adapt and store a new task (run on the model thread). Refused before adapting
        when the store is full of tasks, after adapting when its state would take the
        store over its byte limit or the deadline has passed."""
        if len(self.tasks) >= self.max_tasks:
            raise TooManyTasks(self.max_tasks)
        if deadline:
            deadline.check()
        clf = self.model.unfitted().adapt(texts, labels)
        size = state_bytes(clf)
        with self.lock:
            if deadline:
                deadline.check()  # the client has its 503: keep nothing
            if len(self.tasks) >= self.max_tasks:
                raise TooManyTasks(self.max_tasks)
            if self.stored_bytes + size > self.max_bytes:
                raise StoreFull(size, self.stored_bytes, self.max_bytes)
            task_id = uuid.uuid4().hex
            info = {"n_examples": len(texts), "created": time.time()}
            if self.directory:
                clf.save_task(self.directory / task_id, info=info)
            self.tasks[task_id] = clf
            self.info[task_id] = info
            self.sizes[task_id] = size
            return task_id, clf

    def get(self, task_id: str) -> FewShotClassifier | None:
        return self.tasks.get(task_id) if TASK_ID.match(task_id) else None

    def delete(self, task_id: str) -> bool:
        with self.lock:
            if self.get(task_id) is None:
                return False
            del self.tasks[task_id]
            self.info.pop(task_id, None)
            self.sizes.pop(task_id, None)
            if self.directory:
                shutil.rmtree(self.directory / task_id, ignore_errors=True)
            return True

    def classify(
        self, clf: FewShotClassifier, texts: list[str], deadline: Deadline | None = None
    ) -> np.ndarray:
        """Class probabilities of `texts` (run on the model thread): length-sorted
        batches of the classifier's batch size, the deadline checked before each."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), len(clf.classes_)), dtype=np.float32)
        for start in range(0, len(order), clf.batch_size):
            if deadline:
                deadline.check()
            rows = order[start : start + clf.batch_size]
            out[rows] = clf.predict_proba([texts[i] for i in rows])
        return out


def api_models(limits: ServeLimits) -> SimpleNamespace:
    """The request and response models, with `limits` in their constraints (so that
    they show in the OpenAPI schema)."""
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        StrictInt,
        StringConstraints,
        model_validator,
    )

    Text = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_text_chars, pattern=r"\S")
    ]
    LabelName = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_label_chars, pattern=r"\S")
    ]
    Label = LabelName | StrictInt

    class Example(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Text
        label: Label

    class CreateTask(BaseModel):
        """Labeled examples of a new task: at least 2 distinct labels."""

        model_config = ConfigDict(extra="forbid")
        examples: list[Example] = Field(min_length=2, max_length=limits.max_task_examples)

        @model_validator(mode="after")
        def _label_count(self) -> "CreateTask":
            distinct = len({e.label for e in self.examples})
            if not 2 <= distinct <= limits.max_labels:
                raise ValueError(
                    f"a task needs 2 to {limits.max_labels} distinct labels, got {distinct}"
                )
            return self

    class TaskInfo(BaseModel):
        task_id: str
        classes: list[Label]
        n_examples: int
        learner: str

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Text] = Field(min_length=1, max_length=limits.max_batch_texts)

    class Prediction(BaseModel):
        label: Label
        probability: float
        probabilities: list[float] = Field(description="one per class, in `classes` order")

    class ClassifyResponse(BaseModel):
        task_id: str
        classes: list[Label]
        predictions: list[Prediction]

    class TaskList(BaseModel):
        tasks: list[TaskInfo]

    class Health(BaseModel):
        status: str
        learner: str
        model: str
        tasks: int
        max_tasks: int
        stored_bytes: int
        max_store_bytes: int

    class Detail(BaseModel):
        detail: str

    return SimpleNamespace(
        CreateTask=CreateTask,
        TaskInfo=TaskInfo,
        ClassifyRequest=ClassifyRequest,
        Prediction=Prediction,
        ClassifyResponse=ClassifyResponse,
        TaskList=TaskList,
        Health=Health,
        Detail=Detail,
    )


def create_app(
    model: str | Path | FewShotClassifier,
    tasks_dir: str | Path | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    api_key: str | None = None,
    quantize: str = "none",
):
    """The FastAPI application serving `model` (a model directory, Hub id or a loaded
    classifier); see the module docstring for the endpoints. With `api_key`, requests
    need `Authorization: Bearer <api_key>`."""
    fastapi, _ = _require_fastapi()
    from fastapi import HTTPException, status
    from fastapi import Path as PathParam
    from fastapi.responses import JSONResponse, Response

    limits = limits or ServeLimits()
    if api_key is not None and not api_key.strip():
        raise MetalmError("the API key is empty; give a non-empty --api-key or METALM_API_KEY")
    base = (
        model
        if isinstance(model, FewShotClassifier)
        else FewShotClassifier.from_pretrained(model, device=device, quantize=quantize)
    )
    store = TaskStore(base, tasks_dir, limits.max_tasks, limits.max_store_bytes)
    # every model call runs here, one at a time, on one thread with torch's thread settings
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metalm-model")

    async def on_model_thread(call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args, deadline)` on the model thread; 503 past the request's deadline."""
        deadline = Deadline(limits.request_timeout)
        future = worker.submit(call, *args, deadline)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout)
        except (asyncio.TimeoutError, TimeLimit):  # on 3.10 not the builtin TimeoutError
            deadline.abandoned = True  # a running call stops at its next check
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, deadline.message, headers={"Retry-After": "1"}
            ) from None

    m = api_models(limits)
    CreateTask, TaskInfo, ClassifyRequest = m.CreateTask, m.TaskInfo, m.ClassifyRequest
    ClassifyResponse, TaskList = m.ClassifyResponse, m.TaskList
    Health, Detail = m.Health, m.Detail

    def describe(task_id: str, clf: FewShotClassifier) -> TaskInfo:
        info = store.info.get(task_id, {})
        return TaskInfo(
            task_id=task_id,
            classes=clf.classes_,
            n_examples=int(info.get("n_examples", 0)),
            learner=clf.learner.name,
        )

    def found(task_id: str) -> FewShotClassifier:
        clf = store.get(task_id)
        if clf is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")
        return clf

    TaskIdParam = Annotated[str, PathParam(max_length=64, description="a task id from POST /tasks")]
    not_found = {404: {"model": Detail, "description": "no such task"}}
    too_large = {413: {"model": Detail, "description": "request body too large"}}
    too_slow = {503: {"model": Detail, "description": "over the time limit (--request-timeout)"}}
    # a body that cannot be decoded at all (not UTF-8 text): Starlette answers 400 itself
    bad_body = {400: {"model": Detail, "description": "the body is not UTF-8 JSON text"}}
    locked = {401: {"model": Detail, "description": "missing or wrong API key"}} if api_key else {}

    @asynccontextmanager
    async def lifespan(_app: Any):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(
        title="metalm few-shot classifier",
        version="1",
        description="Adapt a meta-learned model to new tasks from a few labeled examples.",
        lifespan=lifespan,
        responses=locked,
    )

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            learner=base.learner.name,
            model=base.model_path,
            tasks=len(store.tasks),
            max_tasks=limits.max_tasks,
            stored_bytes=store.stored_bytes,
            max_store_bytes=limits.max_store_bytes,
        )

    @app.post(
        "/tasks",
        response_model=TaskInfo,
        status_code=status.HTTP_201_CREATED,
        responses={
            409: {
                "model": Detail,
                "description": "the service holds its maximum of tasks or of stored bytes",
            },
            **too_large,
            **too_slow,
            **bad_body,
        },
    )
    async def create_task(request: CreateTask) -> TaskInfo:
        texts = [e.text for e in request.examples]
        labels = [e.label for e in request.examples]
        try:
            task_id, clf = await on_model_thread(store.create, texts, labels)
        except (TooManyTasks, StoreFull) as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
        return describe(task_id, clf)

    @app.get("/tasks", response_model=TaskList)
    def list_tasks() -> TaskList:
        return TaskList(tasks=[describe(i, c) for i, c in list(store.tasks.items())])

    @app.get("/tasks/{task_id}", response_model=TaskInfo, responses=not_found)
    def get_task(task_id: TaskIdParam) -> TaskInfo:
        return describe(task_id, found(task_id))

    @app.delete("/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=not_found)
    def delete_task(task_id: TaskIdParam) -> None:
        if not store.delete(task_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")

    @app.post(
        "/tasks/{task_id}/classify",
        response_model=ClassifyResponse,
        responses={**not_found, **too_large, **too_slow, **bad_body},
    )
    async def classify(task_id: TaskIdParam, request: ClassifyRequest) -> Response:
        clf = found(task_id)
        classes = clf.classes_
        probs = await on_model_thread(store.classify, clf, request.texts)
        # the answer as JSON straight from the array: building and re-validating one
        # pydantic object per text cost more than the JSON itself
        rows = probs.tolist()
        best = probs.argmax(axis=1).tolist()
        body = {
            "task_id": task_id,
            "classes": classes,
            "predictions": [
                {"label": classes[i], "probability": row[i], "probabilities": row}
                for i, row in zip(best, rows, strict=True)
            ],
        }
        return Response(json.dumps(body).encode(), media_type="application/json")

    @app.exception_handler(MetalmError)
    async def metalm_error(_request: Any, err: MetalmError) -> JSONResponse:
        # the shape of FastAPI's own 422 answers, so that the schema holds for all of them
        detail = [{"type": "value_error", "loc": ["body"], "msg": str(err)}]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)  # outermost: before the body is read
    app.state.store = store
    app.state.worker = worker
    app.state.limits = limits
    return app


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
        app = create_app(model, tasks_dir, limits, device, api_key, quantize)
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
