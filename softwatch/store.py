"""The Parquet dataset of records: a buffered sink per writer process, DuckDB views over the
dataset, and compaction.

Layout: `<root>/<table>/dt=YYYY-MM-DD/part-<writer>-<n>.parquet`. Every writer names its
files with its own id, so any number of replicas write to one root without coordination.
On a local disk a file is written under a hidden temporary name and renamed into place;
object stores (S3, GCS) publish an object only when its upload completes. Either way a
reader never sees a half-written file, and a writer killed mid-write leaves only a hidden
`.tmp` file that readers ignore and compaction removes.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .completion import Completion
from .host import host_name
from .journal import Journal, claim_orphans, release
from .records import REGIME_COLUMNS, SCHEMAS, RecordContext, keeps_tokens, rows_table, sequence_row, token_table

log = logging.getLogger("softwatch.store")

DT = pa.field("dt", pa.date32())
TMP_SUFFIX = ".tmp"
JOURNAL_PREFIX = "_compact-"


def default_root() -> str:
    return os.environ.get("SOFTWATCH_DATA", "softwatch-data")


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of a dataset root: a local path or a pyarrow.fs URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _write_parquet(fs: pafs.FileSystem, table: pa.Table, final: str) -> None:
    """Write `table` so that `final` appears whole or not at all."""
    # Dictionary-encode the columns that repeat (regime, ids, counts), not the statistics:
    # on near-unique floats a dictionary only costs time.
    options = dict(compression="zstd", use_dictionary=[
        f.name for f in table.schema if not pa.types.is_floating(f.type) or f.name in REGIME_COLUMNS])
    if not _is_local(fs):
        pq.write_table(table, final, filesystem=fs, **options)
        return
    directory, name = final.rsplit("/", 1)
    tmp = f"{directory}/.{name}{TMP_SUFFIX}"
    pq.write_table(table, tmp, filesystem=fs, **options)
    fs.move(tmp, final)


def writer_id() -> str:
    """Unique per process: host, pid and a random part (pids repeat across containers)."""
    return f"{host_name()}-{os.getpid()}-{os.urandom(3).hex()}"


class ParquetSink:
    """Buffers records and writes them as Parquet files when a table holds `flush_rows`
    rows, when the oldest buffered record is `flush_interval_s` old, on `flush()`, on
    `close()`, at interpreter exit and on SIGTERM. Thread-safe. Adding a record only appends
    to a list: the Arrow conversion and the writes triggered by size or age happen on a
    background thread, so a decode loop never waits on them."""

    def __init__(
        self,
        root: str,
        *,
        flush_rows: int = 250_000,
        flush_interval_s: float = 10.0,
        token_sample_rate: float = 1.0,
        writer: str | None = None,
        journal: str | None = "auto",
        flush_on_sigterm: bool = True,
    ):
        if not 0 <= token_sample_rate <= 1:
            raise ValueError(f"token_sample_rate must be in [0, 1], got {token_sample_rate}")
        if flush_rows < 1 or flush_interval_s <= 0:
            raise ValueError("flush_rows must be >= 1 and flush_interval_s > 0")
        self.fs, self.path = open_root(root)
        self.fs.create_dir(self.path, recursive=True)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.token_sample_rate = token_sample_rate
        self.writer = writer or writer_id()
        self.rows_written = dict.fromkeys(SCHEMAS, 0)
        self._files = count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # one writer of files at a time
        self._pending = _Pending()
        self._oldest: float | None = None
        self._closed = False
        self._journal = None
        if journal is not None:
            directory = _journal_dir(self.fs, self.path) if journal == "auto" else journal
            self._recover(directory)
            self._journal = Journal(directory, self.writer)
        self._thread = threading.Thread(target=self._background, name="softwatch-sink", daemon=True)
        self._thread.start()
        _register(self, flush_on_sigterm)

    # ---- adding records -------------------------------------------------------------------
    def write_completion(self, completion: Completion, context: RecordContext, prompt: str | None = None) -> None:
        """The sequence row of a finished request, and its token rows unless sampled out."""
        kept = keeps_tokens(completion.request_id, self.token_sample_rate)
        record = (completion, context, kept, prompt)
        with self._adding() as pending:
            if self._journal is not None:  # before the caller answers the request
                self._journal.append((_portable(completion), context, kept, prompt))
            pending.completions.append(record)
            pending.counts["sequences"] += 1
            pending.counts["tokens"] += len(completion.token_ids) if kept else 0

    def write(self, table: str, data: pa.Table | pa.RecordBatch) -> None:
        """Rows already in Arrow form (a drift report, a replay)."""
        schema = _schema(table)
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not data.schema.equals(schema):
            try:
                data = data.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"data does not match the {table} schema: {exc}") from exc
        with self._adding() as pending:
            pending.tables[table].append(data)
            pending.counts[table] += data.num_rows

    def write_row(self, table: str, row: dict) -> None:
        _schema(table)
        with self._adding() as pending:
            pending.rows[table].append(row)
            pending.counts[table] += 1

    @contextmanager
    def _adding(self):
        with self._lock:
            if self._closed:
                raise RuntimeError("the sink is closed")
            yield self._pending
            if self._oldest is None:
                self._oldest = time.monotonic()
            if self._pending.full(self.flush_rows):
                self._wake.notify()

    # ---- writing --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything buffered now. If a file cannot be written this raises, and the
        rows stay buffered for the next attempt."""
        with self._write_lock:
            with self._lock:
                pending, self._pending, self._oldest = self._pending, _Pending(), None
                if self._journal is not None and pending.completions:
                    pending.segments += self._journal.rotate()
            try:
                self._write(pending.tables_to_write())
            except Exception:
                with self._lock:
                    self._pending.segments += pending.segments
                raise
            release(pending.segments)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self.flush()
        if self._journal is not None:
            release(self._journal.close())
        _unregister(self)

    def _recover(self, directory: str) -> None:
        """Take in the journaled records of dead writers; they go out with the next flush."""
        for segment, records in claim_orphans(directory, self.writer):
            log.warning("softwatch: recovering %d records journaled by a writer that died (%s)", len(records), segment)
            self._pending.completions += records
            for c, _, kept, _ in records:
                self._pending.counts["sequences"] += 1
                self._pending.counts["tokens"] += len(c.token_ids) if kept else 0
            self._pending.segments.append(segment)
        if self._pending.segments:
            self._oldest = time.monotonic()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, tables: dict[str, pa.Table]) -> None:
        for table, data in list(tables.items()):
            try:
                self._write_table(table, data)
            except Exception:
                with self._lock:  # back to the front of the buffer, for the next flush
                    for name, left in tables.items():
                        self._pending.tables[name].insert(0, left)
                        self._pending.counts[name] += left.num_rows
                    self._oldest = self._oldest or time.monotonic()
                raise
            del tables[table]
            self.rows_written[table] += data.num_rows

    def _write_table(self, table: str, data: pa.Table) -> None:
        days = _days(data["ts"])
        unique = pc.unique(days).to_pylist()
        for day in unique:
            part = data if len(unique) == 1 else data.filter(pc.equal(days, day))
            directory = f"{self.path}/{table}/dt={day.isoformat()}"
            self.fs.create_dir(directory, recursive=True)
            _write_parquet(self.fs, part, f"{directory}/part-{self.writer}-{next(self._files):06d}.parquet")

    def _background(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._due():
                    wait = self.flush_interval_s if self._oldest is None else \
                        max(0.01, self._oldest + self.flush_interval_s - time.monotonic())
                    self._wake.wait(wait)
                if self._closed:
                    return
            try:
                self.flush()
            except Exception:  # kept buffered; retried on the next trigger
                log.exception("softwatch: writing records to %s failed; will retry", self.path)
                time.sleep(min(self.flush_interval_s, 5.0))

    def _due(self) -> bool:
        if self._pending.full(self.flush_rows):
            return True
        return self._oldest is not None and time.monotonic() - self._oldest >= self.flush_interval_s


@dataclass
class _Pending:
    """What a sink holds between flushes."""

    completions: list[tuple[Completion, RecordContext, bool, str | None]] = field(default_factory=list)
    tables: dict[str, list[pa.Table]] = field(default_factory=lambda: {t: [] for t in SCHEMAS})
    rows: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in SCHEMAS})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCHEMAS, 0))
    segments: list[str] = field(default_factory=list)  # journal segments these records came from

    def full(self, flush_rows: int) -> bool:
        return any(n >= flush_rows for n in self.counts.values())

    def tables_to_write(self) -> dict[str, pa.Table]:
        parts = {t: list(self.tables[t]) for t in SCHEMAS}
        if self.completions:
            parts["tokens"].append(token_table([(c, ctx) for c, ctx, kept, _ in self.completions if kept]))
            self.rows["sequences"] = [sequence_row(c, ctx, kept, prompt) for c, ctx, kept, prompt in self.completions] \
                + self.rows["sequences"]
        for table, rows in self.rows.items():
            if rows:
                parts[table].append(rows_table(rows, SCHEMAS[table]))
        return {t: pa.concat_tables(p) for t, p in parts.items() if p and sum(x.num_rows for x in p)}


def _portable(c: Completion) -> Completion:
    """The completion with its statistics as a NumPy copy: a torch tensor pickles through
    torch.save, slowly, and a view pickles its whole storage."""
    return dataclasses.replace(c, stats=None if c.stats is None else c.stats.numpy().copy())


def _journal_dir(fs: pafs.FileSystem, path: str) -> str:
    """Next to the data on a local root; in the local cache for an object-store root."""
    if _is_local(fs):
        return f"{path}/_journal"
    from .models import cache_root

    return os.path.join(cache_root(), "journal", hashlib.blake2b(path.encode(), digest_size=6).hexdigest())


def _days(ts: pa.ChunkedArray) -> pa.ChunkedArray:
    """UTC calendar day of each timestamp, without needing a time-zone database."""
    micros = pc.cast(ts, pa.int64())
    return pc.cast(pc.cast(pc.divide(micros, 86_400_000_000), pa.int32()), pa.date32())


def _schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; tables are {', '.join(SCHEMAS)}") from None


# ---- flushing every open sink at exit and on SIGTERM ------------------------------------------
_open_sinks: weakref.WeakSet[ParquetSink] = weakref.WeakSet()
_sigterm_installed = False


def _register(sink: ParquetSink, flush_on_sigterm: bool) -> None:
    """Close the sink at exit, and (unless the host process shuts down in its own order, as
    vLLM's engine does) on SIGTERM."""
    global _sigterm_installed
    _open_sinks.add(sink)
    if not flush_on_sigterm or _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        _close_all()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True


def _unregister(sink: ParquetSink) -> None:
    _open_sinks.discard(sink)


def _close_all() -> None:
    for sink in list(_open_sinks):
        try:
            sink.close()
        except Exception:
            log.exception("softwatch: flushing records to %s failed", sink.path)


atexit.register(_close_all)


# ---- reading ------------------------------------------------------------------------------------
class Store:
    """DuckDB over the dataset, with views `tokens`, `sequences`, `drift_reports` and `probes`.
    `dt` is a DATE partition column: filter on it to read only the days you need. New files
    are seen by the next query. Every file of a table has the table's schema (records.py);
    a schema change must come with a rewrite of older files."""

    def __init__(self, root: str | None = None):
        self.root = root or default_root()
        self.fs, self.path = open_root(self.root)
        self.con = duckdb.connect()
        self._native = dict.fromkeys(SCHEMAS, False)

    def query(self, sql: str, params: list | dict | None = None) -> pa.Table:
        """Run SQL over the views; the result as an Arrow table."""
        for attempt in range(3):
            self._refresh()
            try:
                relation = self.con.sql(sql, params=params)
                return relation.to_arrow_table() if relation is not None else pa.table({})
            except duckdb.IOException as exc:  # a file compacted away between listing and reading
                if attempt == 2 or "No such file" not in str(exc) and "not found" not in str(exc).lower():
                    raise

    def rows(self, sql: str, params: list | dict | None = None) -> list[dict]:
        return self.query(sql, params).to_pylist()

    def close(self) -> None:
        self.con.close()

    def _refresh(self) -> None:
        for table, schema in SCHEMAS.items():
            if self._native[table]:
                continue  # a read_parquet glob sees new files by itself
            directory = f"{self.path}/{table}"
            if _is_local(self.fs) and _has_files(self.fs, directory):
                glob = f"{directory}/dt=*/*.parquet".replace("'", "''")
                self.con.unregister(table)  # the empty stand-in registered while there were no files
                self.con.execute(
                    f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{glob}', "
                    "hive_partitioning = true, hive_types = {'dt': DATE})"
                )
                self._native[table] = True
            else:
                self.con.register(table, self._dataset(table, schema))

    def _dataset(self, table: str, schema: pa.Schema) -> ds.Dataset | pa.Table:
        full = schema.append(DT)
        directory = f"{self.path}/{table}"
        if not _has_files(self.fs, directory):
            return full.empty_table()
        partitioning = ds.partitioning(pa.schema([DT]), flavor="hive")
        return ds.dataset(directory, filesystem=self.fs, format="parquet", partitioning=partitioning, schema=full)


def _has_files(fs: pafs.FileSystem, directory: str) -> bool:
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return False
    return any(_is_data_file(i) for i in infos)


def _is_data_file(info: pafs.FileInfo) -> bool:
    return info.type == pafs.FileType.File and info.base_name.endswith(".parquet") \
        and not info.base_name.startswith((".", "_"))


# ---- compaction ---------------------------------------------------------------------------------
@dataclass
class CompactionResult:
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows_moved: int = 0
    stale_removed: int = 0


def compact(
    root: str | None = None,
    *,
    target_bytes: int = 128 << 20,
    stale_after_s: float = 3600.0,
    progress: Callable[[str], None] | None = None,
) -> CompactionResult:
    """Merge each partition's small files into files of about `target_bytes`.

    Safe while writers keep writing: writers only ever add files under new names, and
    compaction only touches the files it listed. Each merge is journaled (inputs, output)
    before its output appears, so a compaction killed midway is finished by the next one
    instead of leaving rows twice. A query running at the instant the inputs are deleted
    may see the merged rows twice or a missing file; `Store.query` retries the latter.
    Run one compaction at a time per root."""
    fs, path = open_root(root or default_root())
    result = CompactionResult()
    say = progress or (lambda message: None)
    for table in SCHEMAS:
        base = f"{path}/{table}"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        for partition in sorted(i.path for i in infos if i.type == pafs.FileType.Directory):
            _finish_journals(fs, partition)
            result.stale_removed += _remove_stale(fs, partition, stale_after_s)
            files = sorted(
                (i for i in fs.get_file_info(pafs.FileSelector(partition)) if _is_data_file(i)),
                key=lambda i: i.path,
            )
            result.partitions += 1
            result.files_before += len(files)
            groups = _groups([i for i in files if i.size < target_bytes // 2], target_bytes)
            result.files_after += len(files) - sum(len(g) - 1 for g in groups)
            for n, group in enumerate(groups):
                say(f"{table}/{partition.rsplit('/', 1)[1]}: merging {len(group)} files ({n + 1}/{len(groups)})")
                result.rows_moved += _merge(fs, partition, [i.path for i in group], _schema(table))
    return result


def _groups(small: list[pafs.FileInfo], target_bytes: int) -> list[list[pafs.FileInfo]]:
    groups, current, size = [], [], 0
    for info in small:
        if current and size + info.size > target_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(info)
        size += info.size
    groups.append(current)
    return [g for g in groups if len(g) >= 2]


def _merge(fs: pafs.FileSystem, partition: str, inputs: list[str], schema: pa.Schema) -> int:
    tables = [pq.read_table(p, filesystem=fs) for p in inputs]
    merged = pa.concat_tables(tables, promote_options="permissive")
    merged = merged.select([n for n in schema.names if n in merged.column_names]).sort_by("ts")
    name = f"compact-{writer_id()}.parquet"
    journal = f"{partition}/{JOURNAL_PREFIX}{name}.json"
    _write_bytes(fs, journal, json.dumps({"output": f"{partition}/{name}", "inputs": inputs}).encode())
    _write_parquet(fs, merged, f"{partition}/{name}")
    _delete(fs, inputs)
    fs.delete_file(journal)
    return merged.num_rows


def _finish_journals(fs: pafs.FileSystem, partition: str) -> None:
    """Complete or undo merges that a killed compaction left half done."""
    for info in fs.get_file_info(pafs.FileSelector(partition)):
        if not info.base_name.startswith(JOURNAL_PREFIX):
            continue
        with fs.open_input_stream(info.path) as f:
            journal = json.loads(f.read())
        if fs.get_file_info(journal["output"]).type == pafs.FileType.File:
            _delete(fs, journal["inputs"])  # the merged file is in place: drop what it replaces
        fs.delete_file(info.path)


def _remove_stale(fs: pafs.FileSystem, partition: str, stale_after_s: float) -> int:
    """Temporary files of writers that died mid-write (a live writer renames within seconds)."""
    now = time.time()
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(partition))
             if i.base_name.endswith(TMP_SUFFIX) and i.mtime is not None and now - i.mtime.timestamp() > stale_after_s]
    _delete(fs, stale)
    return len(stale)


def _delete(fs: pafs.FileSystem, paths: list[str]) -> None:
    for p in paths:
        if fs.get_file_info(p).type == pafs.FileType.File:
            fs.delete_file(p)


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def wait_for_records(root: str, request_ids: list[str], timeout_s: float = 60.0) -> None:
    """Block until the `sequences` rows of these record ids are in the dataset (writers flush on
    an interval)."""
    wanted = set(request_ids)
    deadline = time.monotonic() + timeout_s
    store = Store(root)
    try:
        while True:
            found = set(store.query("SELECT request_id FROM sequences").column("request_id").to_pylist())
            if wanted <= found:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"records of {len(wanted - found)} of {len(wanted)} requests did not reach "
                                   f"{root} within {timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        store.close()
