"""Replace a directory so that a crash at any instant leaves the old or the new one whole.

`replace_dir(target, write)` lets `write` fill a fresh directory beside `target`
(`.<name>.metalm-new`), flushes it to disk, then swaps it in:

* Linux: one `renameat2(RENAME_EXCHANGE)` call swaps the two names atomically, so
  `target` always names a complete directory; the old one is then deleted.
* elsewhere (or a filesystem without it): `target` is renamed to `.<name>.metalm-old`,
  the new directory to `target`, and the old one is deleted. A crash between the two
  renames leaves no `target` but a whole backup, which `recover(target)` (called by every
  save and every loader) renames back.

Writers hold an exclusive `flock` on the parent directory (POSIX), so two processes
saving beside each other do not mix their files. A write that runs out of room (a full
disk, a quota, a file-size limit) is a `WriteFailed` error and leaves `target` as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from metalm.errors import MetalmError, WriteFailed, first_line

NEW_SUFFIX = ".metalm-new"
OLD_SUFFIX = ".metalm-old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
use_exchange = sys.platform.startswith("linux")  # tests switch it off to cover the fallback
_NO_ROOM_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# how writers that do not raise OSError say it (safetensors: "File too large (os error 27)")
_NO_ROOM_WORDS = re.compile(
    r"no space left|file too large|quota exceeded|os error (27|28|122)\b", re.IGNORECASE
)


def out_of_room(err: BaseException) -> bool:
    """Whether `err` says a write ran out of room (disk, quota or file-size limit)."""
    if isinstance(err, OSError) and err.errno in _NO_ROOM_ERRNOS:
        return True
    return isinstance(err, Exception) and bool(_NO_ROOM_WORDS.search(str(err)))


def write_failed(target: Path, err: BaseException, kept: bool) -> WriteFailed:
    """The error for a save of `target` that ran out of room; `kept`: an earlier version
    is still there, whole."""
    reason = first_line(err)
    before = "the version saved before is intact" if kept else "nothing was saved there"
    return WriteFailed(
        f"could not save {target}: {reason} (a full disk, a quota or a file-size limit such "
        f"as `ulimit -f`); {before}; free some space or raise the limit, then save again"
    )


def new_path(target: Path) -> Path:
    """Where the next version of `target` is written before the swap."""
    return target.with_name(f".{target.name}{NEW_SUFFIX}")


def old_path(target: Path) -> Path:
    """Where the previous version of `target` waits while the fallback swap runs."""
    return target.with_name(f".{target.name}{OLD_SUFFIX}")


@contextlib.contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """An exclusive lock on `parent` (a no-op where `flock` or the directory is missing)."""
    try:
        import fcntl

        fd = os.open(parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock (and so does the kernel if we are killed)


def _usual_permissions(directory: Path) -> None:
    """Files as `open` would create them (0666 less the umask): some writers (safetensors)
    create private 0600 files, which a service running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory` (and itself) to disk."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b`; False where the OS or filesystem cannot."""
    if not use_exchange:
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _recover_locked(target: Path) -> None:
    backup = old_path(target)
    if backup.is_dir():
        if not target.exists():
            os.replace(backup, target)  # a fallback swap was cut short: the old one returns
            _fsync_dir(target.parent)
        else:
            shutil.rmtree(backup, ignore_errors=True)


def recover(target: str | Path) -> Path:
    """`target`, restored from its backup if a swap was cut short (see the module doc)."""
    target = Path(target)
    if target.name and not target.exists() and old_path(target).is_dir():
        with _locked(target.parent):
            _recover_locked(target)
    return target


def clear_unfinished(parent: str | Path) -> list[Path]:
    """Delete what saves into `parent` left half-written when they were killed (their
    `.<name>.metalm-new` directories) and put back cut-short swaps; the paths deleted."""
    parent = Path(parent)
    with _locked(parent):  # a save in progress holds this lock: nothing of it is touched
        for backup in parent.glob(f".*{OLD_SUFFIX}"):
            _recover_locked(backup.with_name(backup.name[1 : -len(OLD_SUFFIX)]))
        unfinished = sorted(p for p in parent.glob(f".*{NEW_SUFFIX}") if p.is_dir())
        for path in unfinished:
            shutil.rmtree(path, ignore_errors=True)
    return unfinished


def replace_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(directory)` on a fresh directory, then make it `target` atomically,
    replacing what was there. If `write` raises, `target` is left as it was (a write out
    of room raises `WriteFailed`).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "notes"
        >>> _ = replace_dir(out, lambda d: (d / "a.txt").write_text("hello"))
        >>> (out / "a.txt").read_text()
        'hello'
    """
    target = Path(target)
    if not target.name or target.name == "..":
        raise MetalmError(f"{str(target)!r}: name the directory to write, e.g. out/my-model")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        _recover_locked(target)
        fresh = new_path(target)
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
        try:
            write(fresh)
            _usual_permissions(fresh)
            _fsync_tree(fresh)
        except BaseException as err:
            shutil.rmtree(fresh, ignore_errors=True)
            if out_of_room(err):
                raise write_failed(target, err, kept=target.exists()) from None
            raise
        if not target.exists():
            os.replace(fresh, target)
        elif _exchange(fresh, target):
            _fsync_dir(target.parent)
            shutil.rmtree(fresh)  # now the old version
        else:
            backup = old_path(target)
            os.replace(target, backup)
            os.replace(fresh, target)
            _fsync_dir(target.parent)
            shutil.rmtree(backup)
        _fsync_dir(target.parent)
    return target
