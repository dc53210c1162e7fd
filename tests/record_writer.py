"""A separate writer process for the store tests: `python tests/record_writer.py ROOT MODE N`.

MODES
  stream   write N synthetic sequences, flushing small files continuously, then close
  hold     buffer N sequences without flushing, print "ready", and wait to be signalled
  forever  write small files until killed
"""

import sys
import time

from softwatch.bench.store import synthetic_completions
from softwatch.records import RecordContext
from softwatch.store import ParquetSink

root, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = RecordContext(deployment="test", replica=f"writer-{mode}")
completions = synthetic_completions(n, hours=0.01, seed=len(sys.argv))
if mode == "hold":
    sink = ParquetSink(root, flush_rows=10**9, flush_interval_s=3600)
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
