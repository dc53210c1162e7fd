"""The DriftMonitor deployment: runs the drift monitor over the shared dataset on an
interval, exports the drift gauges, and answers read-only queries of `drift_reports`. It also
has the LLM deployment score the probes when a new `model_rev` is served and every
`probe_interval_s` (drift/schedule.py), so a revision is compared with the previous one and
with its own earlier scores.

A run can take seconds. Runs hold their own lock and the async methods do their work in worker
threads, so the replica's event loop (health checks, report queries) never waits on a run:
queries see the reports of the last completed run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time

from ..drift.monitor import Monitor, MonitorConfig
from ..drift.schedule import DEFAULT_PROBE_INTERVAL_S, probe_due
from ..store import Store
from ..telemetry import Telemetry

log = logging.getLogger("softwatch.serve")

CONFIG_KEYS = ("interval_s", "probe_interval_s", *(f.name for f in dataclasses.fields(MonitorConfig)))
REPORT_FILTERS = ("report_id", "kind", "metric", "verdict", "current_regime", "baseline_regime", "deployment",
                  "replica")
REPORT_COLUMNS = ("report_id", "ts", "kind", "metric", "test", "statistic", "p_value", "effect_size", "threshold",
                  "baseline_regime", "current_regime", "baseline_start", "baseline_end", "current_start",
                  "current_end", "n_baseline", "n_current", "verdict", "deployment", "replica")
MAX_LIMIT = 10_000


class ServedLLM:
    """The LLM deployment's probe surface, through its Serve handle (called from the loop thread).
    Bounded waits: a replica that hangs fails the probe run (`last_error`), not the monitor's loop."""

    INFO_TIMEOUT_S = 30.0
    SCORE_TIMEOUT_S = 600.0  # 64 teacher-forced probes, twice, between decode steps

    def __init__(self, handle):
        self.handle = handle

    def info(self) -> dict:
        return self.handle.info.remote().result(timeout_s=self.INFO_TIMEOUT_S)

    def score_probes(self) -> dict:
        return self.handle.score_probes.remote().result(timeout_s=self.SCORE_TIMEOUT_S)


class DriftMonitor:
    def __init__(self, settings: dict, llm=None):
        self.data = settings["data"]
        self.llm = ServedLLM(llm) if llm is not None else None  # whose model the probes score
        self.interval_s = 60.0
        self.probe_interval_s = DEFAULT_PROBE_INTERVAL_S
        self.config = MonitorConfig()
        self.telemetry = Telemetry(settings.get("metrics", "none"), instance_id=f"drift-monitor-{os.getpid()}",
                                   data_root=self.data)
        self._run_lock = threading.Lock()  # one run at a time
        self._reader_lock = threading.Lock()  # the reader's DuckDB connection: one query at a time
        self._reader = Store(self.data)
        self._seen = -1
        self._wake = threading.Event()
        self._stopping = False
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="softwatch-drift", daemon=True)
        self._thread.start()

    def reconfigure(self, config: dict) -> None:
        """user_config: `interval_s`, `probe_interval_s` and any MonitorConfig field."""
        config = dict(config or {})
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown DriftMonitor user_config keys {sorted(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
        interval = float(config.pop("interval_s", self.interval_s))
        if interval <= 0:
            raise ValueError("interval_s must be > 0")
        probe_interval = float(config.pop("probe_interval_s", self.probe_interval_s))
        if probe_interval <= 0:
            raise ValueError("probe_interval_s must be > 0")
        self.interval_s, self.probe_interval_s = interval, probe_interval
        self.config = dataclasses.replace(MonitorConfig(), **config)
        self._seen = -1  # new thresholds: look again
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.run_once()
                self.last_error = None
            except Exception as exc:  # a bad file or a full disk must not kill the monitor
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("softwatch: drift monitor run failed")
            try:
                self.probe_if_due()
            except Exception as exc:  # an LLM replica being replaced must not kill the monitor
                self.last_error = f"probes: {type(exc).__name__}: {exc}"
                log.exception("softwatch: scoring the probes failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def run_once(self, force: bool = False) -> dict | None:
        """Run the monitor when files of sequences were added or compacted since the last run
        (or when forced)."""
        with self._run_lock:
            monitor = Monitor(self.data, self.config, self.telemetry)
            try:
                monitor.index.refresh()  # the files of `sequences` now (reads only new ones)
                seen = hash(frozenset(monitor.index.table["file"].to_pylist()))
                if seen == self._seen and not force:
                    return None
                report = monitor.run()
                self._seen = seen
            finally:
                monitor.close()
        return {"report_id": report.report_id, "verdict": report.verdict, "rows": len(report.rows)}

    def probe_if_due(self, now_s: float | None = None) -> dict | None:
        """Have the LLM deployment score the probes when the revision it serves has no stored
        probe run, or its latest is `probe_interval_s` old; store and compare them
        (`Monitor.record_probes`). None when nothing was due (or the engine cannot score)."""
        if self.llm is None:
            return None
        info = self.llm.info()
        if not info.get("scores_probes"):
            return None
        with self._reader_lock:
            last = self._reader.rows("SELECT max(epoch_us(ts)) AS us FROM probes WHERE model_id = ? AND model_rev = ?",
                                     [info["model_id"], info["model_rev"]])[0]["us"]
        reason = probe_due(time.time() if now_s is None else now_s, None if last is None else last / 1e6,
                           self.probe_interval_s)
        if reason is None:
            return None
        scored = self.llm.score_probes()
        from ..drift.probes import builtin_probes

        with self._run_lock:
            monitor = Monitor(self.data, self.config, self.telemetry)
            try:
                report = monitor.record_probes(scored["model_id"], scored["model_rev"], builtin_probes(),
                                               scored["scores"], against_other=reason == "new_revision")
            finally:
                monitor.close()
        log.info("softwatch: probes scored on %s@%s (%s)", scored["model_id"], scored["model_rev"], reason)
        return {"reason": reason, "report_id": report.report_id, "verdict": report.verdict, "rows": len(report.rows)}

    async def run_now(self) -> dict | None:
        return await asyncio.to_thread(self.run_once, True)

    async def reports(self, filters: dict, latest: bool = False, limit: int = 1000) -> list[dict]:
        """drift_reports rows, newest first; filters are equality on REPORT_FILTERS columns plus
        `since` (a timestamp); `latest` keeps only the newest report."""
        unknown = set(filters) - set(REPORT_FILTERS) - {"since"}
        if unknown:
            raise ValueError(f"unknown filters {sorted(unknown)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be in [1, {MAX_LIMIT}]")
        clauses, params = [], []
        for key, value in filters.items():
            clauses.append("ts >= ?::TIMESTAMPTZ" if key == "since" else f"{key} = ?")
            params.append(value)
        if latest:
            clauses.append("report_id = (SELECT report_id FROM drift_reports ORDER BY ts DESC LIMIT 1)")
        where = " AND ".join(clauses) or "TRUE"
        sql = f"SELECT {', '.join(REPORT_COLUMNS)} FROM drift_reports WHERE {where} ORDER BY ts DESC, kind, metric, test " \
              f"LIMIT {int(limit)}"
        return await asyncio.to_thread(self._query, sql, params)

    def _query(self, sql: str, params: list) -> list[dict]:
        with self._reader_lock:
            return self._reader.rows(sql, params)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the drift monitor loop has stopped")

    def __del__(self):
        self._stopping = True
        self._wake.set()
        self.telemetry.shutdown()
