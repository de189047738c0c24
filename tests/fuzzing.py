"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): how many cases each surface
runs, and the one property they all check.

Each fuzz test runs `DEFAULT_EXAMPLES` generated cases in the default test run and
`FUZZ_EXAMPLES` under `pytest -m fuzz` (the nightly-style run)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from metalm.errors import MetalmError

DEFAULT_EXAMPLES = 200
FUZZ_EXAMPLES = int(os.environ.get("METALM_FUZZ_EXAMPLES", "3000"))

# parametrise a fuzz test over this: the default run, and the long one marked `fuzz`
EXAMPLES = [
    pytest.param(DEFAULT_EXAMPLES, id="default"),
    pytest.param(FUZZ_EXAMPLES, id="long", marks=pytest.mark.fuzz),
]


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for `examples` cases: no deadline (a loaded 2-core machine),
    no example database (runs stay independent of earlier ones)."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def write_temp(data: bytes, suffix: str) -> Path:
    """`data` in a new temporary file with `suffix` (Hypothesis runs a test body many
    times, so pytest's per-test tmp_path would be shared); the caller deletes it."""
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return Path(name)


def valid_or_metalm_error(call: Callable[[], Any]) -> Any:
    """`call()`'s result, or None where it raised a MetalmError whose message is one
    non-empty line of advice; any other exception fails the test (it propagates)."""
    try:
        return call()
    except MetalmError as err:
        message = str(err)
        assert message.strip(), "a MetalmError without a message"
        assert "Traceback" not in message, message
        return None
