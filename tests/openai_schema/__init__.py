"""Checks response bodies and stream chunks against OpenAI's published OpenAPI schema
(openai_schema.json: vendored, see its $comment and extract.py).

The schema is OpenAPI 3.0: `nullable: true` is translated to JSON Schema's `anyOf [..., null]`;
nothing else is changed, so extra properties (softwatch's) pass exactly where OpenAI's schema
allows them and every standard field is checked as published. The one addition: OpenAI
publishes no schema for streamed legacy completions; their chunks are CreateCompletionResponse
objects whose `finish_reason` is null until the last (OpenAI's own streams send that).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
from jsonschema import Draft202012Validator

_SPEC = json.loads((Path(__file__).parent / "openai_schema.json").read_text())


def _json_schema(node):
    if isinstance(node, dict):
        node = {k: _json_schema(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


def _validator(name: str, schemas: dict) -> Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
    return Draft202012Validator(root)


_SCHEMAS = _json_schema(_SPEC["components"]["schemas"])
_STREAMED_COMPLETION = copy.deepcopy(_SCHEMAS)
_choice = _STREAMED_COMPLETION["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
_choice["finish_reason"] = {"anyOf": [_choice["finish_reason"], {"type": "null"}]}

VALIDATORS = {
    ("/v1/chat/completions", False): _validator("CreateChatCompletionResponse", _SCHEMAS),
    ("/v1/chat/completions", True): _validator("CreateChatCompletionStreamResponse", _SCHEMAS),
    ("/v1/completions", False): _validator("CreateCompletionResponse", _SCHEMAS),
    ("/v1/completions", True): _validator("CreateCompletionResponse", _STREAMED_COMPLETION),
}


class SchemaChecks:
    """Validates every 200 answer of the completion routes that passes through `transport()`;
    counts what it checked, so a test can show the check ran."""

    def __init__(self):
        self.bodies = 0
        self.chunks = 0

    def check(self, path: str, streamed: bool, obj: dict) -> None:
        errors = sorted(VALIDATORS[(path, streamed)].iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{path} {'chunk' if streamed else 'body'} breaks OpenAI's schema: " + "; ".join(
            f"{list(e.path)}: {e.message}" for e in errors[:5])
        if streamed:
            self.chunks += 1
        else:
            self.bodies += 1

    def transport(self) -> httpx.BaseTransport:
        return _CheckingTransport(self)


class _CheckingTransport(httpx.HTTPTransport):
    def __init__(self, checks: SchemaChecks):
        super().__init__()
        self.checks = checks

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        path = request.url.path
        if response.status_code != 200 or not any(path == p for p, _ in VALIDATORS):
            return response
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return httpx.Response(200, headers=response.headers, stream=_CheckedStream(response, path, self.checks),
                                  request=request)
        body = response.read()
        self.checks.check(path, False, json.loads(body))
        return httpx.Response(200, headers=response.headers, content=body, request=request)


class _CheckedStream(httpx.SyncByteStream):
    """Passes the SSE bytes through, checking each `data:` event (error events excepted) as it ends."""

    def __init__(self, response: httpx.Response, path: str, checks: SchemaChecks):
        self.response, self.path, self.checks = response, path, checks

    def __iter__(self):
        pending = b""
        for part in self.response.iter_raw():
            pending += part
            *events, pending = pending.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data and data != b"[DONE]":
                    obj = json.loads(data)
                    if "error" not in obj:
                        self.checks.check(self.path, True, obj)
            yield part

    def close(self):
        self.response.close()
