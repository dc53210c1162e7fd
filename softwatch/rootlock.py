"""One compaction at a time per dataset root.

On a local root the lock is `flock` on `<root>/_compact.lock`: the OS enforces it and frees it
when its holder dies. An object store has no such lock, and pyarrow's filesystems offer no
conditional write, so there the lock is a lease object (`_compact.lock`: owner, expiry) that a
compaction writes, reads back after a pause (a racing taker's write lands in that pause and
one of the two sees the other's owner), renews between merges (a renewal that finds another
owner, who took a lease this one let expire, stops the compaction), and deletes when done; a
compaction killed midway holds the root until the lease expires.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

LOCK_NAME = "_compact.lock"
SETTLE_S = 2.0  # the lease's pause between writing it and reading it back


class CompactionRunning(RuntimeError):
    """Another compaction holds the root."""


@contextmanager
def exclusive(fs: pafs.FileSystem, root: str, lease_s: float = 3600.0,
              settle_s: float | None = None) -> Iterator[Callable[[], None]]:
    """Hold the root's compaction lock; yields `renew`, to call at least every `lease_s`."""
    settle_s = SETTLE_S if settle_s is None else settle_s
    if isinstance(fs, pafs.LocalFileSystem):
        with _flocked(f"{root}/{LOCK_NAME}"):
            yield lambda: None
    else:
        with _leased(fs, f"{root}/{LOCK_NAME}", lease_s, settle_s) as renew:
            yield renew


@contextmanager
def _flocked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionRunning(f"another compaction of {os.path.dirname(path)} is running") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def _leased(fs: pafs.FileSystem, path: str, lease_s: float, settle_s: float) -> Iterator[Callable[[], None]]:
    owner = os.urandom(8).hex()
    held = _read(fs, path)
    if held is not None and held["owner"] != owner and held["expires"] > time.time():
        raise CompactionRunning(f"another compaction holds {path} until {time.ctime(held['expires'])}")

    def take() -> None:
        _write(fs, path, {"owner": owner, "expires": time.time() + lease_s})

    def renew() -> None:
        held = _read(fs, path)
        if held is None or held["owner"] != owner:  # stalled past the lease, and another took the root
            raise CompactionRunning(f"another compaction took {path} while this one held it")
        take()

    take()
    time.sleep(settle_s)
    held = _read(fs, path)
    if held is None or held["owner"] != owner:
        raise CompactionRunning(f"another compaction took {path} at the same time")
    try:
        yield renew
    finally:
        held = _read(fs, path)
        if held is not None and held["owner"] == owner:
            fs.delete_file(path)


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    """The lease, or None when there is none. Any other failure raises: a transient error of
    the object store must not read as a free root."""
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
        return {"owner": str(lease["owner"]), "expires": float(lease["expires"])}
    except (ValueError, KeyError, TypeError):
        raise CompactionRunning(f"the compaction lease {path} is unreadable; delete it if no compaction "
                                "is running") from None


def _write(fs: pafs.FileSystem, path: str, lease: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(lease).encode())
