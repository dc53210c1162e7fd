"""The monitor's regime index: per data file of `sequences`, the regimes its rows belong to,
with their counts and first and last timestamps. Kept in the data root
(`_monitor/regimes.parquet`, replaced atomically) and brought up to date on each run by
reading only the files added since the last one, so a run never scans the whole history
to find its regimes. Files that disappeared (merged by compaction) drop out; the file that
merged them comes in as a new file whose sources (its `softwatch.sources` metadata) were
seen already. A listed file whose rows a listed compacted file holds as well (a compaction's
inputs before its deletes land) is left out, so no row is counted or fed twice. Regimes are counted apart by `params_source`: the deployment's own decoding
parameters, and a client's per-request overrides (a null source, in files written before the
column, counts as the deployment's).

The index also says which files of a regime can hold its first or last N sequences
(`files_for`), so the samples a run compares are read from a few files with
`ORDER BY ts LIMIT N`, not from the regime's whole history.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..records import SEQUENCES
from ..store import COMPACT_PREFIX, SOURCE_ROWS_KEY, SOURCES_KEY, _is_data_file, _is_local, open_root, vanished

log = logging.getLogger("softwatch.drift")

INDEX_DIR = "_monitor"
INDEX_FILE = "regimes.parquet"
INDEX_VERSION = "2"
REGIME_IDENTITY = ("model_id", "model_rev", "params_id", "params_source")
PARAMS = ("temperature", "top_p", "top_k")

INDEX = pa.schema([
    pa.field("file", pa.string()),  # relative to the root: sequences/dt=…/part-….parquet
    pa.field("model_id", pa.string()),
    pa.field("model_rev", pa.string()),
    pa.field("params_id", pa.string()),
    pa.field("params_source", pa.string()),  # "deployment" (also for rows without one) | "request"
    pa.field("temperature", pa.float64()),
    pa.field("top_p", pa.float64()),
    pa.field("top_k", pa.int32()),
    pa.field("sequences", pa.int64()),  # with generated_tokens > 0; a file with none has one row of 0
    pa.field("first_us", pa.int64()),
    pa.field("last_us", pa.int64()),
])

AGGREGATE = (
    "SELECT model_id, model_rev, params_id, coalesce(params_source, 'deployment') AS params_source, "
    "any_value(temperature) AS temperature, any_value(top_p) AS top_p, any_value(top_k) AS top_k, "
    "count(*) AS sequences, min(epoch_us(ts)) AS first_us, max(epoch_us(ts)) AS last_us "
    "FROM part WHERE generated_tokens > 0 GROUP BY ALL")


@dataclass
class Refresh:
    """What one refresh found: the files added and removed since the last one."""

    added: list[str]
    removed: list[str]
    first: bool  # no index existed before this refresh


class RegimeIndex:
    def __init__(self, root: str, con: duckdb.DuckDBPyConnection | None = None):
        self.fs, self.path = open_root(root)
        self.con = con or duckdb.connect()
        self.table = INDEX.empty_table()
        self._loaded = False
        self._held: dict[str, tuple[list[str], dict | None]] = {}  # file -> its parts and their rows (immutable)

    @property
    def location(self) -> str:
        return f"{self.path}/{INDEX_DIR}/{INDEX_FILE}"

    # ---- keeping it current ---------------------------------------------------------------------
    def refresh(self) -> Refresh:
        first = not self._load()
        listed = self._list()
        present = set(listed) - self._covered(listed)
        indexed = set(self.table["file"].to_pylist())
        added = sorted(present - indexed)
        removed = sorted(indexed - present)
        if removed:
            gone = set(removed)
            self.table = self.table.filter(pa.array([f not in gone for f in self.table["file"].to_pylist()]))
        if added:
            read = [self._aggregate(f) for f in added]
            # a file compacted away since the listing: its rows come in with the merged file, next time
            added = [f for f, t in zip(added, read) if t is not None]
            self.table = pa.concat_tables([self.table, *[t for t in read if t is not None]])
        if added or removed or first:
            self._save()
        return Refresh(added, removed, first)

    def _list(self) -> list[str]:
        base = f"{self.path}/sequences"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except (FileNotFoundError, OSError):
            return []
        return [i.path[len(self.path) + 1:] for i in infos if _is_data_file(i)]

    def _covered(self, files: list[str]) -> set[str]:
        """Listed files whose rows a listed compacted file holds too: the inputs of a compaction
        that published its output and has not deleted them yet (or was killed in between), and
        of two compactions of the same inputs all but one. They are not present: counted or fed
        with the compacted file, their rows would be twice."""
        partitions: dict[str, list[str]] = {}
        for f in files:
            partitions.setdefault(f.rsplit("/", 1)[0], []).append(f)
        covered = set()
        for group in partitions.values():
            merged = [f for f in group if f.rsplit("/", 1)[1].startswith(COMPACT_PREFIX)]
            if len(group) < 2 or not merged:
                continue
            held = {f: set(self.parts_of(f)) for f in group}
            for f in group:
                if any(g != f and (held[f] < held[g] or (held[f] == held[g] and g < f)) for g in merged):
                    covered.add(f)
        return covered

    def parts_of(self, file: str) -> list[str]:
        """The writers' `part-` files whose rows `file` holds: itself, or those a compaction
        merged into it (its `softwatch.sources` metadata)."""
        return self._held_parts(file)[0]

    def rows_of(self, file: str) -> dict[str, list[int]] | None:
        """Where the rows of each `part-` file that `file` holds lie in it ({part: [start,
        stop)}), or None where that is not recorded (a compaction that predates it)."""
        return self._held_parts(file)[1]

    def _held_parts(self, file: str) -> tuple[list[str], dict | None]:
        if file not in self._held:
            name = file.rsplit("/", 1)[1]
            if name.startswith("part-"):
                return [name], None
            try:
                with self.fs.open_input_file(f"{self.path}/{file}") as f:
                    metadata = pq.read_metadata(f).metadata or {}
            except (OSError, ValueError):
                return [name], None
            rows = metadata.get(SOURCE_ROWS_KEY)
            self._held[file] = (json.loads(metadata.get(SOURCES_KEY, b"[]")) or [name],
                                json.loads(rows) if rows else None)
        return self._held[file]

    def seen_before(self, file: str, known: set[str]) -> str:
        """Whether the rows of `file` are those of `part-` files named in `known`: "all" of them
        (a compaction of known files), "none" (a writer's new file) or "some"."""
        parts = self.parts_of(file)
        seen = sum(p in known for p in parts)
        return "all" if seen == len(parts) else ("none" if seen == 0 else "some")

    def _aggregate(self, file: str) -> pa.Table | None:
        """The index rows of `file`; None when it vanished since it was listed."""
        try:
            part = dataset([file], self.fs, self.path)
            self.con.register("part", part)
            try:
                got = self.con.sql(AGGREGATE).to_arrow_table()
            finally:
                self.con.unregister("part")
        except READ_ERRORS as exc:
            if vanished(exc):
                return None
            raise
        n = got.num_rows
        if n == 0:
            row = {name: None for name in INDEX.names}
            row.update(file=file, sequences=0)
            return pa.Table.from_pylist([row], schema=INDEX)
        got = got.append_column("file", pa.array([file] * n, pa.string()))
        return got.select(INDEX.names).cast(INDEX)

    # ---- storing it ---------------------------------------------------------------------------
    def _load(self) -> bool:
        if self._loaded:
            return True
        self._loaded = True
        try:
            with self.fs.open_input_file(self.location) as f:
                table = pq.read_table(f)
            if (table.schema.metadata or {}).get(b"softwatch.index_version") != INDEX_VERSION.encode():
                raise ValueError("another index version")
            self.table = table.replace_schema_metadata(None).select(INDEX.names).cast(INDEX)
            return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            log.warning("softwatch: rebuilding the regime index %s (%s)", self.location, exc)
            self.table = INDEX.empty_table()
            return False

    def _save(self) -> None:
        table = self.table.replace_schema_metadata({b"softwatch.index_version": INDEX_VERSION.encode()})
        write_atomically(self.fs, self.location, lambda sink: pq.write_table(table, sink, compression="zstd"))

    # ---- reading it ---------------------------------------------------------------------------
    def regimes(self) -> list[dict]:
        """Regimes in order of first appearance, with their sequence counts and time range
        (`first_ts`/`last_ts`, and as epoch µs `first_us`/`last_us`)."""
        if self.table.num_rows == 0:
            return []
        self.con.register("regime_index", self.table)
        try:
            rows = self.con.sql(
                "SELECT model_id, model_rev, params_id, params_source, any_value(temperature) AS temperature, "
                "any_value(top_p) AS top_p, any_value(top_k) AS top_k, sum(sequences)::BIGINT AS sequences, "
                "make_timestamptz(min(first_us)) AS first_ts, make_timestamptz(max(last_us)) AS last_ts, "
                "min(first_us) AS first_us, max(last_us) AS last_us "
                "FROM regime_index WHERE sequences > 0 GROUP BY model_id, model_rev, params_id, params_source "
                "ORDER BY min(first_us), model_id, model_rev, params_id, params_source").to_arrow_table().to_pylist()
        finally:
            self.con.unregister("regime_index")
        return rows

    def files_for(self, regime: dict, end: str, n: int, since_us: int | None = None) -> tuple[list[str], int | None]:
        """The files that hold the regime's first (`end="first"`) or last (`"last"`) `n`
        sequences, and a timestamp bound (µs) those sequences lie within: the n-th sequence
        from that end is no later (first) or no earlier (last) than the bound. Files overlap
        in time, so the bound comes from whole files: the earliest last_ts by which n
        sequences have certainly appeared (or the latest first_ts after which they have).
        With `since_us`, only the sequences after it count (a regime's live segment): files
        that end before it are left out, and those that straddle it are read but not counted
        on to hold any of the n."""
        t = self.table
        mask = np.ones(t.num_rows, bool)
        for key in REGIME_IDENTITY:
            mask &= np.array([v == regime[key] for v in t[key].to_pylist()], bool)
        mask &= t["sequences"].to_numpy(zero_copy_only=False) > 0
        files = np.array(t["file"].to_pylist(), dtype=object)[mask]
        counts = t["sequences"].to_numpy(zero_copy_only=False)[mask]
        first = t["first_us"].to_numpy(zero_copy_only=False)[mask]
        last = t["last_us"].to_numpy(zero_copy_only=False)[mask]
        if since_us is not None:
            after = last > since_us
            counts = np.where(first > since_us, counts, 0)[after]
            files, first, last = files[after], first[after], last[after]
        if not len(files):
            return [], None
        if end == "first":
            order = np.argsort(last, kind="stable")
            reached = np.cumsum(counts[order]) >= n
            bound = int(last[order][np.argmax(reached)]) if reached.any() else int(last.max())
            chosen = first <= bound
        else:
            order = np.argsort(-first, kind="stable")
            reached = np.cumsum(counts[order]) >= n
            bound = int(first[order][np.argmax(reached)]) if reached.any() else int(first.min())
            chosen = last >= bound
        return sorted(set(files[chosen])), bound

    def files_of(self, regime: dict) -> list[str]:
        t = self.table
        keep = [all(row[k] == regime[k] for k in REGIME_IDENTITY) and row["sequences"] > 0
                for row in t.select([*REGIME_IDENTITY, "sequences"]).to_pylist()]
        return sorted(set(f for f, k in zip(t["file"].to_pylist(), keep) if k))


READ_ERRORS = (duckdb.Error, OSError, pa.ArrowException)  # what reading a file that vanished raises


def dataset(files: list[str], fs: pafs.FileSystem, path: str) -> ds.Dataset:
    """The `sequences` rows of these files (relative to the root), in the full schema: a column
    an older file lacks reads as null."""
    return ds.dataset([f"{path}/{f}" for f in files], schema=SEQUENCES, format="parquet", filesystem=fs)


def rows_at(files: dict[str, list[list[int]]], fs: pafs.FileSystem, path: str) -> pa.Table:
    """The `sequences` rows at these [start, stop) row ranges of these files (relative to the
    root), in the full schema; only the row groups that hold them are read."""
    pieces = []
    for file, spans in files.items():
        with fs.open_input_file(f"{path}/{file}") as source:
            parquet = pq.ParquetFile(source)
            group_start = 0
            for g in range(parquet.num_row_groups):
                group_stop = group_start + parquet.metadata.row_group(g).num_rows
                wanted = [(max(a, group_start), min(b, group_stop)) for a, b in spans if a < group_stop and b > group_start]
                if wanted:
                    group = _conform(parquet.read_row_group(g))
                    pieces += [group.slice(a - group_start, b - a) for a, b in wanted]
                group_start = group_stop
    return pa.concat_tables(pieces) if pieces else SEQUENCES.empty_table()


def _conform(table: pa.Table) -> pa.Table:
    """`table` in the `sequences` schema: a column it lacks (an older file) is null."""
    return pa.Table.from_arrays([table[f.name].cast(f.type) if f.name in table.column_names
                                 else pa.nulls(table.num_rows, f.type) for f in SEQUENCES], schema=SEQUENCES)


def write_atomically(fs: pafs.FileSystem, final: str, write) -> None:
    """`write(sink)` into `final`, which readers see whole or not at all (replaced if present):
    a hidden temporary file renamed over it on a local disk; one upload on an object store."""
    directory, name = final.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    if not _is_local(fs):
        with fs.open_output_stream(final) as sink:
            write(sink)
        return
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"  # its own: two writers at once never share one
    try:
        with fs.open_output_stream(tmp) as sink:
            write(sink)
        fs.move(tmp, final)  # rename(2): atomic, replaces
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise
