"""The service schedules the probes: on a new revision and every `probe_interval_s`, scored by
the LLM deployment's own model, compared with the revision's own earlier scores."""

import asyncio
import time

import pytest

from softwatch.drift.schedule import probe_due
from softwatch.models import quantize_weights
from softwatch.serve.llm import LLMServer
from softwatch.serve.monitor import DriftMonitor
from softwatch.store import Store


def test_probes_are_due_for_a_new_revision_and_after_the_interval():
    assert probe_due(1000.0, None, 600.0) == "new_revision"
    assert probe_due(1000.0, 500.0, 600.0) is None
    assert probe_due(1100.0, 500.0, 600.0) == "interval"


class LocalLLM:
    """A replica's probe surface called in-process (in the service: the Serve handle)."""

    def __init__(self, server: LLMServer):
        self.server = server

    def info(self) -> dict:
        return asyncio.run(self.server.info())

    def score_probes(self) -> dict:
        return asyncio.run(self.server.score_probes())


@pytest.fixture
def server():
    server = LLMServer({"model": "tiny-random", "engine": "softwatch", "device": "cpu", "max_batch": 4})
    yield server
    server.shutdown()


def test_the_drift_monitor_probes_on_schedule_and_finds_a_numerics_change_under_the_same_label(tmp_path, server):
    monitor = DriftMonitor({"data": str(tmp_path)})
    monitor._stopping = True  # no loop: this test is the clock
    monitor._wake.set()
    monitor._thread.join(timeout=30)
    monitor.reconfigure({"probe_interval_s": 600})
    monitor.llm = LocalLLM(server)
    label = f"{server.lm.model_id}@{server.lm.model_rev}"
    now = time.time()

    first = monitor.probe_if_due(now)
    assert first == {"reason": "new_revision", "report_id": first["report_id"], "verdict": "insufficient_data",
                     "rows": 0}  # the first revision scored is the baseline
    assert monitor.probe_if_due(now + 60) is None  # scored a minute ago
    again = monitor.probe_if_due(now + 601)
    assert again["reason"] == "interval" and again["verdict"] == "no_drift" and again["rows"] == 3

    # the same label, other numerics: the served weights rounded to 4 bits in place
    server.lm.model = quantize_weights(server.lm, 4).model
    changed = monitor.probe_if_due(now + 1300)
    assert changed["reason"] == "interval" and changed["verdict"] == "drift"
    store = Store(str(tmp_path))
    rows = store.rows("SELECT baseline_regime, current_regime, verdict FROM drift_reports WHERE report_id = ?",
                      [changed["report_id"]])
    assert {(r["baseline_regime"], r["current_regime"]) for r in rows} == {(label, label)}
    assert store.rows("SELECT count(DISTINCT run_id) AS runs, count(DISTINCT model_rev) AS revs FROM probes") == \
        [{"runs": 3, "revs": 1}]
    store.close()


class _HungReplica:
    """A Serve handle whose replica never answers: its responses wait as long as they are told."""

    def __getattr__(self, method):
        return self

    def remote(self):
        return self

    def result(self, timeout_s=None):
        if timeout_s is None:
            raise AssertionError("an unbounded wait on the LLM replica would stop the monitor's loop")
        time.sleep(timeout_s)
        raise TimeoutError(f"no answer in {timeout_s} s")


def test_a_hung_llm_replica_fails_the_probe_run_not_the_monitor(tmp_path, monkeypatch):
    from softwatch.serve.monitor import ServedLLM

    monkeypatch.setattr(ServedLLM, "INFO_TIMEOUT_S", 0.2)
    monitor = DriftMonitor({"data": str(tmp_path)})
    monitor._stopping = True
    monitor._wake.set()
    monitor._thread.join(timeout=30)
    monitor.llm = ServedLLM(_HungReplica())
    with pytest.raises(TimeoutError):
        monitor.probe_if_due(time.time())
