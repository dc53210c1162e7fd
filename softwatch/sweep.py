"""`softwatch sweep`: the same prompts at several temperatures, one row of sequence
statistics per temperature — what a sampling-parameter push would do to the output
distribution, before it is pushed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from .engine import DecodingParams, Engine
from .prompts import chat_messages, prompt_set
from .records import RecordContext

COLUMNS = ("temperature", "params_id", "sequences", "tokens", "mean_entropy", "mean_sampling_entropy",
           "log_perplexity", "mean_top_prob", "p10_top_prob", "eos_share", "tok_s")


def sweep(lm, temperatures: list[float], prompts: int = 16, max_tokens: int = 48, top_p: float = 1.0,
          seed: int = 0, sink=None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per temperature over the first `prompts` built-in prompts (same seeds at each
    temperature). With a `sink` the records are stored too, each temperature a regime."""
    texts = prompt_set()[:prompts]
    engine = Engine(lm, max_batch=max(1, min(prompts, 32)))
    rows = []
    for temperature in temperatures:
        params = [DecodingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed + i)
                  for i in range(len(texts))]
        for p in params:
            p.validate()
        started = time.perf_counter()
        for text, p in zip(texts, params):
            engine.submit(chat_messages(text), p, chat=True)
        done = []
        while engine.has_work():
            done += engine.step()
        elapsed = time.perf_counter() - started
        if sink is not None:
            for c in done:
                sink.write_completion(c, RecordContext(deployment="sweep"))
        tokens = sum(len(c.token_ids) for c in done)

        def mean(key, f=lambda v: v):
            values = [f(c.summary[key]) for c in done if c.summary.get(key) is not None]
            return float(np.mean(values)) if values else float("nan")

        rows.append({
            "temperature": temperature, "params_id": params[0].params_id, "sequences": len(done), "tokens": tokens,
            "mean_entropy": mean("mean_entropy"), "mean_sampling_entropy": mean("mean_sampling_entropy"),
            "log_perplexity": mean("perplexity", math.log), "mean_top_prob": mean("mean_top_prob"),
            "p10_top_prob": mean("p10_top_prob"),
            "eos_share": sum(c.finish_reason == "stop" for c in done) / max(len(done), 1),
            "tok_s": tokens / elapsed,
        })
        if progress:
            progress(f"temperature {temperature}: {len(done)} sequences, {tokens} tokens in {elapsed:.1f} s")
    return rows
