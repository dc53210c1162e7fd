"""The DriftMonitor deployment's event loop stays responsive while a drift run works."""

import asyncio
import time
from datetime import timedelta

from softwatch.serve.monitor import DriftMonitor

from .test_drift import START, write_regime


def test_queries_and_health_are_answered_while_a_run_works(tmp_path):
    write_regime(tmp_path, 400, params_id="p-old", temperature=0.7, start=START, seed=1)
    write_regime(tmp_path, 300, params_id="p-new", temperature=1.0, start=START + timedelta(hours=1),
                 entropy_shift=0.6, seed=2)
    monitor = DriftMonitor({"data": str(tmp_path)})
    monitor.reconfigure({"interval_s": 3600, "permutations": 99})
    first = asyncio.run(monitor.run_now())  # a completed run whose reports are stored
    monitor.reconfigure({"interval_s": 3600, "permutations": 19_999})  # a slow run, for real

    async def during_a_run():
        run = asyncio.create_task(monitor.run_now())
        last = time.monotonic()
        await asyncio.sleep(0.2)  # the run has started
        gaps = [time.monotonic() - last - 0.2]
        last = time.monotonic()
        asked = time.monotonic()
        rows = await monitor.reports({}, latest=True)
        answered_s = time.monotonic() - asked
        monitor.check_health()
        while not run.done():  # the loop's own heartbeat while the run goes on
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        return rows, answered_s, max(gaps, default=0.0), await run

    started = time.monotonic()
    rows, answered_s, worst_gap, second = asyncio.run(during_a_run())
    run_s = time.monotonic() - started
    assert run_s > 1.5, f"the run took {run_s:.2f} s: too quick to show a stall"
    assert answered_s < 0.5 and worst_gap < 0.5, (answered_s, worst_gap, run_s)
    assert rows and {r["report_id"] for r in rows} == {first["report_id"]}  # the last completed run's
    assert second["report_id"] != first["report_id"]
    monitor.__del__()  # stops its loop: no thread is left inside DuckDB when the interpreter exits
    monitor._thread.join(timeout=10)
    assert not monitor._thread.is_alive()
