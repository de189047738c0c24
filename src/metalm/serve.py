"""`metalm serve`: an HTTP service over one pretrained model (FastAPI + uvicorn).

Clients create tasks from labeled examples, then classify texts with them::

    POST   /tasks                  {"examples": [{"text": ..., "label": ...}, ...]} -> task id
    POST   /tasks/{id}/classify    {"texts": [...]} -> label and probabilities per text
    GET    /tasks, GET /tasks/{id}, DELETE /tasks/{id}, GET /health, GET /openapi.json

Tasks are kept in memory and, with a tasks directory, on disk as safetensors + JSON
(never pickle), reloaded on restart. Requests are validated (pydantic) against the
limits of `ServeLimits`; bodies over `max_body_bytes` get 413 before they are parsed.

Example:
    >>> app = create_app("protonet-minilm", tasks_dir="tasks")
    >>> serve("protonet-minilm", port=8000)          # or: metalm serve --model ...
"""

import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

from metalm.classifier import FewShotClassifier
from metalm.errors import MetalmError

log = logging.getLogger("metalm.serve")
TASK_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ServeLimits:
    """What one request and the whole service may hold."""

    max_tasks: int = 100
    max_texts: int = 256
    max_text_chars: int = 2000
    max_labels: int = 200
    max_label_chars: int = 100
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
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


async def _plain(send: Any, status: int, detail: str) -> None:
    import json

    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class TooManyTasks(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the service holds its maximum of {limit} tasks; delete one first")


class TaskStore:
    """Adapted tasks by id, in memory and (optionally) in `directory/<id>/`."""

    def __init__(self, model: FewShotClassifier, directory: str | Path | None, max_tasks: int):
        self.model = model
        self.directory = Path(directory) if directory else None
        self.max_tasks = max_tasks
        self.tasks: dict[str, FewShotClassifier] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()  # one model call at a time; guards the dicts
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
        log.info("reloaded %d tasks from %s", len(self.tasks), self.directory)

    def create(self, texts: list[str], labels: list[Any]) -> "tuple[str, FewShotClassifier]":
        with self.lock:
            if len(self.tasks) >= self.max_tasks:
                raise TooManyTasks(self.max_tasks)
            clf = self.model.unfitted().adapt(texts, labels)
            task_id = uuid.uuid4().hex
            info = {"n_examples": len(texts), "created": time.time()}
            if self.directory:
                clf.save_task(self.directory / task_id, info=info)
            self.tasks[task_id] = clf
            self.info[task_id] = info
            return task_id, clf

    def get(self, task_id: str) -> FewShotClassifier | None:
        return self.tasks.get(task_id) if TASK_ID.match(task_id) else None

    def delete(self, task_id: str) -> bool:
        with self.lock:
            if self.get(task_id) is None:
                return False
            del self.tasks[task_id]
            self.info.pop(task_id, None)
            if self.directory:
                shutil.rmtree(self.directory / task_id, ignore_errors=True)
            return True

    def classify(self, clf: FewShotClassifier, texts: list[str]):
        with self.lock:
            return clf.predict_proba(texts)


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
        examples: list[Example] = Field(min_length=2, max_length=limits.max_texts)

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
        texts: list[Text] = Field(min_length=1, max_length=limits.max_texts)

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
):
    """The FastAPI application serving `model` (a model directory, Hub id or a loaded
    classifier); see the module docstring for the endpoints."""
    fastapi, _ = _require_fastapi()
    from fastapi import HTTPException, status
    from fastapi import Path as PathParam
    from fastapi.responses import JSONResponse

    limits = limits or ServeLimits()
    base = (
        model
        if isinstance(model, FewShotClassifier)
        else FewShotClassifier.from_pretrained(model, device=device)
    )
    store = TaskStore(base, tasks_dir, limits.max_tasks)

    m = api_models(limits)
    CreateTask, TaskInfo, ClassifyRequest = m.CreateTask, m.TaskInfo, m.ClassifyRequest
    Prediction, ClassifyResponse, TaskList = m.Prediction, m.ClassifyResponse, m.TaskList
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

    app = fastapi.FastAPI(
        title="metalm few-shot classifier",
        version="1",
        description="Adapt a meta-learned model to new tasks from a few labeled examples.",
    )

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            learner=base.learner.name,
            model=base.model_path,
            tasks=len(store.tasks),
            max_tasks=limits.max_tasks,
        )

    @app.post(
        "/tasks",
        response_model=TaskInfo,
        status_code=status.HTTP_201_CREATED,
        responses={
            409: {"model": Detail, "description": "the service holds its maximum of tasks"},
            **too_large,
        },
    )
    def create_task(request: CreateTask) -> TaskInfo:
        texts = [e.text for e in request.examples]
        labels = [e.label for e in request.examples]
        try:
            task_id, clf = store.create(texts, labels)
        except TooManyTasks as err:
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
        responses={**not_found, **too_large},
    )
    def classify(task_id: TaskIdParam, request: ClassifyRequest) -> ClassifyResponse:
        clf = found(task_id)
        classes = clf.classes_
        probs = store.classify(clf, request.texts)
        predictions = [
            Prediction(
                label=classes[int(row.argmax())],
                probability=float(row.max()),
                probabilities=[float(p) for p in row],
            )
            for row in probs
        ]
        return ClassifyResponse(task_id=task_id, classes=classes, predictions=predictions)

    @app.exception_handler(MetalmError)
    async def metalm_error(_request: Any, err: MetalmError) -> JSONResponse:
        # the shape of FastAPI's own 422 answers, so that the schema holds for all of them
        detail = [{"type": "value_error", "loc": ["body"], "msg": str(err)}]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.state.store = store
    app.state.limits = limits
    return app


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    tasks_dir: str | Path | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
) -> None:
    """Load `model` and serve it with uvicorn until interrupted.

    Example:
        >>> serve("protonet-minilm", port=8000, tasks_dir="tasks")
    """
    _, uvicorn = _require_fastapi()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    app = create_app(model, tasks_dir, limits, device)
    print(f"metalm serve: {model} on http://{host}:{port} (docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
