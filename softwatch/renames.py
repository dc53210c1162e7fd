"""A rename that never replaces its target: the journal's segments and the store's files are
named once, and a name already taken (by a recovered segment, or by an earlier writer that
had the same id) must fail the rename instead of destroying what the name holds."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # by the kernel or the filesystem
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)  # a filesystem without hard links
log = logging.getLogger("softwatch.store")
_warned: set[str] = set()


def _load_renameat2():
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2


_renameat2 = _load_renameat2()


def rename_noreplace(source: str, target: str) -> None:
    """Move `source` to `target`; FileExistsError, with both left as they were, if `target` exists."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), source, None, target)  # EEXIST: a FileExistsError
    try:
        os.link(source, target)  # FileExistsError if target exists
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        _rename_checked(source, target)
        return
    # Published. Should the old name stay, it is a hidden temporary name, which readers ignore
    # and compaction (or a journal's recovery) removes.
    with contextlib.suppress(OSError):
        os.unlink(source)


def _rename_checked(source: str, target: str) -> None:
    """The last resort where neither renameat2 nor hard links exist: a check, then a rename. A
    writer creating `target` between the two would be replaced; names carry a writer's unique id,
    so only a writer reusing its own name could."""
    directory = os.path.dirname(target) or "."
    if directory not in _warned:
        _warned.add(directory)
        log.warning("softwatch: %s supports neither renameat2 nor hard links; renames there check, then rename",
                    directory)
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
    os.rename(source, target)
