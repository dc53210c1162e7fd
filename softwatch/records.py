"""Arrow schemas of the tables (`tokens`, `sequences`, `drift_reports`, `probes`) and the
conversion of a finished request into their rows.

Every token and sequence row carries the regime (DESIGN.md): `model_id`, `model_rev`,
`params_id`, the decoding parameters, `deployment` and `replica`. Prompt and completion
text are columns that stay null unless the operator turns text storage on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from .completion import Completion, repetition
from .stats import FIELDS

TIMESTAMP = pa.timestamp("us", tz="UTC")

REGIME = [
    pa.field("model_id", pa.string()),
    pa.field("model_rev", pa.string()),
    pa.field("params_id", pa.string()),
    pa.field("temperature", pa.float64()),
    pa.field("top_p", pa.float64()),
    pa.field("top_k", pa.int32()),
    pa.field("template_version", pa.string()),
    pa.field("deployment", pa.string()),
    pa.field("replica", pa.string()),
]
REGIME_COLUMNS = [f.name for f in REGIME]
INTEGER_FIELDS = ("rank", "nonfinite", "overflow")

TOKENS = pa.schema(
    [
        pa.field("ts", TIMESTAMP),  # when the sequence finished; its token rows share it
        pa.field("request_id", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        *[pa.field(name, pa.int32() if name in INTEGER_FIELDS else pa.float32()) for name in FIELDS],
        *REGIME,
    ]
)

SUMMARY_FIELDS = (
    "perplexity", "sampling_perplexity", "mean_entropy", "max_entropy", "mean_sampling_entropy",
    "mean_top_prob", "min_top_prob", "p10_top_prob", "mean_margin",
)

SEQUENCES = pa.schema(
    [
        pa.field("ts", TIMESTAMP),  # finished
        pa.field("created", TIMESTAMP),  # submitted
        pa.field("request_id", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("prompt_key", pa.string()),  # completion.prompt_key; null when the producer set none
        pa.field("generated_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("repetition", pa.float64()),  # completion.repetition of the generated token ids; null if too short
        pa.field("ttft_s", pa.float64()),
        pa.field("latency_s", pa.float64()),
        *[pa.field(name, pa.float64()) for name in SUMMARY_FIELDS],
        pa.field("nonfinite", pa.int64()),
        pa.field("overflow", pa.int64()),
        pa.field("tokens_kept", pa.bool_()),  # false when token sampling dropped its token rows
        pa.field("prompt", pa.string()),  # null unless text storage is on
        pa.field("text", pa.string()),
        *REGIME,
        # "deployment": decoded with the deployment's default parameters; "request": a client's
        # own temperature/top_p/top_k gave another params_id; null: the producer cannot tell
        pa.field("params_source", pa.string()),
    ]
)

DRIFT_REPORTS = pa.schema(
    [
        pa.field("report_id", pa.string()),  # one id per monitor run; its rows share it
        pa.field("ts", TIMESTAMP),
        # "regime" | "window" | "probe" | "online" | "replica" | "deployment" (partial.py) |
        # "regime_traffic" | "window_traffic" | "regime_comparable" | "window_comparable" (attribution.py)
        pa.field("kind", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("test", pa.string()),
        pa.field("statistic", pa.float64()),
        pa.field("p_value", pa.float64()),
        pa.field("effect_size", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("baseline_regime", pa.string()),
        pa.field("current_regime", pa.string()),
        pa.field("baseline_start", TIMESTAMP),
        pa.field("baseline_end", TIMESTAMP),
        pa.field("current_start", TIMESTAMP),
        pa.field("current_end", TIMESTAMP),
        pa.field("n_baseline", pa.int64()),
        pa.field("n_current", pa.int64()),
        pa.field("verdict", pa.string()),  # "drift" | "no_drift" | "insufficient_data" | "traffic_change"
        pa.field("unit", pa.string()),  # what the test permuted: "prompt" clusters or single "sequence"s
        pa.field("clusters_baseline", pa.int64()),
        pa.field("clusters_current", pa.int64()),
        pa.field("request_id", pa.string()),  # kind "online", verdict "drift": the sequence where the alarm fired
        pa.field("deployment", pa.string()),  # kinds "replica" and "deployment": the group compared with the others
        pa.field("replica", pa.string()),  # kind "replica"
    ]
)

# teacher-forced probe scores (drift/probes.py): one row per probe, scoring pass and model
PROBES = pa.schema(
    [
        pa.field("ts", TIMESTAMP),
        pa.field("run_id", pa.string()),  # one id per `softwatch probe` run
        pa.field("probe_id", pa.string()),
        pa.field("replicate", pa.int32()),  # 0: the scores; 1: rescored in another batch composition
        pa.field("logprob", pa.float64()),
        pa.field("entropy", pa.float64()),
        pa.field("top_prob", pa.float64()),
        pa.field("model_id", pa.string()),
        pa.field("model_rev", pa.string()),
    ]
)

SCHEMAS = {"tokens": TOKENS, "sequences": SEQUENCES, "drift_reports": DRIFT_REPORTS, "probes": PROBES}


@dataclass(frozen=True)
class RecordContext:
    """Where records come from, and what the operator allows to be stored."""

    deployment: str = "local"
    replica: str = ""
    store_text: bool = False


def regime_key(regime: dict) -> str:
    """One string naming a regime, as drift reports refer to it."""
    return f"{regime['model_id']}@{regime['model_rev']}/{regime['params_id']}"


def keeps_tokens(request_id: str, sample_rate: float) -> bool:
    """Whether the token rows of this request are kept; a hash of the id, so every replica
    (and a re-run) decides the same way."""
    if sample_rate >= 1:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < sample_rate


def token_table(items: Sequence[tuple[Completion, RecordContext]]) -> pa.Table:
    """The `tokens` rows of finished requests, built column by column for all of them at once
    (per-request Arrow calls would cost more than the Parquet write)."""
    items = [(c, ctx) for c, ctx in items if c.token_ids]
    if not items:
        return TOKENS.empty_table()
    lengths = np.array([len(c.token_ids) for c, _ in items])
    owner = np.repeat(np.arange(len(items)), lengths)  # row -> index of its request
    starts = np.cumsum(lengths) - lengths
    stats = np.concatenate([
        np.asarray(c.stats, dtype=np.float32) if c.stats is not None else np.full((len(c.token_ids), len(FIELDS)), np.nan, np.float32)
        for c, _ in items
    ])
    by_field = np.ascontiguousarray(stats.T)  # one contiguous column per field, shared by Arrow
    finished = np.array([int(_finished(c).timestamp() * 1_000_000) for c, _ in items], np.int64)
    columns = [
        pa.array(finished[owner]).view(TIMESTAMP),
        _per_request([c.request_id for c, _ in items], pa.string(), owner),
        pa.array((np.arange(len(owner)) - starts[owner]).astype(np.int32)),
        pa.array(np.concatenate([np.asarray(c.token_ids, np.int32) for c, _ in items])),
    ]
    for name, column in zip(FIELDS, by_field):
        if name in INTEGER_FIELDS:
            finite = np.isfinite(column)
            columns.append(pa.array(np.where(finite, column, 0).astype(np.int32), mask=~finite))
        else:
            columns.append(pa.array(column))
    regimes = [_regime_values(c, ctx) for c, ctx in items]
    columns += [_per_request([r[i] for r in regimes], f.type, owner) for i, f in enumerate(REGIME)]
    return pa.Table.from_arrays(columns, schema=TOKENS)


def _per_request(values: list, type_: pa.DataType, owner: np.ndarray) -> pa.Array:
    return pa.array(values, type_).take(pa.array(owner))


def sequence_row(c: Completion, context: RecordContext, tokens_kept: bool, prompt: str | None = None) -> dict:
    """The `sequences` row of one finished request, as a dict of column values."""
    s = c.summary
    row = {
        "ts": _finished(c),
        "created": datetime.fromtimestamp(c.created, timezone.utc),
        "request_id": c.request_id,
        "prompt_tokens": c.prompt_tokens,
        "prompt_key": c.prompt_key,
        "generated_tokens": len(c.token_ids),
        "finish_reason": c.finish_reason,
        "repetition": repetition(c.token_ids),
        "ttft_s": c.ttft_s,
        "latency_s": c.latency_s,
        **{name: s.get(name) for name in SUMMARY_FIELDS},
        "nonfinite": s.get("nonfinite"),
        "overflow": s.get("overflow"),
        "tokens_kept": tokens_kept,
        "prompt": prompt if context.store_text else None,
        "text": c.text if context.store_text else None,
    }
    row.update(zip(REGIME_COLUMNS, _regime_values(c, context)))
    row["params_source"] = c.regime.get("params_source")
    return row


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A table of `schema` from row dicts (missing columns are null)."""
    return pa.Table.from_pylist(rows, schema=schema)


def _finished(c: Completion) -> datetime:
    return datetime.fromtimestamp(c.created + c.latency_s, timezone.utc)


def _regime_values(c: Completion, context: RecordContext) -> list:
    r = c.regime
    return [r["model_id"], r["model_rev"], r["params_id"], r["temperature"], r["top_p"], r["top_k"],
            r["template_version"], context.deployment, context.replica]
