"""`softwatch bench serve`: the same streamed completions through the softwatch Serve app on
each engine — softwatch's own, vLLM with the observer, vLLM with the observer off — at several
client concurrencies.

This VM's speed drifts by 10-15% over seconds (see bench/vllm.py), more than the observer's
cost. So every variant is deployed at once, as its own Serve app under its own route prefix,
and the variants take turns: each round runs every (concurrency, variant) phase, the variants'
order rotating from round to round, and a variant's figures pool its phases of all rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from .decode import BENCH_PROMPTS

# A variant: (engine setting, observe setting) of the Serve app it is deployed as.
VARIANTS = {"softwatch": ("softwatch", True), "vllm": ("vllm", True), "vllm_plain": ("vllm", False)}
CONCURRENCIES = (1, 8, 32)
RATIO_CONCURRENCY = 8


@dataclass
class Phase:
    """What the clients of one variant saw at one concurrency, pooled over rounds."""
    wall_s: float = 0.0
    tokens: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    token_gaps_s: list[float] = field(default_factory=list)  # between a request's streamed chunks
    latencies_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"tok_s": self.tokens / self.wall_s, "tokens": self.tokens, "requests": len(self.latencies_s),
                "ttft_p50_s": _quantile(self.ttfts_s, 0.5), "ttft_p99_s": _quantile(self.ttfts_s, 0.99),
                "token_latency_p50_s": _quantile(self.token_gaps_s, 0.5),
                "token_latency_p99_s": _quantile(self.token_gaps_s, 0.99),
                "latency_p50_s": _quantile(self.latencies_s, 0.5), "latency_p99_s": _quantile(self.latencies_s, 0.99)}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def request_body(model: str, i: int, max_tokens: int, temperature: float) -> dict:
    """Request i of every phase: the same prompt and seed for every variant, so vLLM with and
    without the observer draw the same tokens."""
    return {"model": model, "prompt": BENCH_PROMPTS[i % len(BENCH_PROMPTS)], "max_tokens": max_tokens,
            "temperature": temperature, "seed": i, "stream": True, "stream_options": {"include_usage": True}}


def _stream_one(client: httpx.Client, url: str, body: dict) -> tuple[float, list[float], float, int]:
    """(TTFT, gaps between chunks, latency, completion tokens) of one streamed completion."""
    started = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("choices"):
                chunk_times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return (chunk_times[0] if chunk_times else done) - started, gaps, done - started, tokens


def run_phase(client: httpx.Client, url: str, bodies: list[dict], concurrency: int, into: Phase) -> None:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: _stream_one(client, url, body), bodies))
    into.wall_s += time.perf_counter() - started
    for ttft, gaps, latency, tokens in results:
        into.ttfts_s.append(ttft)
        into.token_gaps_s.extend(gaps)
        into.latencies_s.append(latency)
        into.tokens += tokens


def bench(urls: dict[str, str], model: str, api_key: str | None = None,
          concurrencies: Iterable[int] = CONCURRENCIES, requests_per_client: int = 2, max_tokens: int = 64,
          rounds: int = 3, temperature: float = 0.7, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Bench each variant's service (`urls`: variant -> base URL) in rotating turns. A phase at
    concurrency c sends c × requests_per_client requests from c clients."""
    concurrencies = tuple(concurrencies)
    variants = list(urls)
    phases = {v: {c: Phase() for c in concurrencies} for v in variants}
    per_round: list[dict] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=900, limits=httpx.Limits(max_connections=max(concurrencies) + 4)) as client:
        for variant in variants:  # warm-up: first steps allocate, first requests compile
            run_phase(client, urls[variant], [request_body(model, 0, 4, temperature)], 1, Phase())
        for r in range(rounds):
            this_round = {v: {c: Phase() for c in concurrencies} for v in variants}
            for c in concurrencies:
                bodies = [request_body(model, i, max_tokens, temperature) for i in range(c * requests_per_client)]
                for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
                    progress(f"round {r + 1}/{rounds}: {variant}, {len(bodies)} requests from {c} clients")
                    run_phase(client, urls[variant], bodies, c, this_round[variant][c])
                    _pool(phases[variant][c], this_round[variant][c])
            per_round.append(_ratios({v: {c: p.summary() for c, p in ps.items()} for v, ps in this_round.items()}))
    results = {v: {str(c): p.summary() for c, p in ps.items()} for v, ps in phases.items()}
    return {"model": model, "max_tokens": max_tokens, "temperature": temperature, "rounds": rounds,
            "requests_per_client": requests_per_client, "concurrencies": list(concurrencies),
            "variants": results, **_ratios({v: {int(c): s for c, s in r.items()} for v, r in results.items()}),
            "per_round": per_round}


def _pool(total: Phase, phase: Phase) -> None:
    total.wall_s += phase.wall_s
    total.tokens += phase.tokens
    total.ttfts_s += phase.ttfts_s
    total.token_gaps_s += phase.token_gaps_s
    total.latencies_s += phase.latencies_s


def _ratios(summaries: dict[str, dict[int, dict]]) -> dict:
    """`vllm_vs_softwatch` (vLLM with the observer / softwatch's engine) and `observer_overhead`
    (vLLM without / with the observer), tok/s at RATIO_CONCURRENCY; null where a variant is missing."""
    def tok_s(variant: str) -> float | None:
        return summaries.get(variant, {}).get(RATIO_CONCURRENCY, {}).get("tok_s")

    observed, plain, own = tok_s("vllm"), tok_s("vllm_plain"), tok_s("softwatch")
    return {"vllm_vs_softwatch": observed / own if observed and own else None,
            "observer_overhead": plain / observed if observed and plain else None}
