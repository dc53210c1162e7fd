"""This machine and its processes: the host name writers put in their ids (a label only: it is
shared by pods, so uniqueness and liveness never rest on it) and whether a pid is alive."""

import ctypes
import os
import socket
import sys


def host_name() -> str:
    """The short host name, without dashes (names are split on them)."""
    return socket.gethostname().split(".")[0].replace("-", "")[:16] or "host"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def keep_freed_memory() -> None:
    """Keep freed buffers in the heap (glibc): CPU decode allocates the same large temporaries
    every step, and returning them to the OS makes each step fault its pages back in, which
    was measured to make the statistics pass 3-4x slower."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass
