"""The journal and the sink's guarantee: every answered request has exactly one record in the
dataset, whatever kills or full disks happen in between, and nothing but the operator's choice
(`store_text`) puts text under the data root."""

import ast
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import softwatch
from softwatch import journal, renames, rootlock
from softwatch.bench.store import synthetic_completions
from softwatch.entries import Entry, encode
from softwatch.records import RecordContext
from softwatch.recorder import Recorder
from softwatch.store import FLUSH_POINTS, ParquetSink, RecordNotDurable, Store, compact

WRITER = str(Path(__file__).with_name("record_writer.py"))
TOKENS_PER_SEQUENCE = 256  # synthetic_completions


def run_writer(root, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WRITER, str(root), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=None if env is None else {**os.environ, **env})


def assert_exactly_once(root, request_ids: set[str]) -> None:
    store = Store(str(root))
    rows = store.rows("SELECT request_id, count(*) AS n FROM sequences GROUP BY request_id")
    assert {r["request_id"] for r in rows} == request_ids
    assert all(r["n"] == 1 for r in rows)
    tokens = store.rows("SELECT count(*) AS n, count(DISTINCT (request_id, position)) AS d, "
                        "count(DISTINCT request_id) AS r FROM tokens")[0]
    assert tokens == {"n": len(request_ids) * TOKENS_PER_SEQUENCE, "d": len(request_ids) * TOKENS_PER_SEQUENCE,
                      "r": len(request_ids)}


@pytest.mark.parametrize("point", FLUSH_POINTS)
def test_a_kill_at_any_point_of_a_flush_or_of_its_recovery_keeps_every_answered_record_once(root, point):
    """A writer is killed at `point` of a flush; a recoverer is killed at the same point of
    its flush of the orphan; a compaction merges whatever files there are; the next sink
    recovers the rest. The dataset then holds each answered request exactly once."""
    writer = run_writer(root, "kill-at", 40, point)
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    assert writer.stdout.split() == ["answered", "40"]
    recoverer = run_writer(root, "recover", 0, point)
    if point == "released":  # the writer had released its segment: nothing to recover
        assert recoverer.returncode == 0 and recoverer.stdout.strip() == "recovered", recoverer.stderr
    else:
        assert recoverer.returncode == -signal.SIGKILL, recoverer.stderr
    compact(root.uri)
    ParquetSink(root.uri).close()
    answered = {r["request_id"] for r in Store(root.uri).rows("SELECT DISTINCT request_id FROM sequences")}
    assert len(answered) == 40
    assert_exactly_once(root, answered)
    assert not list(root.journal_dir.iterdir())


def test_a_shared_journal_lets_another_node_recover_a_dead_node_s_records_into_an_object_store(s3_endpoint,
                                                                                                   tmp_path):
    """Two nodes (each its own host name and local cache) write one s3:// root, and a writer on
    node A is killed with records journaled but not flushed. With the journal on A's disk (the
    default) node B's writer cannot see them, and says so as it starts; with a journal directory
    both nodes mount, B's writer recovers them, once."""
    root = s3_endpoint.new_root()
    shared = tmp_path / "shared-journal"  # the NFS/EFS volume both nodes mount
    store = Store(root.uri)

    def node(name: str, *shared_journal: Path) -> dict:
        env = {"SOFTWATCH_CACHE": str(tmp_path / f"{name}-cache"), "RECORD_WRITER_HOST": name}
        return {**env, **{"RECORD_WRITER_SHARED_JOURNAL": str(d) for d in shared_journal}}

    def killed_writer_on_a(*shared_journal: Path) -> set[str]:
        writer = run_writer(root, "journal", 6, env=node("nodea", *shared_journal))
        assert writer.returncode == -signal.SIGKILL, writer.stderr
        assert len(set(writer.stdout.split())) == 6
        return set(writer.stdout.split())

    def recorded() -> set[str]:
        return {r["request_id"] for r in store.rows("SELECT request_id FROM sequences")}

    stranded = killed_writer_on_a()
    recoverer = run_writer(root, "recover", 0, "never", env=node("nodeb"))
    assert recoverer.returncode == 0 and recoverer.stdout.strip() == "recovered", recoverer.stderr
    assert "lost if this node is lost for good" in recoverer.stderr
    assert not recorded() and len(list((tmp_path / "nodea-cache").rglob("*.wal"))) == 1  # only node A has them

    answered = killed_writer_on_a(shared)
    assert not recorded()
    recoverer = run_writer(root, "recover", 0, "never", env=node("nodeb", shared))
    assert recoverer.returncode == 0 and recoverer.stdout.strip() == "recovered", recoverer.stderr
    assert "lost if this node is lost for good" not in recoverer.stderr
    assert store.rows("SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM sequences")[0] == {"n": 6, "d": 6}
    assert recorded() == answered and not stranded & answered
    assert {Path(f).name.split("-")[1] for f in root.files("sequences")} == {"nodea"}  # A's segment, written by B
    assert not list(shared.rglob("*.wal"))


def test_a_segment_is_recovered_even_when_its_writer_s_pid_is_the_recoverer_s(tmp_path):
    """Containers restart with the same pids, and pods share host names: liveness is the
    segment's lock, not a name."""
    from softwatch.host import host_name

    same_name = f"{host_name()}-{os.getpid()}-0"
    proc = subprocess.Popen([sys.executable, WRITER, str(tmp_path), "hold", "30", same_name],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ParquetSink(str(tmp_path)).close()  # the writer is alive: its segment is not touched
        assert not (tmp_path / "sequences").exists()
        assert len(list((tmp_path / "_journal").glob("*.wal"))) == 1
    finally:
        proc.kill()
        proc.wait()
    ParquetSink(str(tmp_path)).close()
    assert Store(str(tmp_path)).rows("SELECT count(*) AS n FROM sequences") == [{"n": 30}]


def test_a_locked_segment_is_not_claimed_and_an_unlocked_one_is_claimed_once(tmp_path):
    held = journal.create(str(tmp_path), "live-000000")
    held.append(b"one")
    assert list(journal.claim_orphans(str(tmp_path))) == []  # a separate open: flock conflicts
    held.close()  # its owner dies: the OS drops the lock
    claims = list(journal.claim_orphans(str(tmp_path)))
    assert [(s.name, list(journal.frames(s))) for s in claims] == [("live-000000", [b"one"])]
    assert list(journal.claim_orphans(str(tmp_path))) == []  # held by the first claimant
    claims[0].release()
    assert os.listdir(tmp_path) == []


def no_hard_links(source, target):
    raise PermissionError(1, "Operation not permitted")  # as on a filesystem without them (vfat, some FUSE)


@pytest.mark.parametrize("fallback", ["renameat2", "link", "check-then-rename"])
def test_a_name_already_taken_is_never_replaced(tmp_path, monkeypatch, fallback):
    if fallback != "renameat2":
        monkeypatch.setattr(renames, "_renameat2", None)
    if fallback == "check-then-rename":
        monkeypatch.setattr(renames.os, "link", no_hard_links)
    kept = journal.create(str(tmp_path), "w-000000")
    kept.append(b"kept")
    kept.close()  # its writer died: a segment to recover
    with pytest.raises(FileExistsError):
        journal.create(str(tmp_path), "w-000000")
    [claimed] = list(journal.claim_orphans(str(tmp_path)))
    assert list(journal.frames(claimed)) == [b"kept"]
    claimed.release()
    assert os.listdir(tmp_path) == []  # nor a segment being created left behind
    (tmp_path / "new").write_text("new")
    (tmp_path / "old").write_text("old")
    with pytest.raises(FileExistsError):
        renames.rename_noreplace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert (tmp_path / "old").read_text() == "old" and (tmp_path / "new").read_text() == "new"
    renames.rename_noreplace(str(tmp_path / "new"), str(tmp_path / "free"))
    assert (tmp_path / "free").read_text() == "new" and not (tmp_path / "new").exists()


def test_a_writer_id_given_again_destroys_no_record(root):
    """Explicit writer ids repeat across restarts: an earlier run's files, and a dead writer's
    segment that the next sink recovers while journaling records of its own, keep their rows.
    On S3, where a write replaces what has the name, this holds because no two sinks share one."""
    earlier, later = synthetic_completions(2, hours=0.01)
    with ParquetSink(root.uri, writer="w") as sink:
        sink.write_completion(earlier, RecordContext())
    dead = subprocess.Popen([sys.executable, WRITER, root.uri, "hold", "3", "w"], stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout.readline().strip() == "ready"
    finally:
        dead.kill()
        dead.wait()
    with ParquetSink(root.uri, writer="w", flush_interval_s=3600) as sink:
        sink.write_completion(later, RecordContext())
    answered = {r["request_id"] for r in Store(root.uri).rows("SELECT DISTINCT request_id FROM sequences")}
    assert len(answered) == 5 and {earlier.request_id, later.request_id} <= answered
    assert_exactly_once(root, answered)


def journal_dead_writer_s(journal_dir: Path, name: str, completions) -> None:
    segment = journal.create(str(journal_dir), name)
    for c in completions:
        segment.append(encode(Entry(c, RecordContext(), True, None)))
    segment.close()


def test_a_recovered_backlog_is_written_at_once_one_segment_at_a_time_and_refuses_no_new_record(root):
    """A replica restarting after a crash: the dead writer's backlog, twice the bound, does
    not count against new records; it goes out without waiting for the flush interval. The
    store is failing as the replica starts (on S3: unreachable) and comes back later."""
    bound = 5 * (TOKENS_PER_SEQUENCE + 1)
    backlog = synthetic_completions(20, hours=0.01)
    journal_dead_writer_s(root.journal_dir, "dead-000000", backlog[:10])
    journal_dead_writer_s(root.journal_dir, "dead-000001", backlog[10:])
    failing = root.writes_failing()
    failing.__enter__()
    sink = ParquetSink(root.uri, flush_interval_s=3600, max_pending_rows=bound)
    deadline = time.time() + 30
    while sink._batches[0].entries is None and time.time() < deadline:
        time.sleep(0.05)  # the flush that recovery makes due at once fails on the blocker
    assert sink._batches[1].entries is None, "a second recovered segment was read before the first was written"
    accepted, refused = [], []
    for c in synthetic_completions(7, hours=0.01):
        try:
            sink.write_completion(c, RecordContext())
            accepted.append(c.request_id)
        except RecordNotDurable:
            refused.append(c.request_id)
    assert len(accepted) == 5 and len(refused) == 2  # bounded by new records alone
    failing.__exit__(None, None, None)
    deadline = time.time() + 30
    while not root.exists("sequences") and time.time() < deadline:
        time.sleep(0.05)  # the background thread retries by itself, long before flush_interval_s
    assert root.exists("sequences")
    sink.close()
    assert_exactly_once(root, {c.request_id for c in backlog} | set(accepted))


def test_a_recovered_backlog_is_held_in_memory_one_segment_at_a_time(tmp_path, monkeypatch):
    backlog = synthetic_completions(30, hours=0.01)
    for i in range(3):
        journal_dead_writer_s(tmp_path / "_journal", f"dead-{i:06d}", backlog[10 * i:10 * (i + 1)])
    seen, loaded_at_start = [], []
    write_batch = ParquetSink._write_batch

    def watched(sink, batch):
        loaded_at_start.append(sum(b.entries is not None for b in seen))  # the earlier batches, written
        seen.append(batch)
        write_batch(sink, batch)

    monkeypatch.setattr(ParquetSink, "_write_batch", watched)
    sink = ParquetSink(str(tmp_path), flush_interval_s=3600)
    sink.close()
    assert len(seen) == 3 and loaded_at_start == [0, 0, 0]
    assert_exactly_once(tmp_path, {c.request_id for c in backlog})


def test_recovery_keeps_the_frames_before_a_torn_one(tmp_path):
    segment = journal.create(str(tmp_path), "w-000000")
    for payload in (b"a" * 100, b"b" * 5000):
        segment.append(payload)
    with open(segment.path, "ab") as f:
        f.write(b"\x10\x27\x00\x00\x01\x02\x03\x04partial")  # a frame cut by a kill
    segment.close()
    [claimed] = list(journal.claim_orphans(str(tmp_path)))
    assert list(journal.frames(claimed)) == [b"a" * 100, b"b" * 5000]
    claimed.release()


def test_a_full_disk_refuses_the_record_and_leaves_no_torn_frame(tmp_path):
    """A real short write: the writer runs with RLIMIT_FSIZE, which cuts a write at the limit
    and fails the rest of it with EFBIG, as a full disk does with ENOSPC (a small filesystem
    needs root to mount, which CI does not have). The refused request is absent; the ones
    answered after space came back follow the failed append in the same segment, and all of
    them are recovered after a SIGKILL."""
    result = run_writer(tmp_path, "full", 5, 60_000)
    assert result.returncode == -signal.SIGKILL, result.stderr
    answered = result.stdout.split()
    assert 5 < len(answered) < 15  # some fitted under the limit, one was refused, 5 more after
    segments = list((tmp_path / "_journal").glob("*.wal"))
    assert len(segments) == 1  # the failed append was cut off: the segment stayed usable
    ParquetSink(str(tmp_path)).close()
    assert_exactly_once(tmp_path, set(answered))


def test_failed_flushes_stop_accepting_records_past_the_bound_and_are_retried(root):
    completions = synthetic_completions(12, hours=0.01)
    sink = ParquetSink(root.uri, flush_interval_s=0.05, max_pending_rows=5 * (TOKENS_PER_SEQUENCE + 1))
    recorder = Recorder(RecordContext(), sink)
    failing = root.writes_failing()
    failing.__enter__()
    accepted, refused = [], []
    for c in completions:
        try:
            recorder.record(c)
            accepted.append(c.request_id)
        except RecordNotDurable:
            refused.append(c.request_id)
    assert len(accepted) == 5 and len(refused) == 7
    failing.__exit__(None, None, None)
    deadline = time.time() + 30
    while not root.exists("sequences") and time.time() < deadline:
        time.sleep(0.05)  # the background thread retries by itself
    recorder.record(completions[-1])  # accepted again once the backlog is written
    accepted.append(completions[-1].request_id)
    recorder.close()
    assert_exactly_once(root, set(accepted))


def test_without_store_text_no_file_under_the_data_root_holds_the_text(tmp_path):
    prompt, text = "PROMPT-7f3a: what is the airspeed of an unladen swallow", "COMPLETION-91bc: african or european"
    secret, control = synthetic_completions(2, hours=0.01)
    secret.text, control.text = text, text.replace("91bc", "control")

    def files_holding(needle: str) -> list[Path]:
        return [p for p in tmp_path.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]

    sink = ParquetSink(str(tmp_path), flush_interval_s=3600)
    sink.write_completion(secret, RecordContext(store_text=False), prompt=prompt)
    sink.write_completion(control, RecordContext(store_text=True), prompt=prompt.replace("7f3a", "control"))
    journaled = files_holding("PROMPT-control")
    assert journaled and journaled == files_holding("COMPLETION-control")  # the search can find text
    assert files_holding(prompt) == [] and files_holding(text) == []
    sink.close()
    assert files_holding(prompt) == [] and files_holding(text) == []
    stored = Store(str(tmp_path)).rows("SELECT request_id, prompt FROM sequences WHERE prompt IS NOT NULL")
    assert stored == [{"request_id": control.request_id, "prompt": "PROMPT-control: what is the airspeed of an unladen swallow"}]


def test_no_module_unpickles():
    """Nothing under the data root is read with a format that runs code."""
    unsafe = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
    for path in Path(softwatch.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & unsafe, f"{path} imports {names & unsafe}"


def test_one_compaction_at_a_time(root):
    """Locally an flock; on S3 the lease object."""
    completions = synthetic_completions(30, hours=0.01)
    with ParquetSink(root.uri) as sink:
        for c in completions:
            sink.write_completion(c, RecordContext())
            sink.flush()  # one small file per request
    refusals = []

    def second_compaction(message: str) -> None:  # runs while the first holds the root
        try:
            compact(root.uri)
        except rootlock.CompactionRunning as exc:
            refusals.append(exc)

    first = compact(root.uri, progress=second_compaction)
    assert first.rows_moved == 30 * (TOKENS_PER_SEQUENCE + 1) and refusals
    assert root.local or not root.exists(rootlock.LOCK_NAME)  # the lease is deleted; a local flock file stays
    again = compact(root.uri)  # the lock is free again
    assert again.files_before == again.files_after == 2
    assert_exactly_once(root, {c.request_id for c in completions})


def test_the_object_store_lease_admits_one_compaction_until_it_expires(root):
    import pyarrow.fs as pafs

    if root.local:  # a filesystem that is not LocalFileSystem takes the lease path
        os.makedirs(root.path)
        fs, path = pafs.SubTreeFileSystem(root.path, pafs.LocalFileSystem()), ""
    else:
        fs, path = root.fs, root.path
    with rootlock.exclusive(fs, path, settle_s=0.01) as renew:
        renew()
        with pytest.raises(rootlock.CompactionRunning):
            with rootlock.exclusive(fs, path, settle_s=0.01):
                pass
    assert not root.exists(rootlock.LOCK_NAME)
    with rootlock.exclusive(fs, path, lease_s=-1, settle_s=0.01):  # a holder that died: its lease expired
        with rootlock.exclusive(fs, path, settle_s=0.01):
            pass


def test_the_lease_is_free_only_when_absent_and_a_holder_that_lost_it_cannot_renew(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not LocalFileSystem: the lease path
    (tmp_path / rootlock.LOCK_NAME).write_text('{"owner": "abc", "expi')  # a lease that cannot be read
    with pytest.raises(rootlock.CompactionRunning, match="unreadable"):
        with rootlock.exclusive(fs, "", settle_s=0.01):
            pass
    (tmp_path / rootlock.LOCK_NAME).unlink()
    with rootlock.exclusive(fs, "", lease_s=-1, settle_s=0.01) as stalled:  # held past its lease...
        with rootlock.exclusive(fs, "", settle_s=0.01) as renew:  # ...another compaction takes the root
            with pytest.raises(rootlock.CompactionRunning, match="while this one held it"):
                stalled()
            renew()  # and keeps it
        assert not (tmp_path / rootlock.LOCK_NAME).exists()


def test_a_record_parquet_cannot_take_is_refused_before_it_is_journaled(tmp_path):
    """A top_k beyond the int32 column (vLLM accepts any) must not reach the journal, where it
    would block every later flush and come back on every recovery."""
    import dataclasses

    import torch

    from softwatch.completion import Completion
    from softwatch.records import RecordContext
    from softwatch.store import ParquetSink, RecordNotDurable, Store

    def completion(rid: str, top_k: int) -> Completion:
        return Completion(request_id=rid, text="", token_ids=[1, 2], prompt_tokens=3, finish_reason="stop",
                          stats=torch.zeros(2, 10), summary={"generated_tokens": 2, "finish_reason": "stop"},
                          regime={"model_id": "m", "model_rev": "r", "params_id": "p", "temperature": 1.0,
                                  "top_p": 1.0, "top_k": top_k, "template_version": "v1"},
                          created=1.7e9, ttft_s=0.1, latency_s=0.2)

    context = RecordContext(deployment="d", replica="r")
    sink = ParquetSink(str(tmp_path), flush_interval_s=3600)
    with pytest.raises(RecordNotDurable, match="does not fit"):
        sink.write_completion(completion("bad", 3_000_000_000), context)
    sink.write_completion(dataclasses.replace(completion("good", 40)), context)
    sink.close()
    assert Store(str(tmp_path)).rows("SELECT request_id FROM sequences") == [{"request_id": "good"}]


def test_a_journaled_entry_keeps_its_prompt_key_and_one_journaled_before_the_key_existed_reads_none():
    import json
    import struct

    from softwatch.completion import prompt_key
    from softwatch.entries import Entry, decode, encode

    (completion,) = synthetic_completions(1)
    completion.prompt_key = prompt_key([5, 6, 7])
    data = encode(Entry(completion, RecordContext(), True, None))
    assert decode(data).completion.prompt_key == prompt_key([5, 6, 7])

    (length,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + length])
    del header["prompt_key"]
    blob = json.dumps(header).encode()
    older = struct.pack("<I", len(blob)) + blob + data[4 + length:]
    assert decode(older).completion.prompt_key is None


def test_a_live_sink_recovers_a_dead_writer_s_journal_without_a_new_writer(tmp_path):
    """A node that never comes back: its writer is SIGKILLed with answered records journaled and
    no process ever starts again in its place. A sink of the same root that was already running
    (a replica on another node) writes them within its recovery interval."""
    root = tmp_path / "data"
    live = ParquetSink(str(root), flush_interval_s=3600, recover_interval_s=0.5)
    writer = subprocess.Popen([sys.executable, WRITER, str(root), "hold", "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
    finally:
        writer.kill()
        writer.wait(timeout=30)
    deadline = time.time() + 30
    while not (root / "sequences").exists() and time.time() < deadline:
        time.sleep(0.1)
    live.close()
    assert not list((root / "_journal").glob("*.wal")), "the dead writer's segment is still in the journal"
    answered = {r["request_id"] for r in Store(str(root)).rows("SELECT request_id FROM sequences")}
    assert len(answered) == 6  # the writer journaled 6 before saying "ready"
    assert_exactly_once(root, answered)


class _ProcessOwnedLocks:
    """fcntl as the journal sees it on NFS, where Linux implements flock as a whole-file POSIX
    lock: owned by the process, so a second descriptor of the same process takes it too and
    closing either drops it. No NFS server here, so this is the one fault emulated."""

    LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

    @staticmethod
    def flock(fd: int, operation: int) -> None:
        fcntl.lockf(fd, operation)


def test_periodic_recovery_never_claims_the_writers_own_live_segment_under_process_owned_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "fcntl", _ProcessOwnedLocks)
    completions = synthetic_completions(50, hours=0.01, seed=1)
    sink = ParquetSink(str(tmp_path / "data"), flush_rows=10**9, flush_interval_s=3600,
                       journal=str(tmp_path / "shared"), recover_interval_s=0.2)
    for c in completions[:25]:
        sink.write_completion(c, RecordContext())
    time.sleep(1.0)  # about five recovery passes while the segment is live
    for c in completions[25:]:
        sink.write_completion(c, RecordContext())
    sink.close()
    assert_exactly_once(tmp_path / "data", {c.request_id for c in completions})
