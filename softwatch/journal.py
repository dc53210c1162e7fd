"""A write-ahead journal of finished requests, so that a process killed between a response
and the next Parquet flush loses no record.

A sink appends each finished request to the current segment (`<writer>-<n>.wal`: frames of
a 4-byte length and a pickle) before the request is answered; a plain write reaches the OS,
which keeps it through the death of the process. When a flush has written a segment's rows
to Parquet the segment is deleted. A new sink on the same host claims (by an atomic rename)
the segments of writers whose process is gone, and writes their records.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator

from .host import host_name, pid_alive

SUFFIX = ".wal"
_LENGTH = struct.Struct("<I")


class Journal:
    def __init__(self, directory: str, writer: str):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.writer = directory, writer
        self._n = 0
        self._file = None
        self._segments: list[str] = []  # closed or current, not yet released
        self._open()

    def _open(self) -> None:
        path = os.path.join(self.directory, f"{self.writer}-{self._n:06d}{SUFFIX}")
        self._n += 1
        self._file = open(path, "ab", buffering=0)
        self._segments.append(path)

    def append(self, record) -> None:
        blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.write(_LENGTH.pack(len(blob)) + blob)

    def rotate(self) -> list[str]:
        """Close the current segment and start the next; the segments written so far."""
        self._file.close()
        done, self._segments = self._segments, []
        self._open()
        return done

    def close(self) -> list[str]:
        self._file.close()
        done, self._segments = self._segments, []
        return done


def release(segments: list[str]) -> None:
    """Delete segments whose records are in Parquet now."""
    for path in segments:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def claim_orphans(directory: str, claimant: str) -> Iterator[tuple[str, list]]:
    """(claimed path, records) of each segment left by a dead writer on this host."""
    if not os.path.isdir(directory):
        return
    host = host_name()
    for name in sorted(os.listdir(directory)):
        if not name.endswith(SUFFIX) or not name.startswith(f"{host}-"):
            continue
        try:
            pid = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid_alive(pid):
            continue
        claimed = os.path.join(directory, f"{name}.{claimant}.claimed")
        try:
            os.rename(os.path.join(directory, name), claimed)  # only one claimant wins
        except FileNotFoundError:
            continue
        yield claimed, list(_read(claimed))


def _read(path: str) -> Iterator:
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + length
        if end > len(data):
            return  # a frame cut by the kill: its request was never answered
        yield pickle.loads(data[offset + _LENGTH.size:end])
        offset = end
