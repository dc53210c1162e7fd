"""A write-ahead journal of finished requests, so that a process killed between a response
and the next Parquet flush loses no record.

A sink appends each finished request to its current segment (`<name>.wal`) before the
request is answered; a plain write reaches the OS, which keeps it through the death of the
process. A segment is a sequence of frames: a header (length, CRC-32) and a payload
(`entries.encode`). An append that fails is cut back off the file and raised, so a segment
never holds a torn frame followed by good ones; if even the cut fails the segment takes no
more appends (the writer starts another), and recovery stops at the torn frame, which is
always the last.

Liveness is an OS lock: the process that owns a segment (its writer, or the recoverer that
took it over) holds `flock` on it until the segment's rows are in Parquet and the segment
is deleted. The OS releases the lock when that process dies, however it dies, so a segment
whose lock can be taken belongs to nobody: taking the lock is claiming it. This holds across
pid reuse and between containers that share the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator

from .renames import rename_noreplace

log = logging.getLogger("softwatch.journal")

SUFFIX = ".wal"
_CREATING = ".creating"  # a segment between its creation and its lock
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload


class SegmentBroken(OSError):
    """An earlier append failed and could not be undone: the segment takes no more appends."""


# The segments (and segments being created) this process holds. On NFS, Linux implements
# flock as a POSIX lock, which belongs to the process: the process could lock its own live
# segment again, and closing that second descriptor would drop the first one's lock. So a
# process never tries to claim a path it holds.
_held: set[str] = set()
_held_lock = threading.Lock()


def _hold(path: str) -> bool:
    """Mark `path` held by this process; False if it already is."""
    path = os.path.abspath(path)
    with _held_lock:
        if path in _held:
            return False
        _held.add(path)
        return True


def _let_go(path: str) -> None:
    with _held_lock:
        _held.discard(os.path.abspath(path))


class Segment:
    """A journal segment this process holds the lock of (its path marked held by the caller)."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd
        self._broken = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)[: -len(SUFFIX)]

    def append(self, payload: bytes) -> None:
        """Write one frame, whole, or raise with the segment as it was before."""
        if self._broken:
            raise SegmentBroken(f"{self.path} holds a torn frame")
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            _write_all(self._fd, frame)
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._broken = True
                log.exception("softwatch: could not cut a failed append off %s", self.path)
            raise

    @property
    def broken(self) -> bool:
        return self._broken

    def release(self) -> None:
        """Delete the segment (its rows are in Parquet) and drop its lock."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.close()

    def close(self) -> None:
        """Drop the lock, keeping the file: another process recovers what it holds."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            _let_go(self.path)


def create(directory: str, name: str) -> Segment:
    """A new, empty segment, locked before any other process can see it under its name.
    FileExistsError if a segment has that name: a segment is never replaced."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + SUFFIX)
    creating = os.path.join(directory, f".{name}{_CREATING}")
    if not _hold(path):
        raise FileExistsError(path)
    _hold(creating)
    try:
        fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            rename_noreplace(creating, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(creating)  # O_EXCL made it ours
            raise
    except BaseException:
        _let_go(path)
        raise
    finally:
        _let_go(creating)
    return Segment(path, fd)


def claim_orphans(directory: str) -> Iterator[Segment]:
    """Each segment that no live process holds, locked for the caller (`frames` reads it)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") and name.endswith(_CREATING):
            _remove_if_orphan(path)  # its creator died before the segment held anything
            continue
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        segment = _lock_if_orphan(path)
        if segment is not None:
            yield segment


def _lock_if_orphan(path: str) -> Segment | None:
    if not _hold(path):
        return None  # this process holds it
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        _let_go(path)
        return None  # released between the listing and now
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)  # released (and the name reused) before we locked it
    except BaseException as exc:
        os.close(fd)
        _let_go(path)
        if isinstance(exc, (BlockingIOError, FileNotFoundError)):  # its owner is alive, or it is gone
            return None
        raise
    return Segment(path, fd)


def _remove_if_orphan(path: str) -> None:
    segment = _lock_if_orphan(path)
    if segment is not None:
        segment.release()


def frames(segment: Segment) -> Iterator[bytes]:
    """The payloads of a segment's whole frames, in order."""
    with open(segment.path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        if offset + _FRAME.size > len(data):
            break
        length, crc = _FRAME.unpack_from(data, offset)
        payload = data[offset + _FRAME.size:offset + _FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        yield payload
        offset += _FRAME.size + length
    if offset < len(data):  # a frame cut by a kill or a full disk: its request was never answered
        log.warning("softwatch: %s ends with %d bytes of a torn frame; dropped", segment.path, len(data) - offset)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(f"wrote 0 of {len(view)} bytes")
        view = view[written:]
