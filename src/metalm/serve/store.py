"""The service's adapted tasks: kept by id in memory and, optionally, on disk.

`TaskStore` adapts, stores, classifies with and deletes tasks within its limits on their
number (`TooManyTasks`) and on the bytes of their states (`StoreFull`); a tasks directory
holds them as safetensors + JSON (never pickle), reloaded when the store is made.
"""

import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from metalm.atomic import clear_unfinished
from metalm.classifier import FewShotClassifier
from metalm.errors import MetalmError
from metalm.serve.limits import Deadline, ServeLimits

log = logging.getLogger("metalm.serve")
TASK_ID = re.compile(r"^[0-9a-f]{32}$")


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
        for path in clear_unfinished(self.directory):
            log.warning("deleted %s: a task save cut short (never answered 201)", path.name)
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
