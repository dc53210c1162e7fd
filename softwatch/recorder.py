"""Recording a finished sequence: its rows to the Parquet sink (journaled before the caller
answers) and its summary to the OpenTelemetry meters, in one call that every producer makes
(the serve replica, `instrument`, the vLLM observer, the CLI)."""

from __future__ import annotations

import logging

from .completion import Completion
from .records import RecordContext
from .store import ParquetSink
from .telemetry import Telemetry

log = logging.getLogger("softwatch.recorder")


class Recorder:
    def __init__(self, context: RecordContext, sink: ParquetSink | None = None, telemetry: Telemetry | None = None):
        self.context, self.sink, self.telemetry = context, sink, telemetry

    def record(self, completion: Completion, prompt: str | None = None) -> None:
        """Write the sequence's records and metrics. A failing metrics pipe is logged, never raised:
        it must not stop serving; a failing sink raises (`store.RecordNotDurable`: the record is
        not durable, and the request must be answered with an error, not as a success)."""
        if self.sink is not None:
            self.sink.write_completion(completion, self.context, prompt)
        if self.telemetry is not None:
            try:
                self.telemetry.record(completion, self.context)
            except Exception:  # noqa: BLE001
                log.exception("softwatch: metrics for %s failed", completion.request_id)

    def close(self) -> None:
        """Flush the records and export pending metrics."""
        try:
            if self.sink is not None:
                self.sink.close()
        finally:
            if self.telemetry is not None:
                self.telemetry.shutdown()
