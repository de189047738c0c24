"""How much one request and the whole service may hold, and how long a request may take.

`ServeLimits` are the service's limits (checked when made); a `Deadline` is one request's
time limit, checked by its model work, which raises `TimeLimit` once it is past.
"""

import time
from dataclasses import dataclass

from metalm.errors import MetalmError


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
