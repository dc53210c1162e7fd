"""The online detectors run online: state kept between monitor runs, each alarm reported
once with its sequence, thresholds that hold for the reference in use, and no alarm on the
first event after a clean reference."""

from datetime import timedelta

import numpy as np

from softwatch.drift.monitor import Monitor, MonitorConfig
from softwatch.drift.online import CUSUM, PoissonCUSUM
from softwatch.store import Store

from .test_drift import START, write_regime

CONFIG = MonitorConfig(window=150, target_arl=2000)


def _online(report, verdict=None):
    return [r for r in report.rows if r["kind"] == "online" and (verdict is None or r["verdict"] == verdict)]


def test_an_alarm_fires_once_with_its_sequence_and_later_runs_read_only_new_sequences(tmp_path):
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START, seed=5)
    first = Monitor(str(tmp_path), CONFIG).run()
    assert _online(first) and not _online(first, "drift")
    assert {r["n_current"] for r in _online(first) if r["verdict"] == "no_drift"} == {150}  # 300 - the reference

    # a silent change arrives: the next run reads only the new sequences, and finds it
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START + timedelta(hours=1),
                 entropy_shift=0.8, seed=6)
    second = Monitor(str(tmp_path), CONFIG).run()
    alarms = [r for r in _online(second, "drift") if r["metric"] == "mean_entropy"]
    assert len(alarms) == 1, alarms
    (alarm,) = alarms
    assert alarm["request_id"].startswith("p-6-")  # the sequence where it fired: one of the changed ones
    position = int(alarm["request_id"].rsplit("-", 1)[1])
    assert alarm["current_end"] == START + timedelta(hours=1, seconds=position)
    assert alarm["n_current"] == 150 + position + 1 and position < 50  # soon after the change
    stored = Store(str(tmp_path)).rows("SELECT request_id FROM drift_reports WHERE kind = 'online' "
                                       "AND verdict = 'drift' AND metric = 'mean_entropy'")
    assert stored == [{"request_id": alarm["request_id"]}]

    # the same data again: no new alarm; more of the changed traffic: not reported again
    third = Monitor(str(tmp_path), CONFIG).run()
    assert not _online(third, "drift")
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START + timedelta(hours=2),
                 entropy_shift=0.8, seed=7)
    fourth = Monitor(str(tmp_path), CONFIG).run()
    assert not [r for r in _online(fourth, "drift") if r["metric"] == "mean_entropy"]
    assert (tmp_path / "_monitor" / "online.json").exists() and (tmp_path / "_monitor" / "regimes.parquet").exists()


def test_a_run_over_unchanged_files_reads_no_sequence_twice(tmp_path):
    write_regime(tmp_path, 400, params_id="p", temperature=0.7, start=START, seed=8)
    monitor = Monitor(str(tmp_path), CONFIG)
    first = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    again = {r["metric"]: r["n_current"] for r in _online(Monitor(str(tmp_path), CONFIG).run())}
    assert first == again and set(first.values()) == {250}


def test_the_false_alarm_rate_holds_for_the_reference_in_use():
    """Ten fixed 200-sequence references of a skewed metric; for each, 200 no-change streams of
    2,000 sequences. Nominal: 1 - exp(-2000/7000) = 25% alarm within 2,000. Calibrated for the
    reference in use, at most one reference in ten (the guarantee's 10%) may exceed it by more
    than the binomial noise; calibrated only for the reference's own distribution (the naive
    way), half of them do (the bound can fail)."""
    nominal = 1 - np.exp(-2000 / 7000)

    def exceeding(guarantee):
        g = np.random.default_rng(16)
        over = []
        for r in range(10):
            calibrated = CUSUM.calibrated(g.gamma(2, 1, 200), target_arl=7000, guarantee=guarantee, streams=200, seed=r)
            streams = g.gamma(2, 1, (200, 2000))
            rate = np.mean([CUSUM.from_state(calibrated.state()).update_many(s) is not None for s in streams])
            over.append(rate > nominal + 2 * np.sqrt(nominal * (1 - nominal) / 200))
        return sum(over)

    assert exceeding(0.9) <= 1
    assert exceeding(None) >= 3


def test_poisson_cusum_after_a_clean_reference_needs_evidence():
    clean = PoissonCUSUM.calibrated(np.zeros(200), np.full(200, 30.0), target_arl=35_000)
    assert clean.update_many(np.r_[np.zeros(50), 1, np.zeros(50)], np.full(101, 30.0)) is None  # one event: no alarm
    g = np.random.default_rng(3)
    true_rate = 1 / 30 / 200 / 4  # a rate a clean 200-sequence reference cannot rule out
    lengths = []
    for _ in range(100):
        detector = PoissonCUSUM.from_state(clean.state())
        at = detector.update_many(g.poisson(true_rate * 30, 20_000), np.full(20_000, 30.0))
        lengths.append(at is not None)
    assert np.mean(lengths) < 0.5  # 20,000 sequences at that rate: mostly no alarm
    burst = PoissonCUSUM.from_state(clean.state())
    assert burst.update_many(np.full(50, 2.0), np.full(50, 30.0)) is not None  # a real rise: found


def test_compaction_neither_refeeds_nor_loses_sequences(tmp_path):
    from softwatch.store import compact

    for i in range(3):
        write_regime(tmp_path, 150, params_id="p", temperature=0.7, start=START + timedelta(minutes=10 * i), seed=20 + i)
    first = {r["metric"]: r["n_current"] for r in _online(Monitor(str(tmp_path), CONFIG).run())}
    assert set(first.values()) == {300}
    compact(str(tmp_path))  # the three files become one whose rows were all fed
    monitor = Monitor(str(tmp_path), CONFIG)
    again = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert again == first
    assert [r["sequences"] for r in monitor.regimes()] == [450]
    write_regime(tmp_path, 100, params_id="p", temperature=0.7, start=START + timedelta(hours=1), seed=30)
    compact(str(tmp_path))  # fed and new rows merged into one file: the new ones are fed, once
    monitor = Monitor(str(tmp_path), CONFIG)
    later = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert set(later.values()) == {400} and [r["sequences"] for r in monitor.regimes()] == [550]


def _three_files(root):
    for i in range(3):
        write_regime(str(root), 150, params_id="p", temperature=0.7, start=START + timedelta(minutes=10 * i), seed=i)


def test_a_sample_whose_files_were_compacted_away_since_the_refresh_is_read_from_the_merged_file(root, monkeypatch):
    from softwatch import rootlock
    from softwatch.store import compact

    monkeypatch.setattr(rootlock, "SETTLE_S", 0.05)
    _three_files(root)
    monitor = Monitor(str(root), CONFIG)
    (regime,) = monitor.regimes()  # the index lists the three files
    compact(str(root))  # and now they are gone
    sample = monitor.regime_sample(regime, "first", 400)
    assert len(sample) == 400 and np.all(np.diff(sample.ts) >= 0)


def test_a_run_survives_a_compaction_during_the_online_feed_and_during_the_index_refresh(root, monkeypatch):
    from softwatch import rootlock
    from softwatch.drift.index import RegimeIndex
    from softwatch.store import compact

    monkeypatch.setattr(rootlock, "SETTLE_S", 0.05)
    _three_files(root)
    monitor = Monitor(str(root), CONFIG)
    feed = monitor._online

    def compacted_first(*args, **kwargs):  # a compaction lands between the samples and the online feed
        compact(str(root))
        return feed(*args, **kwargs)

    monkeypatch.setattr(monitor, "_online", compacted_first)
    fed = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert set(fed.values()) == {300}  # 450 - the reference, each once

    write_regime(str(root), 150, params_id="p", temperature=0.7, start=START + timedelta(hours=1), seed=9)
    write_regime(str(root), 150, params_id="p", temperature=0.7, start=START + timedelta(hours=2), seed=10)
    monitor = Monitor(str(root), CONFIG)
    listing = RegimeIndex._list

    def listed_then_compacted(index):  # ...and between the index's listing and its reading the new files
        files = listing(index)
        compact(str(root))
        return files

    monkeypatch.setattr(RegimeIndex, "_list", listed_then_compacted)
    later = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    monkeypatch.undo()
    assert set(later.values()) == {600}
    monitor = Monitor(str(root), CONFIG)
    assert [r["sequences"] for r in monitor.regimes()] == [750]
    assert {r["metric"]: r["n_current"] for r in _online(monitor.run())} == later


def test_a_compaction_of_fed_and_unfed_files_feeds_the_unfed_rows_whatever_their_timestamps(tmp_path):
    from softwatch.store import compact

    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START, seed=5)  # ts 0..299 s: fed
    first = {r["metric"]: r["n_current"] for r in _online(Monitor(str(tmp_path), CONFIG).run())}
    assert set(first.values()) == {150}
    # another writer's late flush: rows older than the last one fed, merged with the fed file
    write_regime(tmp_path, 100, params_id="p", temperature=0.7, start=START + timedelta(seconds=100), seed=6)
    compact(str(tmp_path))
    monitor = Monitor(str(tmp_path), CONFIG)
    later = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert set(later.values()) == {250} and [r["sequences"] for r in monitor.regimes()] == [400]
    again = {r["metric"]: r["n_current"] for r in _online(Monitor(str(tmp_path), CONFIG).run())}
    assert again == later  # and nothing is fed twice


def test_a_run_while_a_compaction_output_and_its_inputs_are_both_listed_feeds_and_counts_each_row_once(tmp_path):
    import shutil

    from softwatch.store import compact

    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START, seed=5)
    first = {r["metric"]: r["n_current"] for r in _online(Monitor(str(tmp_path), CONFIG).run())}
    assert set(first.values()) == {150}
    write_regime(tmp_path, 100, params_id="p", temperature=0.7, start=START + timedelta(hours=1), seed=6)
    inputs = sorted(tmp_path.glob("sequences/*/part-*.parquet"))
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in inputs:
        shutil.copy(f, saved / f.name)
    compact(str(tmp_path))
    for f in inputs:  # the state of a compaction that published its output and has not deleted its inputs yet
        shutil.copy(saved / f.name, f)
    monitor = Monitor(str(tmp_path), CONFIG)
    during = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert set(during.values()) == {250} and [r["sequences"] for r in monitor.regimes()] == [400]
    for f in inputs:  # the compaction's deletes land
        f.unlink()
    monitor = Monitor(str(tmp_path), CONFIG)
    after = {r["metric"]: r["n_current"] for r in _online(monitor.run())}
    assert after == during and [r["sequences"] for r in monitor.regimes()] == [400]


def test_an_alarm_whose_report_could_not_be_published_is_reported_by_the_next_run(tmp_path):
    import pytest

    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START, seed=5)
    Monitor(str(tmp_path), CONFIG).run()
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START + timedelta(hours=1),
                 entropy_shift=0.8, seed=6)
    reports = tmp_path / "drift_reports"
    reports.rename(tmp_path / "drift_reports.saved")
    reports.write_text("not a directory")  # the report cannot be written
    with pytest.raises(OSError):
        Monitor(str(tmp_path), CONFIG).run()
    reports.unlink()
    (tmp_path / "drift_reports.saved").rename(reports)
    again = Monitor(str(tmp_path), CONFIG).run()
    alarms = [r for r in _online(again, "drift") if r["metric"] == "mean_entropy"]
    assert len(alarms) == 1 and alarms[0]["request_id"].startswith("p-6-")
    stored = Store(str(tmp_path)).rows("SELECT request_id FROM drift_reports WHERE kind = 'online' "
                                       "AND verdict = 'drift' AND metric = 'mean_entropy'")
    assert stored == [{"request_id": alarms[0]["request_id"]}]


def test_an_index_refresh_drops_many_compacted_away_files_in_linear_time(tmp_path):
    import time

    import pyarrow as pa

    from softwatch.drift.index import INDEX, RegimeIndex

    index = RegimeIndex(str(tmp_path))
    index._loaded = True  # an index of 20,000 files that a compaction has merged away since
    files = [f"sequences/dt=2026-11-01/part-{i:05d}.parquet" for i in range(20_000)]
    index.table = pa.Table.from_pydict({"file": files, "sequences": [0] * len(files)},
                                       schema=pa.schema([INDEX.field("file"), INDEX.field("sequences")]))
    index.table = pa.Table.from_pydict({name: index.table[name] if name in index.table.column_names
                                        else pa.nulls(len(files), INDEX.field(name).type) for name in INDEX.names},
                                       schema=INDEX)
    began = time.perf_counter()
    refresh = index.refresh()
    assert len(refresh.removed) == len(files) and index.table.num_rows == 0
    assert time.perf_counter() - began < 2.0  # a set per row made this quadratic: about a minute


def test_two_writers_of_the_monitor_state_at_once_each_publish_a_whole_file(tmp_path):
    import json
    import threading

    import pyarrow.fs as pafs

    from softwatch.drift.index import write_atomically

    final = f"{tmp_path}/_monitor/online.json"
    a_started, b_done = threading.Event(), threading.Event()
    a = json.dumps({"version": 1, "regimes": {"a": "x" * 50}}).encode()
    b = json.dumps({"version": 1, "regimes": {"b": 1}}).encode()

    def slow(sink):  # monitor A is halfway through its write when monitor B writes and publishes
        sink.write(a[:32])
        sink.flush()
        a_started.set()
        b_done.wait()
        sink.write(a[32:])

    errors = []

    def write_a():
        try:
            write_atomically(pafs.LocalFileSystem(), final, slow)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=write_a)
    thread.start()
    assert a_started.wait(10)
    write_atomically(pafs.LocalFileSystem(), final, lambda sink: sink.write(b))
    b_done.set()
    thread.join(10)
    assert not errors
    with open(final, "rb") as f:
        assert f.read() == a  # the last rename wins, whole
    assert sorted(p.name for p in (tmp_path / "_monitor").iterdir()) == ["online.json"]  # no temporary left
