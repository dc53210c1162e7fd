"""`softwatch bench telemetry`: what recording a finished sequence costs (OpenTelemetry
instruments, and the Parquet sink) next to what decoding it cost, measured in one run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from ..engine import DecodingParams, Engine
from ..models import LoadedModel
from ..records import RecordContext
from ..store import ParquetSink
from ..telemetry import Telemetry
from .decode import BENCH_PROMPTS


def telemetry(lm: LoadedModel, batch: int, new_tokens: int, records: int = 2000,
              progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda message: None)
    engine = Engine(lm, max_batch=batch)
    params = DecodingParams(temperature=0.7, top_p=0.9, max_tokens=new_tokens, ignore_eos=True, seed=0)
    prompts = (BENCH_PROMPTS * (batch // len(BENCH_PROMPTS) + 1))[:batch]
    engine.generate(prompts[:1], DecodingParams(max_tokens=2))  # warm-up
    say(f"decoding {batch} sequences of {new_tokens} tokens")
    started = time.perf_counter()
    completions = engine.generate(prompts, params)
    decode_s = (time.perf_counter() - started) / batch  # the decode time each sequence accounts for

    context = RecordContext(deployment="bench", replica="bench-0")
    meters = Telemetry("memory")
    say(f"recording {records} sequences into OpenTelemetry instruments")
    started = time.perf_counter()
    for i in range(records):
        meters.record(completions[i % batch], context)
    meters.reader.get_metrics_data()  # collection, as an export or a scrape would do
    telemetry_s = (time.perf_counter() - started) / records
    meters.shutdown()

    say(f"writing {records} sequences through the Parquet sink")
    with tempfile.TemporaryDirectory(prefix="softwatch-bench-telemetry-") as root:
        sink = ParquetSink(root, flush_interval_s=3600)
        started = time.perf_counter()
        for i in range(records):
            sink.write_completion(completions[i % batch], context)
        add_s = (time.perf_counter() - started) / records
        sink.close()  # the Arrow conversion and the write, done off the decode loop in serving
        records_s = (time.perf_counter() - started) / records
    return {
        "model": lm.model_id,
        "device": str(lm.device),
        "batch": batch,
        "new_tokens": new_tokens,
        "decode_ms_per_sequence": decode_s * 1e3,
        "telemetry_us_per_sequence": telemetry_s * 1e6,
        "telemetry_fraction": telemetry_s / decode_s,
        "sink_add_us_per_sequence": add_s * 1e6,
        "records_us_per_sequence": records_s * 1e6,
        "records_fraction": records_s / decode_s,
    }
