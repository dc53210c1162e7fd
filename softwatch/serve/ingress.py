"""The HTTP ingress: OpenAI-compatible routes in front of the LLM deployment.

A request is one call to the LLM deployment: its choices run on one replica, admitted together
(all or none), and the requests of many clients spread over replicas and batch together inside
each.
"""


import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import authorized, load_api_key
from .protocol import MAX_BODY_BYTES, MAX_CHOICES, SEED_RANGE, ChatRequest, CompletionRequest, error_body, new_id, now

log = logging.getLogger("softwatch.serve")

# Routes anyone may call: a load balancer's health check. Everything else, /docs and
# /openapi.json included, needs the key when the deployment has one.
OPEN_PATHS = ("/healthz",)
RETRY_AFTER_S = 1.0  # when the LLM deployment's backpressure names no wait

app = FastAPI(title="softwatch", description="OpenAI-compatible LLM serving with softmax observability.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 error_id: str | None = None, retry_after_s: float | None = None):
        self.status, self.message, self.param, self.kind, self.error_id = status, message, param, kind, error_id
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        body = error_body(self.message, self.param, self.kind)
        if self.error_id:
            body["error"]["id"] = self.error_id
        return body


def internal_error(detail: str) -> ApiError:
    """A 5xx for the client: a message and an id; the detail goes to the logs under that id."""
    error_id = new_id("err")
    log.error("softwatch: request failed (%s): %s", error_id, detail)
    return ApiError(500, f"the server failed to answer this request (error id {error_id}; the details are in "
                    "the service logs)", kind="server_error", error_id=error_id)


class _LimitBody:
    """Refuses request bodies over MAX_BODY_BYTES, declared or streamed (chunked), with a 413
    before they are parsed. The body is read here, so the limit is this middleware's answer, not
    an exception inside the route's body parsing (FastAPI turns those into a 400)."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return await _too_large()(scope, receive, send)
        try:
            body = await _read_body(receive)
        except _ClientGone:  # mid-body: nothing complete to parse, nobody to answer
            return
        if body is None:
            return await _too_large()(scope, receive, send)
        await self.inner(scope, _replay(body, receive), send)


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def _read_body(receive) -> bytes | None:
    """The whole request body; None once it exceeds MAX_BODY_BYTES."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > MAX_BODY_BYTES:
            return None
        more = message.get("more_body", False)
    return b"".join(parts)


def _replay(body: bytes, receive):
    """receive() for the app: the body read, then the client's own messages (a disconnect)."""
    replayed = False

    async def replay_receive():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay_receive


def _route(scope: dict) -> str:
    """The request's path within the app: without the app's route prefix (Serve's root_path)."""
    return scope["path"].removeprefix(scope.get("root_path", "").rstrip("/")) or "/"


class _RequireKey:
    """Every route but OPEN_PATHS needs `Authorization: Bearer <key>` when the app has a key."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route(scope) not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not authorized(scope["app"].state.api_key, given):  # the app Serve runs
                response = JSONResponse(error_body("a valid API key is required: Authorization: Bearer <key>",
                                                   kind="authentication_error"), status_code=401)
                return await response(scope, receive, send)
        await self.inner(scope, receive, send)


app.state.api_key = None
app.add_middleware(_LimitBody)
app.add_middleware(_RequireKey)  # added last, runs first: no body is read for a client without the key


def _too_large() -> JSONResponse:
    return JSONResponse(error_body(f"the request body exceeds {MAX_BODY_BYTES} bytes"), status_code=413)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = {"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("softwatch: unexpected error")
    return await _api_error(request, internal_error(f"{type(exc).__name__}: {exc}"))


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
    param = ".".join(loc) or None
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        reason = "is not supported by softwatch (leave it out)"
    if first.get("type") == "json_invalid" or "JSON" in str(first.get("msg", "")):
        message, param = f"the body is not valid JSON: {first.get('msg', '')}", None
    else:
        message = f"{param}: {reason}" if param else reason
    return JSONResponse(error_body(message, param), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kinds = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the body is not valid JSON (is it UTF-8?)"
    return JSONResponse(error_body(message, kind=kinds.get(exc.status_code, "error")), status_code=exc.status_code)


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


def _choice_seed(seed: int, choice: int) -> int:
    """Choice i of a seeded request draws with seed + i, wrapped into the int64 range."""
    low, high = SEED_RANGE
    return (seed + choice - low) % (high - low + 1) + low


def _failure(event: dict) -> ApiError:
    """The ApiError of a failed choice: a 4xx says what was wrong with the request; a 5xx or a
    choice whose decode failed is an internal error (message and id; the details are logged)."""
    if event["type"] == "done":  # finish_reason "error": the choice has a record, the client no answer
        return internal_error(f"the decode of {event.get('request_id')} failed")
    if event["status"] in (503, 504):  # at capacity, shutting down, a record not durable, a timeout: retry
        return ApiError(event["status"], event["message"], kind="server_error", retry_after_s=event.get("retry_after_s"))
    if event["status"] >= 500:
        return internal_error(f"the LLM deployment answered {event['status']}: {event['message']}")
    return ApiError(event["status"], event["message"], event.get("param"))


def _failed(event: dict) -> bool:
    return event["type"] == "error" or (event["type"] == "done" and event["finish_reason"] == "error")


def _usage(results, n: int) -> dict:
    """The prompt of each of a request's prompts counts once, however many choices it has."""
    prompt = sum(r["prompt_tokens"] for r in results if r["index"] % n == 0)
    completion = sum(len(r["token_ids"]) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """`offset`: where the first entry's text starts in the choice's text."""
    tokens, offsets = [], []
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
                        for e in entries],
            "refusal": None}


def _content_entries(entries: list[dict], finish_reason: str) -> list[dict]:
    """A chat choice's logprobs cover the tokens of its content: a choice that stopped ends with
    the token that stopped it (an end token, or one completing a stop string), not in the content."""
    return entries[:-1] if finish_reason == "stop" else entries


def _response(results: list[dict], rid: str, model: str, chat: bool, n: int) -> dict:
    choices = []
    for r in sorted(results, key=lambda r: r["index"]):
        logprobs = None
        if r["logprobs"] is not None:
            logprobs = (_chat_logprobs(_content_entries(r["logprobs"], r["finish_reason"])) if chat
                        else _completion_logprobs(r["logprobs"]))
        choice = {"index": r["index"], "finish_reason": r["finish_reason"], "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": r["text"], "refusal": None}
        else:
            choice["text"] = r["text"]
        if "stats" in r:
            choice["softwatch"] = {**r["stats"], "regime": r["regime"]}
        choices.append(choice)
    regime = results[0]["regime"]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model,
            "system_fingerprint": regime["model_rev"], "choices": choices, "usage": _usage(results, n),
            "softwatch": {"regime": regime, "request_ids": [r["request_id"] for r in results]}}


class _Choices:
    """A request's choices: the LLM deployment's one stream of events for all of them, pumped by
    a task (so that cancelling is immediate). The stream starts with "admitted" (the replica took
    every choice) or the request's refusal; then each event names its choice's "index"."""

    def __init__(self, stream: AsyncIterator[dict], indices: list[int]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._running = set(indices)
        self._task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[dict]) -> None:
        try:
            async for event in stream:
                await self._queue.put(event)
        finally:
            self._queue.put_nowait(None)  # the stream ended

    async def admission(self) -> dict | None:
        """None once every choice is admitted; else the refusal (a 4xx, or a 503 at capacity),
        which is the whole request's: none of its choices was decoded."""
        event = await self._queue.get()
        if event is None:
            return _lost(None)
        return None if event["type"] == "admitted" else event

    async def events(self) -> AsyncIterator[tuple[int | None, dict]]:
        """(index, event) of every choice after admission, until each is done or failed; a
        failure of the whole stream (a replica that died) has index None."""
        try:
            while self._running:
                event = await self._queue.get()
                if event is None:  # the stream ended with choices unanswered
                    yield None, _lost(min(self._running))
                    return
                index = event.get("index")
                if event["type"] in ("done", "error"):
                    self._running.discard(index)
                yield index, event
        finally:  # the client went away, or the request failed
            self.cancel()

    def cancel(self) -> None:
        """Stop every choice still running in the LLM deployment."""
        self._task.cancel()


async def _chunks(choices: _Choices, rid: str, model: str, fingerprint: str, chat: bool, n: int,
                  include_usage: bool) -> AsyncIterator[dict]:
    """The stream's chunks; a choice that fails ends it with an error chunk (its siblings are
    cancelled): a client must not read the rest as a success."""
    created, done = now(), []
    started: set[int] = set()
    offsets: dict[int, int] = {}  # completions: where the next token's text starts in the choice's text
    held: dict[int, dict] = {}  # chat: each choice's latest logprobs entry, sent once a later token shows it is content

    def chunk(index: int, text: str, entries: list[dict], finish: str | None, extra: dict | None = None) -> dict:
        if chat:
            delta = {"content": text} if text or finish is None else {}
            if index not in started:
                delta["role"] = "assistant"
                started.add(index)
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": _chat_logprobs(entries) if entries else None}
        else:
            logprobs = None
            if entries:
                logprobs = _completion_logprobs(entries, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(e.get("text", "")) for e in entries)
            choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        if extra:
            choice["softwatch"] = extra
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "system_fingerprint": fingerprint, "choices": [choice]}

    def token_entries(index: int, entry: dict | None) -> list[dict]:
        if not chat or entry is None:
            return [entry] if entry else []
        previous, held[index] = held.pop(index, None), entry
        return [previous] if previous else []

    async for index, event in choices.events():
        if _failed(event):
            choices.cancel()
            yield _failure(event).body()
            return
        if event["type"] == "token":
            entries = token_entries(index, event["logprobs"])
            if event["text"] or entries:
                yield chunk(index, event["text"], entries, None)
        else:
            done.append({**event, "index": index})
            last = held.pop(index, None)
            entries = _content_entries([last], event["finish_reason"]) if last else []
            extra = {"request_id": event["request_id"]}  # the choice's record in the dataset
            if "stats" in event:
                extra.update(event["stats"], regime=event["regime"])
            yield chunk(index, event["rest"], entries, event["finish_reason"], extra)
    if include_usage:
        yield {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": model, "system_fingerprint": fingerprint, "choices": [], "usage": _usage(done, n)}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for c in chunks:
        yield f"data: {json.dumps(c)}\n\n"
        if "error" in c:  # no [DONE]: it would claim the stream succeeded
            return
    yield "data: [DONE]\n\n"


# Defined last: Serve serializes the class with the module globals it sees at decoration.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, monitor: DeploymentHandle | None = None, api_key_file: str | None = None,
                 require_api_key: bool = False):
        self.llm = llm
        self.monitor = monitor
        app.state.api_key = load_api_key(api_key_file, require_api_key)
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

    @app.get("/v1/drift/reports")
    async def drift_reports(self, report_id: str | None = None,
                            kind: Literal["regime", "window", "online", "probe", "replica", "deployment",
                                          "regime_traffic", "window_traffic", "regime_comparable",
                                          "window_comparable"] | None = None,
                            metric: str | None = None,
                            verdict: Literal["drift", "no_drift", "insufficient_data", "traffic_change"] | None = None,
                            current_regime: str | None = None, baseline_regime: str | None = None,
                            deployment: str | None = None, replica: str | None = None,
                            since: datetime | None = None, latest: bool = False,
                            limit: int = Query(1000, ge=1, le=10_000)) -> dict:
        """Rows of drift_reports, newest first (read-only; every filter is a parameter)."""
        if self.monitor is None:
            raise ApiError(404, "drift monitoring is off: the service runs without a data directory",
                           kind="not_found_error")
        given = {"report_id": report_id, "kind": kind, "metric": metric, "verdict": verdict,
                 "current_regime": current_regime, "baseline_regime": baseline_regime,
                 "deployment": deployment, "replica": replica, "since": since.isoformat() if since else None}
        rows = await self.monitor.reports.remote({k: v for k, v in given.items() if v is not None}, latest, limit)
        return {"object": "list", "data": jsonable_encoder(rows)}

    @app.get("/v1/models")
    async def models(self) -> dict:
        info = await self._model()
        return {"object": "list", "data": [{"id": info["model_id"], "object": "model", "created": 0,
                                            "owned_by": "softwatch", "softwatch": {"model_rev": info["model_rev"]}}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        model = await self._check_model(body.model)
        prompts = body.prompts()
        if any(p == "" for p in prompts):
            raise ApiError(400, "prompt: must not be empty", "prompt")
        if len(prompts) * body.n > MAX_CHOICES:
            raise ApiError(400, f"{'prompt' if len(prompts) > MAX_CHOICES else 'n'}: {len(prompts)} prompts x n={body.n} "
                           f"is {len(prompts) * body.n} choices; at most {MAX_CHOICES} per request",
                           "prompt" if len(prompts) > MAX_CHOICES else "n")
        # logprobs: 0 asks for the sampled token's logprob alone (OpenAI), not for none
        params = _params(body, body.max_tokens, body.logprobs or 0, logprobs=body.logprobs is not None)
        specs = [{"prompt": p, "params": params} for p in prompts]
        return await self._respond(body, specs, model, chat=False)

    @app.post("/v1/chat/completions")
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
                    params["seed"] = _choice_seed(body.seed, i)
                calls.append({**spec, "params": params, "request_id": new_id("seq"), "stream": body.stream,
                              "stats": stats, "index": p * body.n + i, "fault": fault})
        rid = new_id("chatcmpl" if chat else "cmpl")
        choices = await self._admit(calls)
        if body.stream:
            fingerprint = (await self._model())["model_rev"]
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(_chunks(choices, rid, model, fingerprint, chat, body.n, usage)),
                                     media_type="text/event-stream")
        results = []
        async for index, event in choices.events():
            if _failed(event):
                choices.cancel()
                raise _failure(event)
            if event["type"] == "done":
                results.append({**event, "index": index})
        return _response(sorted(results, key=lambda r: r["index"]), rid, model, chat, body.n)

    async def _admit(self, calls: list[dict]) -> _Choices:
        """The request's choices once the replica admitted every one. All go to one replica in one
        call, so that a choice refused (a 4xx, or a 503 at capacity) is the status of the whole
        request before any choice decoded a token."""
        choices = _Choices(self._generate(calls), [call["index"] for call in calls])
        try:
            refused = await choices.admission()
        except BaseException:  # the client went away while the replica admitted: stop the choices
            choices.cancel()
            raise
        if refused is not None:
            choices.cancel()
            raise _failure(refused)
        return choices

    async def _generate(self, calls: list[dict]) -> AsyncIterator[dict]:
        """The LLM deployment's events for a request's choices: a call that raises (a replica that
        died, a full queue) ends with an error event, its exception kept for the logs. Cancelled,
        it cancels the call (the replica cancels the choices and records them "cancelled")."""
        response = None
        try:
            response = self.llm.options(stream=True).generate.remote({"choices": calls, "stream": calls[0]["stream"]})
            async for event in response:
                yield event
        except BackPressureError as exc:  # the LLM deployment's queue is full: shed the load
            yield {"type": "error", "index": None, "status": 503, "param": None,
                   "retry_after_s": exc.retry_after_s or RETRY_AFTER_S, "message": "the service is at capacity; retry later"}
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("softwatch: %s failed in the LLM deployment", calls[0]["request_id"], exc_info=True)
            yield {"type": "error", "index": None, "status": 500, "param": None,
                   "message": f"{type(exc).__name__}: {exc}"}


def _lost(index: int | None) -> dict:
    return {"type": "error", "status": 500, "param": None, "index": index,
            "message": "the replica ended the request without answering every choice"}
