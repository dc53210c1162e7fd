"""Which regimes the monitor compares: the deployment's parameters define them, request
overrides are bounded, a rollback is watched, a baseline can be pinned."""

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from softwatch.cli import main
from softwatch.drift import regimes as plans
from softwatch.drift.monitor import FilterError, Monitor, MonitorConfig
from softwatch.records import SEQUENCES, rows_table
from softwatch.store import ParquetSink, Store

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
HOUR = 3_600_000_000


# ---- the plan, as a pure function of the index's rows ---------------------------------------------
def regime(name: str, first_h: float, last_h: float, source: str = "deployment", sequences: int = 500) -> dict:
    return {"model_id": "m", "model_rev": "r1", "params_id": name, "params_source": source, "temperature": 0.7,
            "top_p": 1.0, "top_k": 0, "sequences": sequences, "first_us": int(first_h * HOUR),
            "last_us": int(last_h * HOUR)}


def names(plan: plans.Plan) -> tuple:
    return (plan.current.regime["params_id"], plan.current.since_us,
            plan.baseline["params_id"] if plan.baseline else None)


def test_segments_follow_rollbacks_and_roll_forwards_but_not_a_canary():
    a, b = regime("A", 0, 10), regime("B", 5, 6)  # A -> B at 5 h -> A again at 6 h
    assert names(plans.plan([a, b], 900, 3)) == ("A", 6 * HOUR, "B")
    a, b = regime("A", 0, 8), regime("B", 5, 10)  # ... and forward to B again at 8 h
    assert names(plans.plan([a, b], 900, 3)) == ("B", 8 * HOUR, "A")
    a, b, c = regime("A", 0, 10), regime("B", 3, 5), regime("C", 5, 7)  # A -> B -> C, back to A at 7 h
    assert names(plans.plan([a, b, c], 900, 3)) == ("A", 7 * HOUR, "C")
    a, b, c = regime("A", 0, 3.01), regime("B", 3, 5.01), regime("C", 5, 10)  # rolling updates, no return
    assert names(plans.plan([a, b, c], 900, 3)) == ("C", 5.01 * HOUR, "B")
    a, b = regime("A", 0, 10), regime("B", 5, 10 - 0.1)  # a canary: both live (B's last 6 min ago)
    assert names(plans.plan([a, b], 900, 3)) == ("B", None, "A")


def test_request_overrides_never_become_the_newest_and_are_bounded():
    g = np.random.default_rng(0)
    burst = [regime(f"o{i}", 9 + i / 1000, 9 + i / 1000, "request", sequences=int(g.integers(1, 50)))
             for i in range(300)]
    plan = plans.plan([regime("A", 0, 10), regime("B", 5, 10), *burst], 900, 3)
    assert names(plan) == ("B", None, "A")
    assert [r["sequences"] for r in plan.overrides] == sorted((r["sequences"] for r in burst), reverse=True)[:3]
    assert plans.plan(burst, 900, 3).current is None


def test_a_pin_fixes_the_baseline():
    a, b, c = regime("A", 0, 3), regime("B", 3, 5), regime("C", 5, 10)
    assert names(plans.plan([a, b, c], 900, 3, pin=(("params_id", "A"),))) == ("C", None, "A")
    assert names(plans.plan([a, b, c], 900, 3, pin=(("params_id", "C"),))) == ("C", None, None)  # the pin is live
    assert names(plans.plan([a, b, c], 900, 3, pin=(("temperature", "0.70"),))) == ("C", None, None)  # the latest match
    with pytest.raises(plans.PinError, match="params_id=Z"):
        plans.plan([a, b, c], 900, 3, pin=(("params_id", "Z"),))


# ---- the monitor over a real store ----------------------------------------------------------------
def rows(n: int, params_id: str, start: datetime, g: np.random.Generator, shift: float = 0.0,
         temperature: float = 0.7, source: str | None = "deployment", model_rev: str = "r1") -> list[dict]:
    out = []
    for i in range(n):
        entropy = g.gamma(4, 0.4) + shift
        out.append({"ts": start + timedelta(seconds=i), "created": start + timedelta(seconds=i),
                    "request_id": f"{params_id}-{start:%H%M}-{i}", "prompt_tokens": 12, "generated_tokens": 20,
                    "finish_reason": "length", "mean_entropy": entropy, "perplexity": float(np.exp(entropy)),
                    "mean_top_prob": 0.5, "p10_top_prob": 0.2, "mean_sampling_entropy": entropy, "nonfinite": 0,
                    "overflow": 0, "model_id": "m", "model_rev": model_rev, "params_id": params_id,
                    "temperature": temperature, "top_p": 1.0, "top_k": 0, "template_version": "v1",
                    "deployment": "t", "replica": "r", "params_source": source})
    return out


def write(root, *parts: list[dict]) -> None:
    with ParquetSink(str(root), journal=None) as sink:
        for part in parts:
            sink.write("sequences", rows_table(part, SEQUENCES))


def by_kind(report, kind: str) -> list[dict]:
    return [r for r in report.rows if r["kind"] == kind]


def test_after_a_rollback_the_live_traffic_is_compared_with_the_rolled_back_regime(tmp_path):
    g = np.random.default_rng(1)
    rollback = START + timedelta(hours=2)
    write(tmp_path, rows(300, "A", START, g), rows(300, "B", START + timedelta(hours=1), g, shift=1.0),
          rows(300, "A", rollback, g))  # A, then B, then rolled back to A
    report = Monitor(str(tmp_path), MonitorConfig(window=100)).run()
    regime_rows = by_kind(report, "regime")
    assert {(r["baseline_regime"], r["current_regime"]) for r in regime_rows} == {("m@r1/B", "m@r1/A")}
    # the current side is the live A traffic only, and B's change is found against it
    assert all(r["current_start"] >= rollback and r["n_current"] == 300 for r in regime_rows)
    assert {r["metric"] for r in regime_rows if r["verdict"] == "drift"} >= {"mean_entropy"}
    window = by_kind(report, "window")  # inside the live segment: first 100 vs last 100 of A(now)
    assert window and all(r["current_regime"] == "m@r1/A" and r["baseline_start"] >= rollback for r in window)
    assert {r["current_regime"] for r in by_kind(report, "online")} == {"m@r1/A"}


def test_a_burst_of_per_request_temperatures_does_not_become_the_newest_regime(tmp_path):
    g = np.random.default_rng(2)
    burst_start = START + timedelta(hours=2)
    burst = [row for i, t in enumerate(g.uniform(0.1, 1.5, 150))
             for row in rows(1, f"o{i}", burst_start + timedelta(seconds=i), g, temperature=float(t), source="request")]
    popular = rows(250, "o-popular", burst_start, g, temperature=1.2, source="request")  # one client's setting
    old_files = rows(300, "A", START, g, source=None)  # written before params_source: the deployment's
    write(tmp_path, old_files, rows(300, "B", START + timedelta(hours=1), g, shift=1.0), burst, popular)
    report = Monitor(str(tmp_path), MonitorConfig(window=100, override_regimes=3)).run()
    assert {(r["baseline_regime"], r["current_regime"]) for r in by_kind(report, "regime")} == {("m@r1/A", "m@r1/B")}
    assert {r["current_regime"] for r in by_kind(report, "online")} == {"m@r1/B"}
    # override traffic: a window check of each of the 3 largest override regimes with enough sequences
    assert {r["current_regime"] for r in by_kind(report, "window")} == \
        {"m@r1/B", "m@r1/o-popular[params_source=request]"}
    assert len({r["current_regime"] for r in report.rows}) == 2
    stored = Store(str(tmp_path)).rows("SELECT DISTINCT current_regime FROM drift_reports ORDER BY 1")
    assert [r["current_regime"] for r in stored] == ["m@r1/B", "m@r1/o-popular[params_source=request]"]


def test_a_pinned_baseline_from_the_command_line_and_bad_pins(tmp_path, capsys):
    g = np.random.default_rng(3)
    write(tmp_path, rows(300, "A", START, g, model_rev="good"), rows(300, "B", START + timedelta(hours=1), g),
          rows(300, "C", START + timedelta(hours=2), g, shift=1.0))
    assert main(["drift", "--data", str(tmp_path), "--pin", "model_rev=good", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(r["baseline_regime"], r["current_regime"]) for r in report["rows"] if r["kind"] == "regime"} == \
        {("m@good/A", "m@r1/C")}
    for pin, message in (("model_rev=bad", "--pin: pin 'model_rev=bad' selects no regime"),
                         ("replica=x", "--pin: pin: replica cannot select a regime"),
                         ("top_k=x", "--pin: pin: top_k='x' is not a number")):
        assert main(["drift", "--data", str(tmp_path), "--pin", pin]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(FilterError, match="pin: since"):
        MonitorConfig(pin="since=2026-11-01")


def test_the_drift_monitor_service_takes_a_pin_in_its_user_config(tmp_path):
    from softwatch.serve.monitor import DriftMonitor

    g = np.random.default_rng(4)
    write(tmp_path, rows(200, "A", START, g, model_rev="good"), rows(200, "B", START + timedelta(hours=1), g),
          rows(200, "C", START + timedelta(hours=2), g))
    monitor = DriftMonitor({"data": str(tmp_path)})
    monitor._stopping = True  # runs only when this test asks
    monitor._wake.set()
    monitor._thread.join(timeout=60)
    with pytest.raises(ValueError, match="pin: replica cannot select a regime"):
        monitor.reconfigure({"pin": "replica=x"})
    monitor.reconfigure({"pin": "model_rev=good", "window": 50, "permutations": 999})
    report_id = monitor.run_once(force=True)["report_id"]
    rows_ = Store(str(tmp_path)).rows("SELECT DISTINCT baseline_regime, current_regime FROM drift_reports "
                                      "WHERE report_id = ? AND kind = 'regime'", [report_id])
    assert rows_ == [{"baseline_regime": "m@good/A", "current_regime": "m@r1/C"}]
