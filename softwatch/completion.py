"""The finished sequence: the seam between a decoding engine (softwatch's own, or vLLM with
the observer) and everything after it (records, telemetry, serving, `instrument`).

A producer turns each finished request into a `Completion`: its tokens, the [n, len(FIELDS)]
statistics of DESIGN.md, the sequence `summarize`d, and the regime its `DecodingParams` name.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from .stats import COLUMN, FIELDS


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` names the offending parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


MAX_TOP_LOGPROBS = 20
# Bounds of the numeric fields: what the sampler's int64 seed tensor and the records' int32
# columns hold, and OpenAI's own limits; a value past them fails here, not in a step or a flush.
MAX_TEMPERATURE = 2.0
MAX_INT32 = 2**31 - 1
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_STOPS = 4
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class TokenLogprobs:
    """log q of an emitted token and, when asked for, of the most likely tokens of its step."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, log q), most likely first


@dataclass(frozen=True)
class DecodingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    template_version: str = "v1"
    ignore_eos: bool = False  # benchmarks: always run to max_tokens
    logprobs: bool = False  # report log q of each emitted token as it is generated
    top_logprobs: int = 0  # and of the n most likely tokens at each step (implies logprobs)

    def validate(self) -> None:
        checks = [
            ("temperature", isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
             and 0 <= self.temperature <= MAX_TEMPERATURE, f"must be a number in [0, {MAX_TEMPERATURE}]"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", _int_in(self.top_k, 0, MAX_INT32), f"must be an integer in [0, {MAX_INT32}] (0 = off)"),
            ("max_tokens", _int_in(self.max_tokens, 1, MAX_INT32), f"must be an integer in [1, {MAX_INT32}]"),
            ("stop", len(self.stop) <= MAX_STOPS, f"must have at most {MAX_STOPS} entries, got {len(self.stop)}"),
            ("stop", all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"must be non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("seed", self.seed is None or _int_in(self.seed, *SEED_RANGE), f"must be an integer in {list(SEED_RANGE)}"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidRequest(name, message if name == "stop" else f"{message}, got {getattr(self, name)!r}")

    def regime_params(self) -> dict:
        """The decoding parameters that shape the sampling distribution, normalized."""
        greedy = self.temperature == 0
        return {
            "temperature": round(float(self.temperature), 6),
            "top_p": 1.0 if greedy else round(float(self.top_p), 6),
            "top_k": 0 if greedy else int(self.top_k),
            "template_version": self.template_version,
        }

    @property
    def params_id(self) -> str:
        return params_id(self.regime_params())

    def regime(self, model_id: str, model_rev: str) -> dict:
        """The regime a sequence decoded with these parameters belongs to, as records name it."""
        return {"model_id": model_id, "model_rev": model_rev, "params_id": self.params_id, **self.regime_params()}


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def params_id(regime_params: dict) -> str:
    """A short hash naming normalized decoding parameters: the regime's `params_id`."""
    blob = json.dumps(regime_params, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=4).hexdigest()


def prompt_key(token_ids: list[int]) -> str:
    """A short hash naming a prompt by its token ids (never its text): sequences that share
    it are one cluster for the drift tests. Unsalted, so whoever guesses a prompt (and the
    tokenizer) can confirm it was sent; a key is 64 bits, so distinct prompts do not collide
    in practice."""
    blob = ",".join(str(int(t)) for t in token_ids).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


REPETITION_N = 4


def repetition(token_ids: list[int], n: int = REPETITION_N) -> float | None:
    """The share of a sequence's token n-grams that repeat an earlier n-gram of the same
    sequence, 1 − distinct / total (Welleck et al.'s seq-rep-n): 0 for text that never repeats
    itself, near 1 for a degenerate loop. None when the sequence has fewer than `n` tokens."""
    total = len(token_ids) - n + 1
    if total < 1:
        return None
    distinct = len(set(zip(*(token_ids[i:] for i in range(n)))))
    return 1.0 - distinct / total


@dataclass
class Completion:
    """One finished request: what was generated, its per-token statistics and its regime."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    stats: torch.Tensor | None  # [generated, len(FIELDS)] float32 on the host; None uninstrumented
    summary: dict
    regime: dict  # DecodingParams.regime; a serving replica adds "params_source" (deployment | request)
    created: float  # wall-clock time of submission
    ttft_s: float
    latency_s: float
    logprobs: list[TokenLogprobs] | None = None  # when the request asked for them
    prompt_key: str | None = None  # `prompt_key(prompt token ids)`, set by the producer

    def token_records(self, tokenizer) -> list[dict]:
        """[{"id", "text", <every token field>}] for each generated token."""
        rows = self.stats.tolist() if self.stats is not None else [[] for _ in self.token_ids]
        out = []
        for token, values in zip(self.token_ids, rows):
            record = {"id": token, "text": tokenizer.decode([token])}
            record.update({name: _field_value(name, v) for name, v in zip(FIELDS, values)})
            out.append(record)
        return out


def _field_value(name: str, v: float):
    return int(v) if name in ("rank", "nonfinite", "overflow") and math.isfinite(v) else v


def summarize(stats: torch.Tensor | None, extra_nonfinite: float = 0.0, extra_overflow: float = 0.0) -> dict:
    """The sequence summary of DESIGN.md from a [n, F] statistics tensor."""
    if stats is None:
        return {}
    n = stats.shape[0]
    col = {name: stats[:, i].double() for name, i in COLUMN.items()}

    def agg(name, fn):
        return float(fn(col[name])) if n else float("nan")

    return {
        "perplexity": agg("logprob", lambda v: torch.exp(-v.mean())),
        "sampling_perplexity": agg("sampling_logprob", lambda v: torch.exp(-v.mean())),
        "mean_entropy": agg("entropy", torch.mean),
        "max_entropy": agg("entropy", torch.max),
        "mean_sampling_entropy": agg("sampling_entropy", torch.mean),
        "mean_top_prob": agg("top_prob", torch.mean),
        "min_top_prob": agg("top_prob", torch.min),
        "p10_top_prob": agg("top_prob", lambda v: torch.quantile(v, 0.1)),
        "mean_margin": agg("margin", torch.mean),
        # nansum: a position an engine could not observe is a NaN row
        "nonfinite": int(col["nonfinite"].nansum()) + int(extra_nonfinite),
        "overflow": int(col["overflow"].nansum()) + int(extra_overflow),
    }
