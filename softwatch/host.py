"""This machine and its processes: how writers name themselves and tell whether a writer is gone."""

import os
import socket


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
