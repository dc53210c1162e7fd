"""`softwatch bench serve`: concurrent clients against the service, then the same requests
one at a time, side by side in one run."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from .decode import BENCH_PROMPTS


def _one(client: httpx.Client, url: str, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": BENCH_PROMPTS[i % len(BENCH_PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request {i} failed: {r.status_code} {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    return {"latency_s": done - started, "ttft_s": (first or done) - started, "tokens": tokens}


def _phase(url: str, model: str, api_key: str | None, concurrency: int, requests: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=600) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: _one(client, url, model, i, max_tokens), range(requests)))
        wall = time.perf_counter() - started
    latencies = sorted(r["latency_s"] for r in results)
    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "tokens": sum(r["tokens"] for r in results),
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in results),
        "wall_s": wall,
    }


def serve(url: str, model: str, api_key: str | None, concurrency: int, requests: int, max_tokens: int,
          progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda message: None)
    say(f"warming up {url}")
    _phase(url, model, api_key, 1, 1, 4)
    say(f"{requests} requests from {concurrency} concurrent clients, {max_tokens} tokens each")
    concurrent = _phase(url, model, api_key, concurrency, requests, max_tokens)
    say(f"the same {requests} requests one at a time")
    sequential = _phase(url, model, api_key, 1, requests, max_tokens)
    return {
        "url": url, "model": model, "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        **{k: concurrent[k] for k in ("tok_s", "p50_latency_s", "p99_latency_s", "ttft_p50_s")},
        "sequential_tok_s": sequential["tok_s"],
        "speedup": concurrent["tok_s"] / sequential["tok_s"],
        "tokens": concurrent["tokens"], "sequential_tokens": sequential["tokens"],
    }
