import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from softwatch import rootlock
from softwatch.engine import DecodingParams, Engine
from softwatch.records import (DRIFT_REPORTS, REGIME_COLUMNS, SEQUENCES, TOKENS, RecordContext, keeps_tokens,
                               token_table)
from softwatch.stats import FIELDS
from softwatch.store import ParquetSink, Store, compact

WRITER = str(Path(__file__).with_name("record_writer.py"))


@pytest.fixture(scope="module")
def completions(tiny):
    engine = Engine(tiny, max_batch=4)
    greedy = engine.generate(["hello there", "abc"], DecodingParams(temperature=0, max_tokens=12))
    sampled = engine.generate(["one", "two", "three"], DecodingParams(temperature=0.8, top_p=0.9, max_tokens=9, seed=3))
    return greedy + sampled


def count(store: Store, sql: str):
    return store.query(sql).column(0)[0].as_py()


def test_token_rows_carry_every_field_and_the_regime(completions):
    context = RecordContext(deployment="d", replica="r7")
    table = token_table([(c, context) for c in completions])
    assert table.schema == TOKENS
    assert table.num_rows == sum(len(c.token_ids) for c in completions)
    offset = 0
    for c in completions:
        rows = table.slice(offset, len(c.token_ids)).to_pylist()
        offset += len(c.token_ids)
        assert [r["position"] for r in rows] == list(range(len(c.token_ids)))
        assert [r["token_id"] for r in rows] == c.token_ids
        assert {r["request_id"] for r in rows} == {c.request_id}
        for i, name in enumerate(FIELDS):
            np.testing.assert_array_equal(np.array([r[name] for r in rows], np.float32), c.stats[:, i].numpy())
        for r in rows:
            assert r["params_id"] == c.regime["params_id"] and r["model_rev"] == c.regime["model_rev"]
            assert r["temperature"] == c.regime["temperature"] and r["replica"] == "r7" and r["deployment"] == "d"


def test_text_is_stored_only_when_enabled(root, completions):
    with ParquetSink(root.uri) as sink:
        sink.write_completion(completions[0], RecordContext(), prompt="hello there")
        sink.write_completion(completions[1], RecordContext(store_text=True), prompt="abc")
    rows = Store(root.uri).rows("SELECT request_id, prompt, text FROM sequences ORDER BY request_id")
    assert rows[0]["prompt"] is None and rows[0]["text"] is None
    assert rows[1]["prompt"] == "abc" and rows[1]["text"] == completions[1].text


def test_token_count_matches_sequences_and_every_row_has_its_regime(root, completions):
    with ParquetSink(root.uri, flush_rows=7) as sink:  # many small files
        for c in completions:
            sink.write_completion(c, RecordContext(replica="a"))
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens") == count(store, "SELECT sum(generated_tokens) FROM sequences") \
        == sum(len(c.token_ids) for c in completions)
    for column in REGIME_COLUMNS:
        assert count(store, f"SELECT count(*) FROM tokens WHERE {column} IS NULL") == 0
        assert count(store, f"SELECT count(*) FROM sequences WHERE {column} IS NULL") == 0
    assert count(store, "SELECT count(DISTINCT params_id) FROM sequences") == 2
    by_request = store.rows("SELECT s.request_id, s.generated_tokens AS g, count(t.position) AS n FROM sequences s "
                            "LEFT JOIN tokens t USING (request_id) GROUP BY ALL")
    assert all(r["g"] == r["n"] for r in by_request)
    summary = store.rows("SELECT request_id, perplexity FROM sequences")
    expected = {c.request_id: c.summary["perplexity"] for c in completions}
    assert all(r["perplexity"] == pytest.approx(expected[r["request_id"]]) for r in summary)


def test_generate_cli_runs_add_up(root):
    """On S3 the CLI finds the endpoint and credentials in the standard AWS variables."""
    for extra in (["--temperature", "0"], ["--temperature", "0.9", "--top-k", "20", "--seed", "4"]):
        r = subprocess.run([sys.executable, "-m", "softwatch.cli", "generate", "hi", "--model", "tiny-random",
                            "--max-tokens", "6", "--data", root.uri, *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "softwatch.cli", "sql", "--data", root.uri, "--json",
                        "SELECT (SELECT count(*) FROM tokens) AS t, (SELECT sum(generated_tokens)::BIGINT FROM sequences) "
                        "AS g, (SELECT count(DISTINCT params_id) FROM tokens) AS p"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["t"] == out["g"] and 2 <= out["t"] <= 12 and out["p"] == 2


def test_empty_root_has_empty_views(root):
    store = Store(f"{root.uri}/nothing-yet")
    for table, schema in (("tokens", TOKENS), ("sequences", SEQUENCES), ("drift_reports", DRIFT_REPORTS)):
        result = store.query(f"SELECT * FROM {table}")
        assert result.num_rows == 0 and result.column_names == schema.names + ["dt"]


def test_new_files_are_seen_by_the_next_query(root, completions):
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM sequences") == 0
    with ParquetSink(root.uri) as sink:
        sink.write_completion(completions[0], RecordContext())
    assert count(store, "SELECT count(*) FROM sequences") == 1
    with ParquetSink(root.uri) as sink:
        sink.write_completion(completions[1], RecordContext())
    assert count(store, "SELECT count(*) FROM sequences") == 2


def test_uri_roots_read_through_pyarrow_datasets(tmp_path, completions):
    uri = f"file://{tmp_path}"
    with ParquetSink(uri) as sink:
        for c in completions:
            sink.write_completion(c, RecordContext())
    store = Store(uri)
    assert count(store, "SELECT count(*) FROM tokens WHERE dt >= DATE '2000-01-01'") == sum(len(c.token_ids) for c in completions)
    assert count(store, "SELECT count(*) FROM tokens WHERE dt < DATE '2000-01-01'") == 0
    assert count(store, "SELECT count(*) FROM drift_reports") == 0


@pytest.mark.parametrize("root", ["s3"], indirect=True)  # a local root is read through DuckDB's own glob
def test_a_query_racing_a_compaction_is_retried_and_counts_each_row_once(root, monkeypatch):
    """The files a query listed are merged and deleted before it reads them: the query lists
    again instead of failing, and reads each row once."""
    from softwatch.bench.store import synthetic_completions

    batch = synthetic_completions(12, hours=0.01)
    with ParquetSink(root.uri) as sink:
        for c in batch:
            sink.write_completion(c, RecordContext())
            sink.flush()  # one small file per request
    monkeypatch.setattr(rootlock, "SETTLE_S", 0.05)
    store = Store(root.uri)
    listing, compactions = store._dataset, []

    def list_then_compact(table, schema):  # the reader lists; a compaction runs before it reads
        dataset = listing(table, schema)
        if table == "tokens" and not compactions:
            compactions.append(compact(root.uri))
        return dataset

    monkeypatch.setattr(store, "_dataset", list_then_compact)
    assert count(store, "SELECT count(*) FROM tokens") == 12 * 256
    assert compactions[0].files_before == 2 * 12 and compactions[0].files_after == 2
    assert count(store, "SELECT count(*) FROM (SELECT DISTINCT request_id, position FROM tokens)") == 12 * 256
    assert count(store, "SELECT count(*) FROM sequences") == 12


def test_an_s3_endpoint_given_in_the_root_uri_needs_no_endpoint_variable(s3_endpoint, monkeypatch, tmp_path,
                                                                          completions):
    """`?endpoint_override=...&scheme=http&region=...` on the root: the way to name an endpoint per root
    (without `region`, pyarrow asks AWS itself where the bucket is)."""
    uri = f"{s3_endpoint.new_root().uri}?endpoint_override=127.0.0.1:{s3_endpoint.port}&scheme=http&region=us-east-1"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOFTWATCH_CACHE", str(tmp_path / "cache"))
    with ParquetSink(uri) as sink:
        for c in completions:
            sink.write_completion(c, RecordContext())
    store = Store(uri)
    assert count(store, "SELECT count(*) FROM sequences") == len(completions)
    assert count(store, "SELECT count(*) FROM tokens") == sum(len(c.token_ids) for c in completions)
    compact(uri)
    assert count(store, "SELECT count(*) FROM tokens") == sum(len(c.token_ids) for c in completions)


def test_partitions_by_day_and_prunes(root, completions):
    c = completions[0]
    old = type(c)(**{**c.__dict__, "request_id": "old", "created": time.time() - 3 * 86400})
    with ParquetSink(root.uri) as sink:
        sink.write_completion(c, RecordContext())
        sink.write_completion(old, RecordContext())
    days = root.names("tokens")
    assert len(days) == 2 and all(d.startswith("dt=") for d in days)
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens WHERE dt = current_date - 3") == len(old.token_ids)
    # A corrupt file in another day's partition is never opened when the query filters on dt.
    root.write_bytes("tokens/dt=2999-01-01/part-x-000000.parquet", b"not parquet")
    assert count(store, "SELECT count(*) FROM tokens WHERE dt BETWEEN current_date - 3 AND current_date") == \
        len(old.token_ids) + len(c.token_ids)
    with pytest.raises(Exception):
        store.query("SELECT count(*) FROM tokens")


def test_token_sample_rate_keeps_whole_requests(root):
    from softwatch.bench.store import synthetic_completions

    batch = synthetic_completions(400, hours=0.1)
    with ParquetSink(root.uri, token_sample_rate=0.25) as sink:
        for c in batch:
            sink.write_completion(c, RecordContext())
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM sequences") == 400
    kept = count(store, "SELECT count(*) FROM sequences WHERE tokens_kept")
    assert 60 <= kept <= 140
    assert kept == sum(keeps_tokens(c.request_id, 0.25) for c in batch)
    assert count(store, "SELECT count(*) FROM tokens") == count(
        store, "SELECT sum(generated_tokens) FROM sequences WHERE tokens_kept")


def test_flushes_by_age(root, completions):
    sink = ParquetSink(root.uri, flush_interval_s=0.2)
    sink.write_completion(completions[0], RecordContext())
    store = Store(root.uri)
    deadline = time.time() + 10
    while count(store, "SELECT count(*) FROM sequences") == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert count(store, "SELECT count(*) FROM sequences") == 1
    sink.close()


def test_a_failed_write_keeps_the_rows_for_the_next_flush(root, completions):
    sink = ParquetSink(root.uri, flush_interval_s=3600)
    sink.write_completion(completions[0], RecordContext())
    with root.writes_failing():
        with pytest.raises(OSError):
            sink.flush()
    sink.close()
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens") == len(completions[0].token_ids)
    assert count(store, "SELECT count(*) FROM sequences") == 1


def test_drift_reports_table_takes_rows(root):
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    with ParquetSink(root.uri) as sink:
        sink.write_row("drift_reports", {"report_id": "r1", "ts": now, "metric": "mean_entropy", "verdict": "drift"})
        with pytest.raises(ValueError, match="unknown table"):
            sink.write_row("nope", {})
    assert Store(root.uri).rows("SELECT report_id, verdict FROM drift_reports") == [
        {"report_id": "r1", "verdict": "drift"}]


def test_sigterm_loses_nothing(root):
    proc = subprocess.Popen([sys.executable, WRITER, root.uri, "hold", "300"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert not root.exists("tokens")  # all of it is still in the buffer
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM sequences") == 300
    assert count(store, "SELECT count(*) FROM tokens") == 300 * 256


def test_sigkill_after_answering_loses_no_record(root):
    """Records still in the buffer when the process is killed come back from the journal."""
    proc = subprocess.Popen([sys.executable, WRITER, root.uri, "hold", "120"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # every write_completion has returned
    proc.kill()
    proc.wait()
    assert not root.exists("sequences")
    assert len(list(root.journal_dir.glob("*.wal"))) == 1
    ParquetSink(root.uri).close()  # a new writer on this host recovers the dead one's journal
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM sequences") == 120
    assert count(store, "SELECT count(DISTINCT request_id) FROM sequences") == 120
    assert count(store, "SELECT count(*) FROM tokens") == 120 * 256
    assert not list(root.journal_dir.iterdir())
    ParquetSink(root.uri).close()
    assert count(store, "SELECT count(*) FROM sequences") == 120  # recovered once, not twice


def test_sigkill_mid_write_leaves_a_readable_dataset(root):
    """Locally a half-written file has a hidden temporary name; on S3 an upload cut short is
    never published."""
    proc = subprocess.Popen([sys.executable, WRITER, root.uri, "forever", "200"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while len(root.files("tokens")) < 5 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.137)
    proc.kill()
    proc.wait()
    store = Store(root.uri)
    tokens = count(store, "SELECT count(*) FROM tokens")
    assert tokens > 0 and tokens % 256 == 0  # only whole files, so whole sequences
    assert count(store, "SELECT count(*) FROM tokens WHERE entropy IS NULL") == 0
    for leftover in root.files(None, ".*.tmp") if root.local else []:
        os.utime(leftover, (0, 0))  # age any half-written file past the staleness limit
    result = compact(root.uri)
    assert not root.files(None, ".*.tmp")
    assert result.files_after < result.files_before
    assert count(store, "SELECT count(*) FROM tokens") == tokens


def test_two_writers_lose_nothing_and_collide_on_no_name(root):
    procs = [subprocess.Popen([sys.executable, WRITER, root.uri, "stream", "300"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    written = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert written == [["76800", "300"], ["76800", "300"]]
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens") == 2 * 76800
    assert count(store, "SELECT count(*) FROM (SELECT DISTINCT request_id, position FROM tokens)") == 2 * 76800
    assert count(store, "SELECT count(*) FROM sequences") == 600
    assert count(store, "SELECT count(DISTINCT request_id) FROM sequences") == 600


def test_two_writers_with_default_ids_never_share_a_file_name(root):
    procs = [subprocess.Popen([sys.executable, WRITER, root.uri, "stream", "200"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
    names = [f.rsplit("/", 1)[1] for f in root.files("sequences")]  # a batch's files share a name across tables
    writers = {n.split("-", 1)[1].rsplit("-", 1)[0] for n in names}
    assert len(writers) == 2 and len(names) == len(set(names))
    assert count(Store(root.uri), "SELECT count(*) FROM sequences") == 400


def test_compaction_while_writing_loses_and_duplicates_nothing(root, monkeypatch):
    monkeypatch.setattr(rootlock, "SETTLE_S", 0.2)  # the object-store lease's pause: a few compactions per write
    writer = subprocess.Popen([sys.executable, WRITER, root.uri, "stream", "600"], stdout=subprocess.PIPE, text=True)
    runs = 0
    while writer.poll() is None:
        compact(root.uri, target_bytes=64 << 20)
        runs += 1
    compact(root.uri, target_bytes=64 << 20)
    assert writer.returncode == 0 and runs >= 2
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens") == 600 * 256
    assert count(store, "SELECT count(*) FROM (SELECT DISTINCT request_id, position FROM tokens)") == 600 * 256
    assert count(store, "SELECT count(*) FROM sequences") == 600
    files = root.files("tokens")
    assert len(files) <= 2  # merged (one per day partition touched)


def test_an_interrupted_compaction_is_finished_by_the_next(root, completions):
    with ParquetSink(root.uri, flush_rows=5) as sink:
        for c in completions:
            sink.write_completion(c, RecordContext())
    inputs = root.files("tokens")
    partition = inputs[0].rsplit("/", 1)[0]
    assert inputs and {p.rsplit("/", 1)[0] for p in inputs} == {partition}
    # What a compaction killed between publishing its output and deleting its inputs leaves:
    import pyarrow.parquet as pq

    merged = pa.concat_tables([pq.read_table(p, filesystem=root.fs) for p in inputs])
    pq.write_table(merged, f"{partition}/compact-killed.parquet", filesystem=root.fs)
    day = partition.rsplit("/", 1)[1]
    root.write_bytes(f"tokens/{day}/_compact-killed.parquet.json",
                     json.dumps({"output": f"{partition}/compact-killed.parquet", "inputs": inputs}).encode())
    compact(root.uri)
    assert root.files("tokens") == [f"{partition}/compact-killed.parquet"]
    assert not root.files("tokens", "_compact-*")
    store = Store(root.uri)
    assert count(store, "SELECT count(*) FROM tokens") == sum(len(c.token_ids) for c in completions)
    assert count(store, "SELECT count(*) FROM (SELECT DISTINCT request_id, position FROM tokens)") == \
        sum(len(c.token_ids) for c in completions)
