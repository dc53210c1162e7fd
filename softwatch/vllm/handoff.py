"""Completions handed from the observer to code in the same process, instead of recorded by it.

A serve replica drives vLLM's engine in its own process and records each request itself,
before it answers (the journal guarantee): it registers a `Handoff` and names it in the
observer's settings (`handoff`); the observer then gives each finished request's `Completion`
(tokens, statistics, regime) to it.
"""

from __future__ import annotations

import threading
import uuid

from ..completion import Completion

_registered: dict[str, Handoff] = {}


class Handoff:
    """Completions the observer finished, until their owner takes them. Thread-safe: the
    observer hands over from vLLM's thread or from its parked-request watcher."""

    def __init__(self):
        self.key = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._ready: dict[str, Completion] = {}
        _registered[self.key] = self

    def record(self, completion: Completion, prompt: str | None = None) -> None:
        with self._lock:
            self._ready[completion.request_id] = completion

    def take(self) -> list[Completion]:
        with self._lock:
            ready, self._ready = list(self._ready.values()), {}
        return ready

    def close(self) -> None:
        _registered.pop(self.key, None)


def registered(key: str) -> Handoff:
    try:
        return _registered[key]
    except KeyError:
        raise ValueError(f"no softwatch handoff {key!r} in this process: the observer must run in the process "
                         "that registered it (VLLM_ENABLE_V1_MULTIPROCESSING=0)") from None
