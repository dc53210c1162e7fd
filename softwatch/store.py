"""The Parquet dataset of records: a buffered sink per writer process, DuckDB views over the
dataset, and compaction.

Layout: `<root>/<table>/dt=YYYY-MM-DD/part-<writer>-<n>.parquet`. Every writer names its
files with its own id, so any number of replicas write to one root without coordination.
On a local disk a file is written under a hidden temporary name and renamed into place,
and a writer killed mid-write leaves only a hidden `.tmp` file that readers ignore and
compaction removes; object stores (S3, GCS) publish an object only when its upload
completes, and an upload cut short publishes nothing. Either way a reader never sees a
half-written file. Object stores have no directories (none are made there) and no rename;
tests/test_store.py and tests/test_journal.py run against a local root and an S3 endpoint.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import journal, rootlock
from .completion import Completion
from .entries import Entry, decode, encode
from .host import host_name
from .records import REGIME_COLUMNS, SCHEMAS, RecordContext, keeps_tokens, rows_table, sequence_row, token_table
from .renames import rename_noreplace

log = logging.getLogger("softwatch.store")

DT = pa.field("dt", pa.date32())
TMP_SUFFIX = ".tmp"
JOURNAL_PREFIX = "_compact-"
COMPACT_PREFIX = "compact-"
SOURCES_KEY = b"softwatch.sources"  # in a compacted file: the names of the files it merged
# ... and where each merged `part-` file's rows lie in it: {part: [start, stop)} (row numbers);
# absent in a file merged (directly or through another) before it was recorded
SOURCE_ROWS_KEY = b"softwatch.source_rows"


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


def _make_dir(fs: pafs.FileSystem, directory: str) -> None:
    """A directory on a local disk. An object store has none: a key is written under any
    prefix, and pyarrow's markers for empty directories would only cost requests."""
    if _is_local(fs):
        fs.create_dir(directory, recursive=True)


def _write_parquet(fs: pafs.FileSystem, table: pa.Table, final: str) -> None:
    """Write `table` so that `final` appears whole or not at all. On a local disk a file that
    has the name already stays, and this raises FileExistsError. An object store has no
    rename and pyarrow no conditional write, so there the name is not guarded: names are
    unique to their writer, and the only writes that meet an existing one (a retried flush, a
    recovery that found no file) hold the same rows."""
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
    try:
        rename_noreplace(tmp, final)
    except BaseException:
        fs.delete_file(tmp)
        raise


def writer_id() -> str:
    """Unique per process: the host name and pid say where it ran; 64 random bits make it unique
    (host names are shared by pods, pids repeat across containers)."""
    return f"{host_name()}-{os.getpid()}-{os.urandom(8).hex()}"


class RecordNotDurable(RuntimeError):
    """A record could not be made durable: the journal append failed (a full disk), or too
    many rows wait for flushes that keep failing. Nothing of it was kept, and the request it
    records must not be answered as a success (the serving layer answers 503)."""


FLUSH_POINTS = ("start", "tokens", "sequences", "released")
"""Where a flush of journaled records stands: before its first file, after the files of each
table, after its journal segment is deleted. `ParquetSink.at_flush_point` is called at each."""


class ParquetSink:
    """Buffers records and writes them as Parquet files when a table holds `flush_rows`
    rows, when the oldest buffered record is `flush_interval_s` old, on `flush()`, on
    `close()`, at interpreter exit and on SIGTERM. Thread-safe. Adding a record appends to
    the journal and a list: the Arrow conversion and the writes triggered by size or age
    happen on a background thread, so a decode loop never waits on them.

    Finished requests go out in batches, one per journal segment, in files named after the
    segment (`part-<segment>.parquet`): writing a batch again (a retry, or a recovery after
    a kill mid-flush) skips the files already in place instead of adding rows. No file or
    segment is ever replaced: names start with `writer`, made unique to this sink (an id
    given by the caller comes back when its process restarts). At most `max_pending_rows`
    journaled rows wait for Parquet; past that, `write_completion` raises `RecordNotDurable`
    until a flush succeeds. The segments of dead writers that this sink recovers are
    written at once, one at a time, and count against no bound: they are read from disk
    when their turn comes. A sink looks for dead writers' segments as it starts and then
    every `recover_interval_s`, so that the journal of a writer whose node never comes back
    is written by whichever writer of the root is still alive. `journal`: the directory of the
    segments ("auto": `journal_dir(root)`), or None for no journal (a killed process loses what
    it buffered)."""

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
        max_pending_rows: int = 2_000_000,
        recover_interval_s: float = 10.0,
    ):
        if not 0 <= token_sample_rate <= 1:
            raise ValueError(f"token_sample_rate must be in [0, 1], got {token_sample_rate}")
        if flush_rows < 1 or flush_interval_s <= 0 or max_pending_rows < 1 or recover_interval_s <= 0:
            raise ValueError("flush_rows and max_pending_rows must be >= 1, flush_interval_s and recover_interval_s > 0")
        self.fs, self.path = open_root(root)
        _make_dir(self.fs, self.path)  # on an object store, nothing: a sink starts while the store is unreachable
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.token_sample_rate = token_sample_rate
        self.max_pending_rows = max_pending_rows
        self.recover_interval_s = recover_interval_s
        self.writer = writer_id() if writer is None else f"{writer}-{os.urandom(8).hex()}"
        self.rows_written = dict.fromkeys(SCHEMAS, 0)
        self._files = count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # one writer of files at a time
        self._pending = _Pending()
        self._entries: list[Entry] = []  # finished requests since the current segment began
        self._segment: journal.Segment | None = None
        self._batches: list[_Batch] = []  # sealed, not yet in Parquet
        self._backlog = 0  # rows of finished requests not yet in Parquet, but for recovered ones
        self._oldest: float | None = None
        self._closed = False
        self._journal_dir = None
        self._next_recovery = time.monotonic() + recover_interval_s
        if journal is not None:
            self._journal_dir = journal_dir(root) if journal == "auto" else journal
            if not _is_local(self.fs) and self._journal_dir == journal_dir(root):
                log.warning("softwatch: the journal of %s is on this node's disk (%s): the records it holds before "
                            "they reach the store are lost if this node is lost for good; give the writers a shared "
                            "journal directory (softwatch serve --journal, the `journal` app arg)",
                            root, self._journal_dir)
            self._recover()
        self._thread = threading.Thread(target=self._background, name="softwatch-sink", daemon=True)
        self._thread.start()
        _register(self, flush_on_sigterm)

    def at_flush_point(self, point: str) -> None:
        """A seam for fault tests: a flush calls it at each of FLUSH_POINTS. Patched on the class,
        it also sees the flush of recovered segments that starts as the sink is created."""

    # ---- adding records -------------------------------------------------------------------
    def write_completion(self, completion: Completion, context: RecordContext, prompt: str | None = None) -> None:
        """The sequence row of a finished request, and its token rows unless sampled out.
        Returns once the record is journaled; raises `RecordNotDurable` if it cannot be."""
        kept = keeps_tokens(completion.request_id, self.token_sample_rate)
        try:  # a row Parquet cannot take must be refused now: journaled, it would block every later flush
            rows_table([sequence_row(completion, context, kept, prompt)], SCHEMAS["sequences"])
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            raise RecordNotDurable(f"the record of {completion.request_id!r} does not fit the dataset: {exc}") from exc
        entry = Entry(completion, context, kept, prompt)
        payload = encode(entry) if self._journal_dir is not None else None
        tokens = len(completion.token_ids) if kept else 0
        with self._adding() as pending:
            if self._backlog and self._backlog + 1 + tokens > self.max_pending_rows:
                raise RecordNotDurable(f"{self._backlog} rows wait for Parquet writes to {self.path} that keep failing")
            if payload is not None:  # before the caller answers the request
                self._journal_append(payload)
            self._entries.append(entry)
            self._backlog += 1 + tokens
            pending.counts["sequences"] += 1
            pending.counts["tokens"] += tokens

    def _journal_append(self, payload: bytes) -> None:
        try:
            if self._segment is None:
                self._segment = journal.create(self._journal_dir, self._batch_name())
            self._segment.append(payload)
        except OSError as exc:
            if self._segment is not None and self._segment.broken:
                self._seal()  # its good records go out with the next flush; appends go to a new segment
            raise RecordNotDurable(f"journaling a record in {self._journal_dir} failed: {exc}") from exc

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
                self._seal()
                batches = list(self._batches)
                loose, self._pending, self._oldest = self._pending.tables_to_write(), _Pending(), None
            try:
                for batch in batches:
                    self._write_batch(batch)
                self._write(loose)
            except Exception:
                with self._lock:
                    self._oldest = self._oldest or time.monotonic()
                    for name, left in loose.items():  # back to the front of the buffer
                        self._pending.tables[name].insert(0, left)
                        self._pending.counts[name] += left.num_rows
                raise

    def _seal(self) -> None:
        """The requests since the last seal become a batch, with their journal segment."""
        if not self._entries and self._segment is None:
            return
        name = self._segment.name if self._segment is not None else self._batch_name()
        self._batches.append(_Batch(name, self._entries, self._segment))
        self._entries, self._segment = [], None

    def _batch_name(self) -> str:
        return f"{self.writer}-{next(self._files):06d}"

    def _write_batch(self, batch: _Batch) -> None:
        self.at_flush_point("start")
        for table, data in batch.tables().items():
            for directory, part in self._by_day(table, data):
                path = f"{directory}/part-{batch.name}.parquet"
                if path in batch.written or batch.recovered and _holds(self.fs, directory, path):
                    continue
                _make_dir(self.fs, directory)
                _write_parquet(self.fs, part, path)
                batch.written.add(path)
                self.rows_written[table] += part.num_rows
            self.at_flush_point(table)
        with self._lock:
            self._batches.remove(batch)
            if not batch.recovered:
                self._backlog -= batch.rows()
        if batch.segment is not None:
            batch.segment.release()
        batch.entries = None  # written: a long recovered backlog is held one segment at a time
        self.at_flush_point("released")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        try:
            self.flush()
        finally:
            with self._lock:
                self._seal()
                for batch in self._batches:  # unwritten: left, unlocked, for the next sink to recover
                    if batch.segment is not None:
                        batch.segment.close()
            _unregister(self)

    def _recover(self) -> None:
        """Take over the journal segments of dead writers: the next flush, due at once, writes them.
        Every segment in the journal directory is a candidate, whichever host wrote it: its lock
        says whether its writer lives."""
        claimed = [_Batch(segment.name, None, segment, recovered=True)
                   for segment in journal.claim_orphans(self._journal_dir)]
        with self._lock:
            self._batches.extend(claimed)

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, tables: dict[str, pa.Table]) -> None:
        for table, data in list(tables.items()):
            for directory, part in self._by_day(table, data):
                _make_dir(self.fs, directory)
                _write_parquet(self.fs, part, f"{directory}/part-{self._batch_name()}.parquet")
            del tables[table]
            self.rows_written[table] += data.num_rows

    def _by_day(self, table: str, data: pa.Table) -> Iterator[tuple[str, pa.Table]]:
        """(partition directory, rows) of each day the rows fall on."""
        days = _days(data["ts"])
        unique = pc.unique(days).to_pylist()
        for day in unique:
            yield f"{self.path}/{table}/dt={day.isoformat()}", data if len(unique) == 1 else data.filter(pc.equal(days, day))

    def _background(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._due() and not self._recovery_due():
                    wait = self.flush_interval_s if self._oldest is None else \
                        max(0.01, self._oldest + self.flush_interval_s - time.monotonic())
                    if self._journal_dir is not None:
                        wait = min(wait, max(0.01, self._next_recovery - time.monotonic()))
                    self._wake.wait(wait)
                if self._closed:
                    return
                recovering = self._recovery_due()
            if recovering:
                self._next_recovery = time.monotonic() + self.recover_interval_s
                try:
                    self._recover()
                except OSError:  # an unreadable journal directory: the records of live writers still go out
                    log.exception("softwatch: looking for dead writers' journals in %s failed", self._journal_dir)
                with self._lock:
                    due = self._due()
                if not due:
                    continue
            try:
                self.flush()
            except Exception:  # kept buffered; retried on the next trigger
                log.exception("softwatch: writing records to %s failed; will retry", self.path)
                time.sleep(min(self.flush_interval_s, 5.0))

    def _recovery_due(self) -> bool:
        return self._journal_dir is not None and time.monotonic() >= self._next_recovery

    def _due(self) -> bool:
        if self._pending.full(self.flush_rows) or any(batch.recovered for batch in self._batches):
            return True
        return self._oldest is not None and time.monotonic() - self._oldest >= self.flush_interval_s


@dataclass
class _Batch:
    """Finished requests that go out together, in files named after the batch (`name`)."""

    name: str
    entries: list[Entry] | None  # None: a recovered segment's, not read yet
    segment: journal.Segment | None  # the journal segment holding them, locked by this process
    recovered: bool = False  # journaled by a writer that died, maybe midway through writing it
    written: set[str] = field(default_factory=set)  # files already in place

    def rows(self) -> int:
        return sum(1 + (len(e.completion.token_ids) if e.tokens_kept else 0) for e in self.read())

    def read(self) -> list[Entry]:
        """The entries; a recovered batch reads them from its segment when first asked."""
        if self.entries is None:
            self.entries = _read_segment(self.segment)
        return self.entries

    def tables(self) -> dict[str, pa.Table]:
        """Token rows first: a sequence row in the dataset means its token rows are there too."""
        entries = self.read()
        if not entries:
            return {}
        return {
            "tokens": token_table([(e.completion, e.context) for e in entries if e.tokens_kept]),
            "sequences": rows_table([sequence_row(e.completion, e.context, e.tokens_kept, e.prompt)
                                     for e in entries], SCHEMAS["sequences"]),
        }


def _read_segment(segment: journal.Segment) -> list[Entry]:
    """The entries journaled in a dead writer's segment, but for unreadable ones (logged)."""
    entries = []
    for frame in journal.frames(segment):
        try:
            entries.append(decode(frame))
        except ValueError:
            log.exception("softwatch: skipping an unreadable entry of %s", segment.path)
    log.warning("softwatch: recovering %d records journaled by a writer that died (%s)", len(entries), segment.path)
    return entries


@dataclass
class _Pending:
    """Rows given in Arrow or dict form (`write`, `write_row`) between flushes, and the row
    counts that trigger a flush by size."""

    tables: dict[str, list[pa.Table]] = field(default_factory=lambda: {t: [] for t in SCHEMAS})
    rows: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in SCHEMAS})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCHEMAS, 0))

    def full(self, flush_rows: int) -> bool:
        return any(n >= flush_rows for n in self.counts.values())

    def tables_to_write(self) -> dict[str, pa.Table]:
        parts = {t: list(self.tables[t]) for t in SCHEMAS}
        for table, rows in self.rows.items():
            if rows:
                parts[table].append(rows_table(rows, SCHEMAS[table]))
        return {t: pa.concat_tables(p) for t, p in parts.items() if p and sum(x.num_rows for x in p)}


def _holds(fs: pafs.FileSystem, directory: str, path: str) -> bool:
    """Whether the partition holds the rows of `path`: the file itself, or a compacted file
    that merged it (compaction lists its inputs in the output's metadata)."""
    if fs.get_file_info(path).type == pafs.FileType.File:
        return True
    name = path.rsplit("/", 1)[1]
    for info in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
        if _is_data_file(info) and info.base_name.startswith(COMPACT_PREFIX) and name in _sources(fs, info.path):
            return True
    return False


def journal_dir(root: str, shared: str | None = None) -> str:
    """The journal directory of `root`'s writers. Under `shared` when given: a POSIX directory
    mounted on every node (NFS, EFS), holding one subdirectory per root, where any node's writer
    recovers the segments of a node that died. Else next to the data on a local root, and in
    this node's cache for an object-store root."""
    fs, path = open_root(root)
    if shared is None and _is_local(fs):
        return f"{path}/_journal"
    if shared is None:
        from .models import cache_root

        shared = os.path.join(cache_root(), "journal")
    return os.path.join(shared, hashlib.blake2b(path.encode(), digest_size=6).hexdigest())


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
    are seen by the next query. Columns are only ever added to a table's schema (records.py):
    files written before a column existed read it as null; renaming or retyping a column
    needs a rewrite of them."""

    def __init__(self, root: str | None = None):
        self.root = root or default_root()
        self.fs, self.path = open_root(self.root)
        self.con = duckdb.connect()
        self._native = dict.fromkeys(SCHEMAS, False)
        self._union = False  # some day mixes files of an older schema with newer ones

    def query(self, sql: str, params: list | dict | None = None) -> pa.Table:
        """Run SQL over the views; the result as an Arrow table."""
        for attempt in range(3):
            self._refresh()
            try:
                relation = self.con.sql(sql, params=params)
                return relation.to_arrow_table() if relation is not None else pa.table({})
            except (duckdb.IOException, duckdb.InvalidInputException) as exc:
                if vanished(exc):  # a file compacted away between listing and reading: list again
                    if attempt == 2:
                        raise
                    continue
                # A newer file listed before an older one.
                if not isinstance(exc, duckdb.InvalidInputException) or self._union or "schema mismatch" not in str(exc):
                    raise
                self._union = True
                self._native = dict.fromkeys(SCHEMAS, False)

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
                self._create_view(table, schema, glob, self._union)
                self._native[table] = True
            else:
                self.con.register(table, self._dataset(table, schema))

    def _create_view(self, table: str, schema: pa.Schema, glob: str, union: bool) -> None:
        """The view over a table's files. DuckDB takes the columns of the first file (the
        oldest day): when it has the full schema, so does every newer file, and days a query
        filters out are never opened. Otherwise union_by_name, which opens every file's footer
        on each query, reads the columns older files lack as null, and the empty table of the
        full schema adds the columns no file has yet."""
        options = "hive_partitioning = true, hive_types = {'dt': DATE}" + (", union_by_name = true" if union else "")
        select = f"SELECT * FROM read_parquet('{glob}', {options})"
        if union:
            self.con.register(f"{table}__schema", schema.append(DT).empty_table())
            select += f" UNION ALL BY NAME SELECT * FROM {table}__schema"
        self.con.execute(f"CREATE OR REPLACE VIEW {table} AS {select}")
        columns = {row[0] for row in self.con.execute(f"DESCRIBE {table}").fetchall()}
        if not union and not set(schema.names) <= columns:
            self._create_view(table, schema, glob, union=True)

    def _dataset(self, table: str, schema: pa.Schema) -> ds.Dataset | pa.Table:
        full = schema.append(DT)
        directory = f"{self.path}/{table}"
        if not _has_files(self.fs, directory):
            return full.empty_table()
        partitioning = ds.partitioning(pa.schema([DT]), flavor="hive")
        return ds.dataset(directory, filesystem=self.fs, format="parquet", partitioning=partitioning, schema=full)


def vanished(exc: BaseException) -> bool:
    """Whether a read failed on a file that was listed and is gone (compacted away since):
    a FileNotFoundError, DuckDB's own reader on a local disk, or a pyarrow dataset on a local
    disk or an object store (S3 says NO_SUCH_KEY, NoSuchKey or RESOURCE_NOT_FOUND)."""
    if isinstance(exc, FileNotFoundError):
        return True
    message = str(exc).lower()
    return any(m in message for m in ("no such file", "path does not exist", "no_such_key", "nosuchkey",
                                      "not found", "not_found"))


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
    instead of leaving rows twice; the output lists the `part-` files it holds in its
    metadata (`softwatch.sources`), so a writer recovering a journal segment whose file was
    merged does not write it again. A query running at the instant the inputs are deleted
    may see the merged rows twice or a missing file; `Store.query` retries the latter.
    One compaction at a time per root: a second raises `rootlock.CompactionRunning`."""
    fs, path = open_root(root or default_root())
    result = CompactionResult()
    say = progress or (lambda message: None)
    with rootlock.exclusive(fs, path) as renew:
        for table in SCHEMAS:
            for partition in _partitions(fs, f"{path}/{table}"):
                _compact_partition(fs, partition, _schema(table), target_bytes, stale_after_s, result, say)
                renew()
    return result


def _partitions(fs: pafs.FileSystem, table_dir: str) -> list[str]:
    """The partition directories of a table; none while the table has no directory. pyarrow's
    `allow_not_found` raises when the directory appears while it looks (a writer's first file)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(table_dir, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory)


def _compact_partition(fs: pafs.FileSystem, partition: str, schema: pa.Schema, target_bytes: int,
                       stale_after_s: float, result: CompactionResult, say: Callable[[str], None]) -> None:
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
    label = "/".join(partition.rsplit("/", 2)[1:])
    for n, group in enumerate(groups):
        say(f"{label}: merging {len(group)} files ({n + 1}/{len(groups)})")
        result.rows_moved += _merge(fs, partition, [i.path for i in group], schema)


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
    sources = sorted({name for p, t in zip(inputs, tables) for name in _held_parts(p, t.schema.metadata)})
    # in input order, not sorted: each part's rows stay one run of rows (SOURCE_ROWS_KEY), so a
    # reader that knows some parts (the drift monitor's fed ones) can read exactly the others
    merged = pa.concat_tables(tables, promote_options="permissive")
    merged = merged.select([n for n in schema.names if n in merged.column_names])
    metadata = {SOURCES_KEY: json.dumps(sources)}
    rows = _source_rows(inputs, tables)
    if rows is not None:
        metadata[SOURCE_ROWS_KEY] = json.dumps(rows)
    merged = merged.replace_schema_metadata(metadata)
    name = f"{COMPACT_PREFIX}{writer_id()}.parquet"
    plan = f"{partition}/{JOURNAL_PREFIX}{name}.json"
    _write_bytes(fs, plan, json.dumps({"output": f"{partition}/{name}", "inputs": inputs}).encode())
    _write_parquet(fs, merged, f"{partition}/{name}")
    _delete(fs, inputs)
    fs.delete_file(plan)
    return merged.num_rows


def _held_parts(path: str, metadata: dict[bytes, bytes] | None) -> list[str]:
    """The `part-` files whose rows the file at `path` holds: itself, or what it merged."""
    name = path.rsplit("/", 1)[1]
    merged = json.loads((metadata or {}).get(SOURCES_KEY, b"[]"))
    return merged + [name] if name.startswith("part-") else merged


def _source_rows(inputs: list[str], tables: list[pa.Table]) -> dict[str, list[int]] | None:
    """Where each `part-` file's rows lie in the concatenation of `tables`; None when an input
    does not say where its own parts lie (merged before the ranges were recorded)."""
    rows, offset = {}, 0
    for path, table in zip(inputs, tables):
        name = path.rsplit("/", 1)[1]
        metadata = table.schema.metadata or {}
        if SOURCE_ROWS_KEY in metadata:
            held = json.loads(metadata[SOURCE_ROWS_KEY])
        elif name.startswith("part-") and SOURCES_KEY not in metadata:
            held = {name: [0, table.num_rows]}
        else:
            return None
        rows.update({part: [offset + start, offset + stop] for part, (start, stop) in held.items()})
        offset += table.num_rows
    return rows


def _sources(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_file(path) as f:
        return _held_parts(path, pq.read_metadata(f).metadata)


def _finish_journals(fs: pafs.FileSystem, partition: str) -> None:
    """Complete or undo merges that a killed compaction left half done."""
    for info in fs.get_file_info(pafs.FileSelector(partition)):
        if not info.base_name.startswith(JOURNAL_PREFIX):
            continue
        with fs.open_input_stream(info.path) as f:
            plan = json.loads(f.read())
        if fs.get_file_info(plan["output"]).type == pafs.FileType.File:
            _delete(fs, plan["inputs"])  # the merged file is in place: drop what it replaces
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
