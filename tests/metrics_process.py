"""A softwatch process exporting metrics for the Prometheus test:
`python tests/metrics_process.py DATA_ROOT REPLICA`. Records a few sequences, sets the drift
gauges, prints "ready <metrics url>", and serves `/metrics` until terminated."""

import signal
import sys
import time

from softwatch.bench.store import synthetic_completions
from softwatch.records import RecordContext
from softwatch.telemetry import Telemetry

root, replica = sys.argv[1], sys.argv[2]
telemetry = Telemetry("prometheus", data_root=root)
signal.signal(signal.SIGTERM, lambda *_: (telemetry.shutdown(), sys.exit(0)))
context = RecordContext(deployment="test", replica=replica)
for c in synthetic_completions(5, hours=0.01):
    c.summary.update(perplexity=3.0, mean_entropy=1.2, mean_top_prob=0.7, nonfinite=0, overflow=1)
    telemetry.record(c, context)
telemetry.set_drift(0.25, False, {"metric": "mean_entropy", "replica": replica})
print("ready", telemetry.endpoint.url, flush=True)
while True:
    time.sleep(1)
