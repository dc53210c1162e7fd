"""What the observer is told: the `softwatch` entry of vLLM's `additional_config`
(`LLM(additional_config=...)`, `--additional-config`), read in the process that runs the model."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields

from ..store import default_root
from ..telemetry import EXPORTERS

KEY = "softwatch"


@dataclass(frozen=True)
class ObserverSettings:
    data: str | None = None  # dataset root; None: $SOFTWATCH_DATA or ./softwatch-data
    metrics: str = "prometheus"  # one of telemetry.EXPORTERS
    metrics_host: str | None = None  # None: the Ray node's IP in a Ray cluster, else 127.0.0.1
    metrics_port: int = 0
    deployment: str = "vllm"
    replica: str | None = None  # default: vllm-<host>-<pid>
    model_id: str | None = None  # default: the served model name
    template_version: str = "v1"
    store_text: bool = False
    token_sample_rate: float = 1.0
    flush_interval_s: float = 10.0
    journal: str | None = None  # a directory every node mounts, for the journal (store.journal_dir)
    handoff: str | None = None  # a `handoff.Handoff` key: give completions to it instead of recording them

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> ObserverSettings:
        given = dict((additional_config or {}).get(KEY) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"additional_config.{KEY}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
        settings = cls(**given)
        if settings.metrics not in EXPORTERS:
            raise ValueError(f"additional_config.{KEY}.metrics: must be one of {', '.join(EXPORTERS)}, "
                             f"got {settings.metrics!r}")
        if not 0 <= settings.token_sample_rate <= 1:
            raise ValueError(f"additional_config.{KEY}.token_sample_rate: must be in [0, 1]")
        if settings.handoff and settings.data:
            raise ValueError(f"additional_config.{KEY}: `handoff` and `data` exclude each other "
                             "(with a handoff its owner records)")
        return settings

    @property
    def data_root(self) -> str:
        return self.data or default_root()

    @property
    def replica_id(self) -> str:
        return self.replica or f"vllm-{socket.gethostname()}-{os.getpid()}"

    def as_additional_config(self) -> dict:
        """{"softwatch": {...}} with the fields that differ from the defaults."""
        default = ObserverSettings()
        return {KEY: {f.name: getattr(self, f.name) for f in fields(self)
                      if getattr(self, f.name) != getattr(default, f.name)}}
