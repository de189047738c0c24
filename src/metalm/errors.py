"""The one error type users see: a message that says what to fix."""

from __future__ import annotations


class MetalmError(ValueError):
    """Bad input or a failed run, with a message that says what to fix.

    The CLI prints it on one line and exits with status 2.
    """
