"""The FastAPI application: the routes over one model, its task store and its model thread.

`create_app` loads the model and puts together the store, the one worker thread that runs
every model call, the routes (one function per group) and the middleware.
"""

import asyncio
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

from metalm.classifier import FewShotClassifier
from metalm.errors import MetalmError, WriteFailed
from metalm.serve.limits import Deadline, ServeLimits, TimeLimit
from metalm.serve.middleware import API_KEY_ENV, BearerAuth, BodySizeLimit
from metalm.serve.schemas import api_models
from metalm.serve.store import StoreFull, TaskStore, TooManyTasks

ModelCall = Callable[..., Any]  # async `run(call, *args)`: `call(*args, deadline)`, its result


def _require_fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise MetalmError(
            'metalm serve needs FastAPI and uvicorn: pip install "metalm[serve]"'
        ) from None
    return fastapi, uvicorn


def create_app(
    model: str | Path | FewShotClassifier,
    tasks_dir: str | Path | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    api_key: str | None = None,
    quantize: str = "none",
    backend: str = "torch",
):
    """The FastAPI application serving `model` (a model directory, Hub id or a loaded
    classifier); see the module docstring for the endpoints. With `api_key`, requests
    need `Authorization: Bearer <api_key>`; `backend="onnx"`: the encoder on ONNX
    Runtime."""
    fastapi, _ = _require_fastapi()
    limits = limits or ServeLimits()
    if api_key is not None and not api_key.strip():
        raise MetalmError(f"the API key is empty; give a non-empty --api-key or {API_KEY_ENV}")
    base = (
        model
        if isinstance(model, FewShotClassifier)
        else FewShotClassifier.from_pretrained(
            model, device=device, quantize=quantize, backend=backend
        )
    )
    store = TaskStore(base, tasks_dir, limits.max_tasks, limits.max_store_bytes)
    worker, on_model_thread = _model_thread(limits.request_timeout)
    m = api_models(limits)
    docs = _error_docs(m.Detail)
    locked = {401: {"model": m.Detail, "description": "missing or wrong API key"}}

    @asynccontextmanager
    async def lifespan(_app: Any):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(
        title="metalm few-shot classifier",
        version="1",
        description="Adapt a meta-learned model to new tasks from a few labeled examples.",
        lifespan=lifespan,
        responses=locked if api_key else {},
    )
    _add_health_route(app, m, base, store, limits)
    _add_task_routes(app, m, docs, store, on_model_thread)
    _add_classify_route(app, m, docs, store, on_model_thread)
    _add_score_route(app, m, docs, store, on_model_thread)
    _add_page_routes(app)
    _add_error_handler(app)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)  # outermost: before the body is read
    app.state.store = store
    app.state.worker = worker
    app.state.limits = limits
    return app


def _model_thread(timeout: float) -> tuple[ThreadPoolExecutor, ModelCall]:
    """The one worker thread that runs every model call, and the async runner of a call
    on it within `timeout` seconds of the request."""
    from fastapi import HTTPException, status

    # every model call runs here, one at a time, on one thread with torch's thread settings
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metalm-model")

    async def on_model_thread(call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args, deadline)` on the model thread; 503 past the request's deadline."""
        deadline = Deadline(timeout)
        future = worker.submit(call, *args, deadline)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (asyncio.TimeoutError, TimeLimit):  # on 3.10 not the builtin TimeoutError
            deadline.abandoned = True  # a running call stops at its next check
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, deadline.message, headers={"Retry-After": "1"}
            ) from None

    return worker, on_model_thread


def _error_docs(Detail: type) -> SimpleNamespace:
    """The error answers that routes list in the OpenAPI schema."""
    return SimpleNamespace(
        not_found={404: {"model": Detail, "description": "no such task"}},
        too_large={413: {"model": Detail, "description": "request body too large"}},
        too_slow={503: {"model": Detail, "description": "over the time limit (--request-timeout)"}},
        # a body that cannot be decoded at all (not UTF-8 text): Starlette answers 400 itself
        bad_body={400: {"model": Detail, "description": "the body is not UTF-8 JSON text"}},
    )


def _task_id_param() -> Any:
    from fastapi import Path as PathParam

    return Annotated[str, PathParam(max_length=64, description="a task id from POST /tasks")]


def _found(store: TaskStore, task_id: str) -> FewShotClassifier:
    """The task `task_id`; 404 if there is none."""
    from fastapi import HTTPException, status

    clf = store.get(task_id)
    if clf is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")
    return clf


def _add_health_route(
    app: Any, m: SimpleNamespace, base: FewShotClassifier, store: TaskStore, limits: ServeLimits
) -> None:
    """GET /health."""
    Health = m.Health

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


def _add_task_routes(
    app: Any, m: SimpleNamespace, docs: SimpleNamespace, store: TaskStore, run: ModelCall
) -> None:
    """POST /tasks, GET /tasks, GET /tasks/{id}, DELETE /tasks/{id}."""
    from fastapi import HTTPException, status

    CreateTask, TaskInfo, TaskList = m.CreateTask, m.TaskInfo, m.TaskList
    TaskIdParam = _task_id_param()

    def describe(task_id: str, clf: FewShotClassifier) -> TaskInfo:
        info = store.info.get(task_id, {})
        return TaskInfo(
            task_id=task_id,
            classes=clf.classes_,
            n_examples=int(info.get("n_examples", 0)),
            learner=clf.learner.name,
        )

    full = {
        "model": m.Detail,
        "description": "the service holds its maximum of tasks or of stored bytes",
    }
    no_room = {
        "model": m.Detail,
        "description": "the tasks directory is out of room (disk, quota or file-size limit)",
    }

    @app.post(
        "/tasks",
        response_model=TaskInfo,
        status_code=status.HTTP_201_CREATED,
        responses={409: full, 507: no_room, **docs.too_large, **docs.too_slow, **docs.bad_body},
    )
    async def create_task(request: CreateTask) -> TaskInfo:
        texts = [e.text for e in request.examples]
        labels = [e.label for e in request.examples]
        try:
            task_id, clf = await run(store.create, texts, labels)
        except (TooManyTasks, StoreFull) as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
        except WriteFailed as err:  # nothing kept: the client may try again later
            raise HTTPException(status.HTTP_507_INSUFFICIENT_STORAGE, str(err)) from None
        return describe(task_id, clf)

    @app.get("/tasks", response_model=TaskList)
    def list_tasks() -> TaskList:
        return TaskList(tasks=[describe(i, c) for i, c in list(store.tasks.items())])

    @app.get("/tasks/{task_id}", response_model=TaskInfo, responses=docs.not_found)
    def get_task(task_id: TaskIdParam) -> TaskInfo:
        return describe(task_id, _found(store, task_id))

    @app.delete(
        "/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=docs.not_found
    )
    def delete_task(task_id: TaskIdParam) -> None:
        if not store.delete(task_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")


def _add_classify_route(
    app: Any, m: SimpleNamespace, docs: SimpleNamespace, store: TaskStore, run: ModelCall
) -> None:
    """POST /tasks/{id}/classify."""
    from fastapi.responses import Response

    ClassifyRequest = m.ClassifyRequest
    TaskIdParam = _task_id_param()

    @app.post(
        "/tasks/{task_id}/classify",
        response_model=m.ClassifyResponse,
        responses={**docs.not_found, **docs.too_large, **docs.too_slow, **docs.bad_body},
    )
    async def classify(task_id: TaskIdParam, request: ClassifyRequest) -> Response:
        clf = _found(store, task_id)
        classes = clf.classes_
        probs = await run(store.classify, clf, request.texts)
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


def _add_score_route(
    app: Any, m: SimpleNamespace, docs: SimpleNamespace, store: TaskStore, run: ModelCall
) -> None:
    """POST /tasks/{id}/score: accuracy, macro-F1 and the confusion matrix of labeled texts."""
    from metalm.scoring import score_predictions

    TaskIdParam = _task_id_param()
    ScoreRequest, ScoreResponse = m.ScoreRequest, m.ScoreResponse

    @app.post(
        "/tasks/{task_id}/score",
        response_model=ScoreResponse,
        responses={**docs.not_found, **docs.too_large, **docs.too_slow, **docs.bad_body},
    )
    async def score(task_id: TaskIdParam, request: ScoreRequest) -> ScoreResponse:
        clf = _found(store, task_id)
        texts = [e.text for e in request.examples]
        probs = await run(store.classify, clf, texts)
        predicted = [clf.classes_[i] for i in probs.argmax(axis=1).tolist()]
        labels = [e.label for e in request.examples]
        result = score_predictions(labels, predicted, classes=clf.classes_, top_pairs=0)
        return ScoreResponse(
            task_id=task_id,
            classes=result.classes,
            n_texts=result.n_texts,
            accuracy=result.accuracy,
            accuracy_ci95=0.0 if math.isnan(result.accuracy_ci95) else result.accuracy_ci95,
            macro_f1=result.macro_f1,
            confusion=result.confusion,
        )


PAGE_FILES = {"/": "index.html", "/ui/app.js": "app.js", "/ui/style.css": "style.css"}
PAGE_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _add_page_routes(app: Any) -> None:
    """GET / (a page to try a task: create, classify, score, delete) and its script and
    style sheet, shipped in the package (`metalm/serve/static/`); public, like /docs: the
    page asks for the API key and sends it with its own requests."""
    from importlib.resources import files

    from fastapi.responses import Response

    static = files("metalm.serve") / "static"
    for route, name in PAGE_FILES.items():
        body = (static / name).read_bytes()
        media = PAGE_TYPES[name[name.rindex(".") :]] + "; charset=utf-8"

        def page(body: bytes = body, media: str = media) -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

        app.get(route, include_in_schema=False)(page)


def _add_error_handler(app: Any) -> None:
    """A `MetalmError` raised while answering is a 422, like a request that fails validation."""
    from fastapi.responses import JSONResponse

    @app.exception_handler(MetalmError)
    async def metalm_error(_request: Any, err: MetalmError) -> JSONResponse:
        # the shape of FastAPI's own 422 answers, so that the schema holds for all of them
        detail = [{"type": "value_error", "loc": ["body"], "msg": str(err)}]
        return JSONResponse({"detail": detail}, status_code=422)
