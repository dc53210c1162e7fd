"""A separate writer process for the store tests: `python tests/record_writer.py ROOT MODE N [POINT]`.

MODES
  stream    write N synthetic sequences, flushing small files continuously, then close
  hold      buffer N sequences without flushing, print "ready", and wait to be signalled;
            ARG, if given, is the writer's id
  forever   write small files until killed
  kill-at   write and flush N/2 sequences, write N/2 more (print "answered N"), flush, and
            SIGKILL itself when that flush reaches POINT (one of store.FLUSH_POINTS)
  recover   recover dead writers' journals with a new sink, flush, and SIGKILL itself when
            the flush reaches POINT; print "recovered" if it never does
  journal   journal N sequences without flushing, print their ids, and SIGKILL itself

$RECORD_WRITER_SHARED_JOURNAL, if set, is the shared journal directory (store.journal_dir) of the
journal and recover modes; $RECORD_WRITER_HOST the host name this writer puts in its ids (another
node's).
  full      with files limited to ARG bytes (RLIMIT_FSIZE: writes past it are cut short, then
            fail, as on a full disk), journal sequences until one is refused; lift the limit,
            journal N more; print the ids of the sequences answered, and SIGKILL itself
"""

import os
import resource
import signal
import sys
import time

from softwatch.bench.store import synthetic_completions
from softwatch.records import RecordContext
import softwatch.store
from softwatch.store import ParquetSink, RecordNotDurable, journal_dir

root, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
arg = sys.argv[4] if len(sys.argv) > 4 else None
journal = journal_dir(root, os.environ.get("RECORD_WRITER_SHARED_JOURNAL"))
if "RECORD_WRITER_HOST" in os.environ:
    softwatch.store.host_name = lambda: os.environ["RECORD_WRITER_HOST"]


def kill_at(chosen: str):
    def at_flush_point(reached: str) -> None:
        if reached == chosen:
            os.kill(os.getpid(), signal.SIGKILL)
    return at_flush_point


context = RecordContext(deployment="test", replica=f"writer-{mode}")
completions = synthetic_completions(n, hours=0.01, seed=len(sys.argv))
if mode == "hold":
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600, writer=arg)
    for c in completions:
        sink.write_completion(c, context)
    print("ready", flush=True)
    time.sleep(600)
elif mode == "stream":
    sink = ParquetSink(root, flush_rows=2000, flush_interval_s=0.05)
    for i, c in enumerate(completions):
        sink.write_completion(c, context)
        if i % 8 == 0:
            time.sleep(0.002)
    sink.close()
    print(sink.rows_written["tokens"], sink.rows_written["sequences"], flush=True)
elif mode == "forever":
    sink = ParquetSink(root, flush_rows=5000, flush_interval_s=0.01)
    print("ready", flush=True)
    while True:
        for c in completions:
            sink.write_completion(c, context)
        sink.flush()
elif mode == "kill-at":
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600)
    for c in completions[: n // 2]:
        sink.write_completion(c, context)
    sink.flush()
    for c in completions[n // 2:]:
        sink.write_completion(c, context)
    print("answered", n, flush=True)
    sink.at_flush_point = kill_at(arg)
    sink.flush()
elif mode == "recover":
    killing = kill_at(arg)
    ParquetSink.at_flush_point = lambda self, point: killing(point)  # recovery flushes as the sink starts
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600, journal=journal)
    sink.flush()
    print("recovered", flush=True)
elif mode == "journal":
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600, journal=journal)
    for c in completions:
        sink.write_completion(c, context)
    print(" ".join(c.request_id for c in completions), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "full":
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), unlimited[1]))
    answered = []
    for c in completions:
        try:
            sink.write_completion(c, context)
        except RecordNotDurable:
            break
        answered.append(c.request_id)
    resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
    for c in synthetic_completions(n, hours=0.01, seed=99):
        sink.write_completion(c, context)
        answered.append(c.request_id)
    print(" ".join(answered), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
