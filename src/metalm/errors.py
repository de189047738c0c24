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


def first_line(err: BaseException) -> str:
    """The first non-empty line of `err`'s message (its type's name if it has none): what
    a one-line error quotes of an error from a library.

    Example:
        >>> first_line(ValueError("bad header\\n  at line 3")), first_line(KeyError())
        ('bad header', 'KeyError')
    """
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
