"""The one error type users see: a message that says what to fix."""

from __future__ import annotations


class MetalmError(ValueError):
    """Bad input or a failed run, with a message that says what to fix.

    The CLI prints it on one line and exits with status 2.
    """


class WriteFailed(MetalmError):
    """A save ran out of room (a full disk, a quota or a file-size limit); what was saved
    before is intact.

    The service answers it with 507 Insufficient Storage.
    """
