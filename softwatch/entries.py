"""The journal's encoding of one finished request: a JSON header and the token ids and
statistics as raw little-endian arrays. Decoding parses data and never executes it, and the
prompt and completion text are written only when the operator stores text (`store_text`)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from .completion import Completion
from .records import RecordContext

_HEADER_LENGTH = struct.Struct("<I")
_TOKEN_IDS = np.dtype("<i4")
_STATS = np.dtype("<f4")


@dataclass
class Entry:
    """What a sink needs to write a finished request's rows."""

    completion: Completion
    context: RecordContext
    tokens_kept: bool
    prompt: str | None


def encode(entry: Entry) -> bytes:
    c, context = entry.completion, entry.context
    token_ids = np.asarray(c.token_ids, _TOKEN_IDS)
    stats = None if c.stats is None else np.ascontiguousarray(np.asarray(c.stats), _STATS)
    header = {
        "request_id": c.request_id,
        "text": c.text if context.store_text else None,
        "prompt": entry.prompt if context.store_text else None,
        "prompt_tokens": c.prompt_tokens,
        "prompt_key": c.prompt_key,
        "finish_reason": c.finish_reason,
        "summary": c.summary,
        "regime": c.regime,
        "created": c.created,
        "ttft_s": c.ttft_s,
        "latency_s": c.latency_s,
        "tokens": len(token_ids),
        "stats_shape": None if stats is None else list(stats.shape),
        "context": {"deployment": context.deployment, "replica": context.replica, "store_text": context.store_text},
        "tokens_kept": entry.tokens_kept,
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    parts = [_HEADER_LENGTH.pack(len(blob)), blob, token_ids.tobytes()]
    if stats is not None:
        parts.append(stats.tobytes())
    return b"".join(parts)


def decode(data: bytes) -> Entry:
    """The entry `encode` wrote; ValueError if `data` is not one."""
    try:
        (length,) = _HEADER_LENGTH.unpack_from(data)
        header = json.loads(data[_HEADER_LENGTH.size:_HEADER_LENGTH.size + length])
        offset = _HEADER_LENGTH.size + length
        n = int(header["tokens"])
        token_ids = np.frombuffer(data, _TOKEN_IDS, n, offset)
        offset += token_ids.nbytes
        stats = None
        if header["stats_shape"] is not None:
            shape = tuple(int(d) for d in header["stats_shape"])
            stats = np.frombuffer(data, _STATS, int(np.prod(shape)), offset).reshape(shape).copy()
            offset += stats.nbytes
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes after the entry")
        context = RecordContext(**header["context"])
        completion = Completion(
            request_id=header["request_id"], text=header["text"] or "", token_ids=token_ids.tolist(),
            prompt_tokens=header["prompt_tokens"], finish_reason=header["finish_reason"], stats=stats,
            summary=header["summary"], regime=header["regime"], created=header["created"],
            ttft_s=header["ttft_s"], latency_s=header["latency_s"],
            prompt_key=header.get("prompt_key"),  # absent from entries journaled before it existed
        )
        return Entry(completion, context, bool(header["tokens_kept"]), header["prompt"])
    except (struct.error, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a journal entry: {exc}") from exc
