"""The LLM deployment: each replica owns a model, one continuously batched decode loop on its
own thread, a ParquetSink and a telemetry provider.

Requests arrive as concurrent async calls, each with all its choices. Each choice is validated
and tokenized (chat template included) in a worker thread of the event loop, so that nothing a
request brings can stop the decode thread; then the request's choices are handed to the decode
thread together through an inbox (the engine takes all or none) and answered through an asyncio
queue that the thread feeds with `loop.call_soon_threadsafe`. New requests join the
running batch between steps, as the engine's token budget admits them.

Every request the engine took ends with exactly one record (written before its caller hears):
finished, cancelled (its client went away), "timeout" (past `request_timeout_s`) or "error" (a
failed step). A caller whose record could not be written gets an error, never a success. A replica
whose last `max_failed_steps` steps all failed reports itself unhealthy, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ray import serve

from ..completion import Completion, DecodingParams, InvalidRequest, TokenLogprobs
from ..detokenize import IncrementalText
from ..engine import Engine, StepFailed
from ..models import load_model
from ..recorder import Recorder
from ..records import RecordContext
from ..store import ParquetSink, journal_dir
from ..telemetry import Telemetry
from ..vllm import resolve_engine

if TYPE_CHECKING:
    from ..vllm.engine import VLLMEngine

log = logging.getLogger("softwatch.serve")

# What an operator may set through the deployment's user_config (a config push).
DEFAULT_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "template_version")
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_MAX_FAILED_STEPS = 3
TIMEOUT_RECORD_WAIT_S = 30.0  # a timed-out request's answer waits this long for its record


class LLMServer:
    def __init__(self, settings: dict):
        threads = settings.get("torch_threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.engine = _engine(settings)
        self.lm = self.engine.lm
        self.request_timeout_s = float(settings.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
        self.max_failed_steps = int(settings.get("max_failed_steps", DEFAULT_MAX_FAILED_STEPS))
        self.failed_steps = 0  # consecutive; a successful step resets it
        self.defaults = DecodingParams()
        replica = _replica_id()
        self.context = RecordContext(deployment=settings.get("deployment", "softwatch"), replica=replica,
                                     store_text=bool(settings.get("store_text", False)))
        data = settings.get("data")
        sink = ParquetSink(data, token_sample_rate=float(settings.get("token_sample_rate", 1.0)),
                           journal=journal_dir(data, settings.get("journal"))) if data else None
        self.recorder = Recorder(self.context, sink, Telemetry(settings.get("metrics", "none"), instance_id=replica,
                                                               data_root=data))
        self.fault = bool(settings.get("allow_fault_injection", False))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._params_sources: dict[str, str] = {}  # request id -> params_source (decode thread only)
        self._stopping = False
        self._thread = threading.Thread(target=self._decode_loop, name="softwatch-decode", daemon=True)
        self._thread.start()

    # ---- configuration --------------------------------------------------------------------
    def reconfigure(self, config: dict) -> None:
        """user_config: default decoding parameters; takes effect for the next request."""
        config = dict(config or {})
        unknown = set(config) - set(DEFAULT_KEYS)
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; allowed: {', '.join(DEFAULT_KEYS)}")
        defaults = dataclasses.replace(DecodingParams(), **config)
        defaults.validate()
        self.defaults = defaults
        log.info("softwatch: decoding defaults now %s (params_id %s)", config, defaults.params_id)

    async def info(self) -> dict:
        return {"model_id": self.lm.model_id, "model_rev": self.lm.model_rev, "context_length": self.lm.context_length,
                "defaults": {k: getattr(self.defaults, k) for k in DEFAULT_KEYS},
                "params_id": self.defaults.params_id, "replica": self.context.replica, "pid": os.getpid(),
                "running": self.engine.running, "waiting": self.engine.waiting, "failed_steps": self.failed_steps,
                "scores_probes": self._scores_probes}

    @property
    def _scores_probes(self) -> bool:
        """Whether this engine's model can be run teacher-forced (softwatch's engine; not vLLM's)."""
        return getattr(self.lm, "model", None) is not None

    async def score_probes(self) -> dict:
        """The built-in probes scored teacher-forced on this replica's model (`probes.score_twice`),
        run by the decode thread between two steps so that the model never runs in two threads
        at once: {"model_id", "model_rev", "scores"}. ValueError where the engine cannot."""
        if not self._scores_probes:
            raise ValueError("probes need a model softwatch runs itself (engine: softwatch)")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("probe", done))
        scores = await asyncio.wrap_future(done)
        return {"model_id": self.lm.model_id, "model_rev": self.lm.model_rev, "scores": scores}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the decode loop has stopped")
        if self.failed_steps >= self.max_failed_steps:
            raise RuntimeError(f"the engine failed its last {self.failed_steps} decode steps")

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, request: dict):
        """Events of one request's choices (`request["choices"]`, each a spec with its "index"):
        one {"type": "admitted"} once the engine took every choice, then, per choice,
        {"type": "token", ...} events while it runs (when streaming) and one {"type": "done", ...} or
        {"type": "error", ...}; every event but "admitted" names its choice's "index". A request
        refused has one error, and none of its choices was decoded: they are prepared first, then
        handed to the decode thread together."""
        if self._stopping:
            yield {"type": "error", "index": None, "status": 503, "param": None,
                   "message": "the replica is shutting down"}
            return
        try:
            prepared = [await self._prepare(spec) for spec in request["choices"]]
        except _Refused as refusal:
            yield refusal.event
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        put = _sender(loop, events)
        for choice in prepared:
            choice.put = functools.partial(_tagged, put, choice.index)
            if request.get("stream"):
                choice.on_token = functools.partial(_token_sender, put, choice.index)
        self._inbox.put(("submit", prepared, put))
        running = {choice.index: choice for choice in prepared}
        texts = {choice.index: _TextStream(self.lm.tokenizer, choice.params.stop) for choice in prepared}
        deadline = loop.time() + self.request_timeout_s
        try:
            while running:
                try:
                    index, kind, *event = await asyncio.wait_for(events.get(), timeout=max(deadline - loop.time(), 0))
                except TimeoutError:
                    for choice in running.values():
                        self._inbox.put(("cancel", choice.request_id, "timeout"))
                    async for answer in self._timed_out(running, events):
                        yield answer
                    running.clear()
                    return
                if kind == "admitted":
                    yield {"type": "admitted"}
                elif kind == "refused":  # no choice of the request decodes
                    running.clear()
                    yield {"type": "error", "index": index, "status": event[0], "param": event[1], "message": event[2]}
                elif kind == "token":
                    yield {"type": "token", "index": index, "text": texts[index].push(event[0]),
                           "logprobs": _logprobs(self.lm.tokenizer, event[1], event[0])}
                elif kind == "error":
                    running.pop(index)
                    yield {"type": "error", "index": index, "status": event[0], "param": event[1], "message": event[2]}
                else:
                    c = event[0]
                    spec = running.pop(index).spec
                    yield {"type": "done", "index": index, "rest": c.text[texts[index].sent_chars:],
                           **self._result(c, spec)}
        finally:
            for choice in running.values():  # the client went away: stop decoding for it
                self._inbox.put(("cancel", choice.request_id, "cancelled"))

    async def _prepare(self, spec: dict) -> _Choice:
        """One choice validated and tokenized (chat template included) in a worker thread, so that
        nothing a request brings can stop the event loop; raises _Refused (its error event)."""
        def refused(status: int, param: str | None, message: str) -> _Refused:
            return _Refused({"type": "error", "index": spec["index"], "status": status, "param": param,
                             "message": message})

        try:
            params = dataclasses.replace(self.defaults, **spec["params"])
            params.validate()
        except InvalidRequest as exc:
            raise refused(400, exc.field, str(exc)) from None
        except TypeError as exc:
            raise refused(400, None, str(exc)) from None
        if spec.get("fault") and not self.fault:
            raise refused(400, "softwatch.inject_fault",
                          "fault injection is off on this deployment (set allow_fault_injection)")
        prompt = spec.get("messages") or spec.get("prompt")
        try:
            ids = await asyncio.to_thread(self.engine.prepare, prompt, params, "messages" in spec, spec.get("fault"))
        except InvalidRequest as exc:
            raise refused(400, exc.field, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the replica's
            log.exception("softwatch: preparing %s failed", spec["request_id"])
            raise refused(500, None, f"preparing the request failed: {type(exc).__name__}: {exc}") from None
        return _Choice(spec, ids, params, prompt if isinstance(prompt, str) else repr(prompt),
                       params_source(params, self.defaults))

    async def _timed_out(self, running: dict[int, _Choice], events: asyncio.Queue):
        """The answers of choices past the request's timeout, once the decode thread has recorded
        each (finish_reason "timeout", or what it finished with in the meantime)."""
        loop = asyncio.get_running_loop()
        deadline, unconfirmed = loop.time() + TIMEOUT_RECORD_WAIT_S, set(running)
        while unconfirmed:
            try:
                index, kind, *event = await asyncio.wait_for(events.get(), timeout=max(deadline - loop.time(), 0))
            except TimeoutError:
                break
            if kind in ("done", "error") and index in unconfirmed:
                unconfirmed.discard(index)
                if kind == "error" and event[0] == 503:
                    yield _record_unconfirmed(index)
                else:
                    yield {"type": "error", "index": index, "status": 504, "param": None,
                           "message": f"the request did not finish within {self.request_timeout_s:g} s"}
        for index in unconfirmed:
            yield _record_unconfirmed(index)

    def _result(self, c: Completion, spec: dict) -> dict:
        tok = self.lm.tokenizer
        out = {"request_id": c.request_id, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
               "prompt_tokens": c.prompt_tokens, "regime": c.regime,
               "logprobs": [_logprobs(tok, lp, t) for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else None}
        if spec.get("stats"):
            out["stats"] = _finite({"tokens": c.token_records(tok), "summary": c.summary})
        return out

    # ---- the decode thread ----------------------------------------------------------------
    def _decode_loop(self) -> None:
        callers: dict[str, Callable] = {}  # request id -> put
        prompts: dict[str, str] = {}
        while True:
            try:
                command = self._inbox.get(block=not self.engine.has_work(), timeout=0.5)
            except queue.Empty:
                command = None
            if command is not None:
                self._command(command, callers, prompts)
                while True:  # take everything that arrived, so it all joins this step
                    try:
                        self._command(self._inbox.get_nowait(), callers, prompts)
                    except queue.Empty:
                        break
            if self._stopping and not self.engine.has_work():
                return
            if self.engine.has_work():
                self._step(callers, prompts)

    def _step(self, callers: dict, prompts: dict) -> None:
        try:
            finished = self.engine.step()
        except StepFailed as failure:
            self.failed_steps += 1
            log.error("softwatch: decode step failed (%d in a row); failing its %d requests",
                      self.failed_steps, len(failure.failed), exc_info=failure.cause)
            message = f"decoding failed on this replica ({type(failure.cause).__name__})"
            for c in failure.failed:
                self._finish(c, callers, prompts, error=(500, None, message))
            return
        self.failed_steps = 0
        for c in finished:
            self._finish(c, callers, prompts)

    def _command(self, command: tuple, callers: dict, prompts: dict) -> None:
        if command[0] == "probe":
            _score_probes(self.lm, command[1])
            return
        if command[0] == "cancel":
            _, rid, reason = command
            c = self.engine.cancel(rid, reason)
            if c is not None:  # else the engine ends it in a later step (vLLM), and answers then
                self._finish(c, callers, prompts)
            return
        _, choices, put = command
        self._submit(choices, put, callers, prompts)

    def _submit(self, choices: list[_Choice], put: Callable, callers: dict, prompts: dict) -> None:
        """Hand a request's choices to the engine together: every one is taken ("admitted"), or the
        first refusal answers the request and the choices already taken are cancelled (each
        recorded "cancelled", none answered) before any of them decoded a token."""
        for taken, choice in enumerate(choices):
            try:
                self.engine.submit(choice.ids, choice.params, request_id=choice.request_id, on_token=choice.on_token,
                                   fault=choice.fault)
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the loop's
                if isinstance(exc, InvalidRequest):
                    refusal = (400, exc.field, str(exc))
                else:
                    log.exception("softwatch: submitting %s failed", choice.request_id)
                    refusal = (500, None, f"the request could not be queued: {type(exc).__name__}")
                for sibling in choices[:taken]:
                    callers.pop(sibling.request_id)
                    self._command(("cancel", sibling.request_id, "cancelled"), callers, prompts)
                put((choice.index, "refused", *refusal))
                return
            callers[choice.request_id] = choice.put
            prompts[choice.request_id] = choice.prompt
            self._params_sources[choice.request_id] = choice.params_source
        put((None, "admitted"))

    def _finish(self, c: Completion, callers: dict, prompts: dict, error: tuple | None = None) -> None:
        """Record a request that left the engine, then answer its caller (if it still listens)."""
        source = self._params_sources.pop(c.request_id, None)
        if source is not None:
            c.regime = {**c.regime, "params_source": source}
        durable = self._record(c, prompts.pop(c.request_id, None))
        put = callers.pop(c.request_id, None)
        if put is None:
            return
        if error is not None:
            put(("error", *error))
        elif not durable:
            put(("error", 503, None, "the replica could not record this request; retry it"))
        else:
            put(("done", c))

    def _record(self, c: Completion, prompt: str | None) -> bool:
        """Whether the record is durable; a broken sink must not stop serving, only this answer."""
        try:
            self.recorder.record(c, prompt)
            return True
        except Exception:  # noqa: BLE001
            log.exception("softwatch: recording %s failed", c.request_id)
            return False

    # ---- shutdown -------------------------------------------------------------------------
    def __del__(self):
        self.shutdown()

    def shutdown(self, drain_s: float = 20.0) -> None:
        """Finish in-flight requests (up to `drain_s`), then flush records and metrics."""
        if self._stopping:
            return
        self._stopping = True
        self._inbox.put(("cancel", "", "cancelled"))  # wake the loop
        self._thread.join(timeout=drain_s)
        self.recorder.close()
        self.engine.close()


class _TextStream:
    """Text deltas of a streamed sequence, decoded incrementally (detokenize.IncrementalText).
    Holds back what could still become a stop string (the final text is cut before it)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.text = IncrementalText(tokenizer)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent_chars = 0
        self.unsent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        searched = max(len(self.unsent) - self.holdback, 0)  # a stop string not seen yet ends in the new text
        self.unsent += self.text.push(token)
        if any(s in self.unsent[searched:] for s in self.stop):
            self.stopped = True  # the sequence ends here; its final text comes with "done"
            return ""
        cut = max(len(self.unsent) - self.holdback, 0)
        delta, self.unsent = self.unsent[:cut], self.unsent[cut:]
        self.sent_chars += len(delta)
        return delta


@dataclasses.dataclass
class _Choice:
    """One choice of a request, prepared for the engine; `put` answers it, `on_token` streams it."""
    spec: dict
    ids: list[int]
    params: DecodingParams
    prompt: str  # what its record keeps (when the deployment stores text)
    params_source: str  # "deployment" | "request" (params_source)
    put: Callable[[tuple], None] | None = None
    on_token: Callable | None = None

    @property
    def index(self) -> int:
        return self.spec["index"]

    @property
    def request_id(self) -> str:
        return self.spec["request_id"]

    @property
    def fault(self) -> str | None:
        return self.spec.get("fault")


def _score_probes(lm, done: concurrent.futures.Future) -> None:
    from ..drift.probes import builtin_probes, score_twice

    try:
        done.set_result(score_twice(lm, builtin_probes()))
    except Exception as exc:  # noqa: BLE001 - the caller's failure, not the decode loop's
        done.set_exception(exc)


def params_source(params: DecodingParams, defaults: DecodingParams) -> str:
    """"deployment" when a request decodes in the deployment's regime (it set no decoding
    parameter, or set them to what the deployment's defaults give), else "request": a client's
    own temperature/top_p/top_k, whose regime must not displace the deployment's in the monitor."""
    return "deployment" if params.params_id == defaults.params_id else "request"


class _Refused(Exception):
    """A choice that cannot run; `event` is the request's error event."""

    def __init__(self, event: dict):
        super().__init__(event["message"])
        self.event = event


def _tagged(put: Callable[[tuple], None], index: int, event: tuple) -> None:
    put((index, *event))


def _token_sender(put: Callable[[tuple], None], index: int, token: int, logprobs: TokenLogprobs | None) -> None:
    put((index, "token", token, logprobs))


def _record_unconfirmed(index: int) -> dict:
    return {"type": "error", "index": index, "status": 503, "param": None,
            "message": "the request timed out and its record could not be confirmed; retry it"}


def _sender(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[tuple], None]:
    """put(event) for the decode thread: onto the caller's queue, through the caller's loop."""

    def put(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the caller's loop has closed: nobody is listening
            pass

    return put


def _engine(settings: dict) -> Engine | VLLMEngine:
    """The replica's engine: vLLM with the observer (`engine` "vllm", or "auto" where vLLM is
    installed) or softwatch's own."""
    model = settings.get("model", "SmolLM2-135M-Instruct")
    limits = {"max_batch": int(settings.get("max_batch", 32)),
              "max_prompt_tokens": _optional_int(settings.get("max_prompt_tokens")),
              "max_batch_tokens": _optional_int(settings.get("max_batch_tokens"))}
    if resolve_engine(settings.get("engine", "auto"), model) == "vllm":
        from ..vllm.engine import VLLMEngine

        dtype = settings.get("dtype", "auto")
        return VLLMEngine(model, observe=bool(settings.get("observe", True)), **limits,
                          **({} if dtype == "auto" else {"dtype": dtype}))
    if not settings.get("observe", True):
        raise ValueError("observe: false is for the vllm engine (a benchmark's baseline)")
    lm = load_model(model, device=settings.get("device", "auto"), dtype=settings.get("dtype", "auto"))
    return Engine(lm, **limits)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _finite(value):
    """JSON has no NaN: non-finite statistics (a dead row's) travel as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests, library use)
        return f"local-{os.getpid()}"


def _logprobs(tokenizer, entry: TokenLogprobs | None, token: int | None = None) -> dict | None:
    if entry is None:
        return None
    return {"token": token, "text": tokenizer.decode([token]), "logprob": entry.logprob,
            "top": [(t, tokenizer.decode([t]), v) for t, v in entry.top]}


