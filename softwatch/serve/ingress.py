"""The HTTP ingress: OpenAI-compatible routes in front of the LLM deployment.

Every choice of a request is one call to the LLM deployment, so the choices of one request
(and the requests of many clients) spread over replicas and batch together inside each.
"""


import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ChatRequest, CompletionRequest, error_body, new_id, now

app = FastAPI(title="softwatch", description="OpenAI-compatible LLM serving with softmax observability.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.kind = status, message, param, kind


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(error_body(exc.message, exc.param, exc.kind), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid" or "JSON" in str(first.get("msg", "")):
        message, param = f"the body is not valid JSON: {first.get('msg', '')}", None
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return JSONResponse(error_body(message, param), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kinds = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the body is not valid JSON (is it UTF-8?)"
    return JSONResponse(error_body(message, kind=kinds.get(exc.status_code, "error")), status_code=exc.status_code)


async def _authorized(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", kind="authentication_error")


def _params(body, max_tokens: int | None, top_logprobs: int, logprobs: bool = False) -> dict:
    """Only what the request set; the replica fills the rest from its configured defaults."""
    params = {"stop": tuple(body.stops())}
    for name, value in (("temperature", body.temperature), ("top_p", body.top_p), ("top_k", body.top_k),
                        ("max_tokens", max_tokens)):
        if value is not None:
            params[name] = value
    if top_logprobs or logprobs:
        params.update(logprobs=True, top_logprobs=top_logprobs)
    return params


def _raise(event: dict):
    raise ApiError(event["status"], event["message"], event.get("param"),
                   "invalid_request_error" if event["status"] < 500 else "server_error")


def _usage(results) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(len(r["token_ids"]) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(entries: list[dict]) -> dict:
    tokens, offsets, offset = [], [], 0
    for e in entries:
        piece = e.get("text", "")
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: v for _, t, v in e["top"]} for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[dict]) -> dict:
    return {"content": [{"token": e["text"], "logprob": e["logprob"], "bytes": list(e["text"].encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in e["top"]]}
                        for e in entries]}


def _response(results: list[dict], rid: str, model: str, chat: bool) -> dict:
    choices = []
    for r in sorted(results, key=lambda r: r["index"]):
        logprobs = None
        if r["logprobs"] is not None:
            logprobs = _chat_logprobs(r["logprobs"]) if chat else _completion_logprobs(r["logprobs"])
        choice = {"index": r["index"], "finish_reason": r["finish_reason"], "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": r["text"]}
        else:
            choice["text"] = r["text"]
        if "stats" in r:
            choice["softwatch"] = {**r["stats"], "regime": r["regime"]}
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": _usage(results),
            "softwatch": {"regime": results[0]["regime"], "request_ids": [r["request_id"] for r in results]}}


async def _chunks(head, events, rid: str, model: str, chat: bool, include_usage: bool) -> AsyncIterator[dict]:
    created, done = now(), []
    started: set[int] = set()

    def chunk(index: int, text: str, logprobs, finish: str | None, extra: dict | None = None) -> dict:
        if chat:
            delta = {"content": text} if text or finish is None else {}
            if index not in started:
                delta["role"] = "assistant"
                started.add(index)
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": _chat_logprobs([logprobs]) if logprobs else None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish,
                      "logprobs": _completion_logprobs([logprobs]) if logprobs else None}
        if extra:
            choice["softwatch"] = extra
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice]}

    async def all_events():
        yield head
        async for item in events:
            yield item

    async for index, event in all_events():
        if event["type"] == "token":
            if event["text"] or event["logprobs"]:
                yield chunk(index, event["text"], event["logprobs"], None)
        elif event["type"] == "done":
            done.append(event)
            extra = {**event["stats"], "regime": event["regime"]} if "stats" in event else None
            yield chunk(index, event["rest"], None, event["finish_reason"], extra)
        else:
            yield {"error": error_body(event["message"], event.get("param"))["error"]}
    if include_usage:
        yield {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": model, "choices": [], "usage": _usage(done)}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for c in chunks:
        yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"


# Defined last: Serve serializes the class with the module globals it sees at decoration.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, api_key: str | None = None, monitor: DeploymentHandle | None = None):
        self.llm = llm
        self.monitor = monitor
        app.state.api_key = api_key
        self._info: dict | None = None

    async def _model(self) -> dict:
        if self._info is None:
            self._info = await self.llm.info.remote()
        return self._info

    async def _check_model(self, requested: str | None) -> str:
        served = (await self._model())["model_id"]
        if requested not in (None, "", served, "default"):
            raise ApiError(404, f"model {requested!r} is not served here; this service serves {served!r}", "model",
                           "not_found_error")
        return served

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/drift/reports", dependencies=[Depends(_authorized)])
    async def drift_reports(self, report_id: str | None = None, kind: Literal["regime", "window", "online", "probe"] | None = None,
                            metric: str | None = None, verdict: Literal["drift", "no_drift", "insufficient_data"] | None = None,
                            current_regime: str | None = None, baseline_regime: str | None = None,
                            since: datetime | None = None, latest: bool = False,
                            limit: int = Query(1000, ge=1, le=10_000)) -> dict:
        """Rows of drift_reports, newest first (read-only; every filter is a parameter)."""
        if self.monitor is None:
            raise ApiError(404, "drift monitoring is off: the service runs without a data directory",
                           kind="not_found_error")
        given = {"report_id": report_id, "kind": kind, "metric": metric, "verdict": verdict,
                 "current_regime": current_regime, "baseline_regime": baseline_regime,
                 "since": since.isoformat() if since else None}
        rows = await self.monitor.reports.remote({k: v for k, v in given.items() if v is not None}, latest, limit)
        return {"object": "list", "data": jsonable_encoder(rows)}

    @app.get("/v1/models", dependencies=[Depends(_authorized)])
    async def models(self) -> dict:
        info = await self._model()
        return {"object": "list", "data": [{"id": info["model_id"], "object": "model", "created": 0,
                                            "owned_by": "softwatch", "softwatch": {"model_rev": info["model_rev"]}}]}

    @app.post("/v1/completions", dependencies=[Depends(_authorized)])
    async def completions(self, body: CompletionRequest):
        model = await self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        if any(p == "" for p in prompts):
            raise ApiError(400, "prompt: must not be empty", "prompt")
        params = _params(body, body.max_tokens, body.logprobs or 0)
        specs = [{"prompt": p, "params": params} for p in prompts]
        return await self._respond(body, specs, model, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(_authorized)])
    async def chat(self, body: ChatRequest):
        model = await self._check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs: true", "top_logprobs")
        params = _params(body, body.max_completion_tokens or body.max_tokens, top, body.logprobs)
        return await self._respond(body, [{"messages": messages, "params": params}], model, chat=True)

    async def _respond(self, body, specs: list[dict], model: str, chat: bool):
        stats = bool(body.softwatch and body.softwatch.stats)
        fault = body.softwatch.inject_fault if body.softwatch else None
        calls = []
        for p, spec in enumerate(specs):
            for i in range(body.n):
                params = dict(spec["params"])
                if body.seed is not None:
                    params["seed"] = body.seed + i
                calls.append({**spec, "params": params, "request_id": new_id("seq"), "stream": body.stream,
                              "stats": stats, "index": p * body.n + i, "fault": fault})
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            first = self._events(calls)
            head = await first.__anext__()  # an invalid request fails before the stream starts
            if head[1]["type"] == "error":
                await first.aclose()
                _raise(head[1])
            return StreamingResponse(_sse(_chunks(head, first, rid, model, chat, usage)), media_type="text/event-stream")
        results = await asyncio.gather(*(self._collect(call) for call in calls))
        for r in results:
            if r["type"] == "error":
                _raise(r)
        return _response(results, rid, model, chat)

    async def _collect(self, call: dict) -> dict:
        async for event in self.llm.options(stream=True).generate.remote(call):
            if event["type"] in ("done", "error"):
                return {**event, "index": call["index"]}
        return {"type": "error", "status": 500, "param": None, "message": "the replica ended the sequence early"}

    async def _events(self, calls: list[dict]) -> AsyncIterator[tuple[int, dict]]:
        """Events of every choice, merged as they come."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(call):
            try:
                async for event in self.llm.options(stream=True).generate.remote(call):
                    await merged.put((call["index"], event))
            except Exception as exc:  # noqa: BLE001
                await merged.put((call["index"], {"type": "error", "status": 500, "param": None,
                                                  "message": f"{type(exc).__name__}: {exc}"}))

        tasks = [asyncio.create_task(pump(call)) for call in calls]
        left = len(calls)
        try:
            while left:
                index, event = await merged.get()
                if event["type"] in ("done", "error"):
                    left -= 1
                yield index, event
        finally:
            for t in tasks:
                t.cancel()
