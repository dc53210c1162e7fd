"""`softwatch bench store`: token rows per second into Parquet through `ParquetSink`, and the
time of a per-regime, per-hour summary query over them through `Store`."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch

from ..completion import Completion
from ..records import RecordContext
from ..stats import COLUMN, FIELDS
from ..store import ParquetSink, Store

SEQUENCE_TOKENS = 256
REGIMES = 4

SUMMARY_QUERY = """
SELECT model_id, model_rev, params_id, date_trunc('hour', ts) AS hour,
       count(*) AS tokens,
       avg(entropy) AS mean_entropy,
       quantile_cont(entropy, [0.5, 0.9, 0.99]) AS entropy_quantiles,
       avg(top_prob) AS mean_top_prob,
       quantile_cont(top_prob, [0.01, 0.1, 0.5]) AS top_prob_quantiles
FROM tokens
GROUP BY ALL
ORDER BY hour, params_id
"""


def synthetic_completions(sequences: int, hours: float = 24.0, seed: int = 0) -> list[Completion]:
    """Completions of SEQUENCE_TOKENS tokens spread evenly over `hours`, across REGIMES
    regimes, each with its own random statistics (values that repeat would let Parquet's
    dictionary encoding make the write look cheaper than it is)."""
    rng = np.random.default_rng(seed)
    stats = rng.random((sequences, SEQUENCE_TOKENS, len(FIELDS)), dtype=np.float32)
    stats[..., COLUMN["entropy"]] *= 6
    stats[..., COLUMN["rank"]] = rng.integers(0, 50, (sequences, SEQUENCE_TOKENS))
    stats[..., COLUMN["nonfinite"]] = stats[..., COLUMN["overflow"]] = 0
    stats = torch.from_numpy(stats)
    tokens = rng.integers(0, 49152, SEQUENCE_TOKENS).tolist()
    start = time.time() - hours * 3600
    run = uuid.uuid4().hex[:8]
    regimes = [{"model_id": "bench-model", "model_rev": f"rev{r % 2}", "params_id": f"params{r}",
                "temperature": 0.7 + 0.1 * r, "top_p": 0.9, "top_k": 0, "template_version": "v1"}
               for r in range(REGIMES)]
    return [
        Completion(
            request_id=f"bench-{run}-{i}", text="", token_ids=tokens, prompt_tokens=32, finish_reason="length",
            stats=stats[i], summary={}, regime=regimes[i % REGIMES],
            created=start + hours * 3600 * i / sequences, ttft_s=0.05, latency_s=5.0,
        )
        for i in range(sequences)
    ]


def store(rows: int, data: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda message: None)
    sequences = max(1, rows // SEQUENCE_TOKENS)
    say(f"building {sequences} synthetic sequences of {SEQUENCE_TOKENS} tokens")
    completions = synthetic_completions(sequences)
    scratch = None if data else tempfile.TemporaryDirectory(prefix="softwatch-bench-store-")
    root = data or scratch.name
    context = RecordContext(deployment="bench", replica="bench-0")
    say(f"writing {sequences * SEQUENCE_TOKENS:,} token rows to {root}")
    started = time.perf_counter()
    sink = ParquetSink(root, flush_interval_s=60.0)
    for i, c in enumerate(completions):
        sink.write_completion(c, context)
        if (i + 1) % (sequences // 10 or 1) == 0:
            say(f"  {100 * (i + 1) // sequences}%")
    sink.close()
    write_s = time.perf_counter() - started
    written = sink.rows_written["tokens"]

    say("running the per-regime, per-hour summary query")
    db = Store(root)
    times, groups = [], 0
    for _ in range(3):
        t = time.perf_counter()
        groups = db.query(SUMMARY_QUERY).num_rows
        times.append(time.perf_counter() - t)
    db.close()
    if scratch is not None:
        scratch.cleanup()
    return {
        "rows": written,
        "sequences": sequences,
        "write_s": write_s,
        "write_rows_per_s": written / write_s,
        "query_s": float(np.median(times)),
        "query_groups": groups,
        "root": data,  # None: a temporary directory, removed
    }
