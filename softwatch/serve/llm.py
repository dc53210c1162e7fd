"""The LLM deployment: each replica owns a model, one continuously batched decode loop on its
own thread, a ParquetSink and a telemetry provider.

Requests arrive as concurrent async calls. Each is validated and tokenized (chat template
included) in a worker thread of the event loop, so that nothing a request brings can stop the
decode thread; then it is handed to the decode thread through an inbox and answered through an
asyncio queue that the thread feeds with `loop.call_soon_threadsafe`. New requests join the
running batch between steps, as the engine's token budget admits them.

Every request the engine took ends with exactly one record (written before its caller hears):
finished, cancelled (its client went away), "timeout" (past `request_timeout_s`) or "error" (a
failed step). A caller whose record could not be written gets an error, never a success. A replica
whose last `max_failed_steps` steps all failed reports itself unhealthy, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from ..store import ParquetSink
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
        sink = ParquetSink(data, token_sample_rate=float(settings.get("token_sample_rate", 1.0))) if data else None
        self.recorder = Recorder(self.context, sink, Telemetry(settings.get("metrics", "none"), instance_id=replica,
                                                               data_root=data))
        self.fault = bool(settings.get("allow_fault_injection", False))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
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
                "running": self.engine.running, "waiting": self.engine.waiting, "failed_steps": self.failed_steps}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the decode loop has stopped")
        if self.failed_steps >= self.max_failed_steps:
            raise RuntimeError(f"the engine failed its last {self.failed_steps} decode steps")

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, spec: dict):
        """Events of one sequence: {"type": "admitted"} once the engine took it, {"type": "token", ...}
        while it runs (when streaming), then {"type": "done", ...} or {"type": "error", ...}; a
        sequence refused before the engine took it has only the error."""
        if self._stopping:
            yield {"type": "error", "status": 503, "param": None, "message": "the replica is shutting down"}
            return
        try:
            params = dataclasses.replace(self.defaults, **spec["params"])
            params.validate()
        except InvalidRequest as exc:
            yield {"type": "error", "status": 400, "param": exc.field, "message": str(exc)}
            return
        except TypeError as exc:
            yield {"type": "error", "status": 400, "param": None, "message": str(exc)}
            return
        if spec.get("fault") and not self.fault:
            yield {"type": "error", "status": 400, "param": "softwatch.inject_fault",
                   "message": "fault injection is off on this deployment (set allow_fault_injection)"}
            return
        prompt = spec.get("messages") or spec.get("prompt")
        try:
            ids = await asyncio.to_thread(self.engine.prepare, prompt, params, "messages" in spec, spec.get("fault"))
        except InvalidRequest as exc:
            yield {"type": "error", "status": 400, "param": exc.field, "message": str(exc)}
            return
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the replica's
            log.exception("softwatch: preparing %s failed", spec["request_id"])
            yield {"type": "error", "status": 500, "param": None,
                   "message": f"preparing the request failed: {type(exc).__name__}: {exc}"}
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        put = _sender(loop, events)
        on_token = (lambda token, lp: put(("token", token, lp))) if spec.get("stream") else None
        rid = spec["request_id"]
        text_of_prompt = prompt if isinstance(prompt, str) else repr(prompt)
        self._inbox.put(("submit", rid, ids, params, on_token, put, text_of_prompt, spec.get("fault")))
        finished = False
        text = _TextStream(self.lm.tokenizer, params.stop)
        deadline = loop.time() + self.request_timeout_s
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=max(deadline - loop.time(), 0))
                except TimeoutError:
                    finished = True
                    self._inbox.put(("cancel", rid, "timeout"))
                    yield await self._timed_out(events)
                    return
                if event[0] == "admitted":
                    yield {"type": "admitted"}
                elif event[0] == "token":
                    yield {"type": "token", "text": text.push(event[1]),
                           "logprobs": _logprobs(self.lm.tokenizer, event[2], event[1])}
                elif event[0] == "error":
                    finished = True
                    yield {"type": "error", "status": event[1], "param": event[2], "message": event[3]}
                    return
                else:
                    finished = True
                    yield {"type": "done", "rest": event[1].text[text.sent_chars:], **self._result(event[1], spec)}
                    return
        finally:
            if not finished:  # the client went away: stop decoding for it
                self._inbox.put(("cancel", rid, "cancelled"))

    async def _timed_out(self, events: asyncio.Queue) -> dict:
        """The answer to a request past its timeout, once the decode thread has recorded it
        (finish_reason "timeout", or what it finished with in the meantime)."""
        try:
            event = await asyncio.wait_for(events.get(), timeout=TIMEOUT_RECORD_WAIT_S)
        except TimeoutError:
            event = ("error", 503, None, "")
        if event[0] == "error" and event[1] == 503:
            return {"type": "error", "status": 503, "param": None,
                    "message": "the request timed out and its record could not be confirmed; retry it"}
        return {"type": "error", "status": 504, "param": None,
                "message": f"the request did not finish within {self.request_timeout_s:g} s"}

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
        if command[0] == "cancel":
            _, rid, reason = command
            c = self.engine.cancel(rid, reason)
            if c is not None:  # else the engine ends it in a later step (vLLM), and answers then
                self._finish(c, callers, prompts)
            return
        _, rid, ids, params, on_token, put, prompt, fault = command
        try:
            self.engine.submit(ids, params, request_id=rid, on_token=on_token, fault=fault)
        except InvalidRequest as exc:
            put(("error", 400, exc.field, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the loop's
            log.exception("softwatch: submitting %s failed", rid)
            put(("error", 500, None, f"the request could not be queued: {type(exc).__name__}"))
            return
        callers[rid] = put
        prompts[rid] = prompt
        put(("admitted",))

    def _finish(self, c: Completion, callers: dict, prompts: dict, error: tuple | None = None) -> None:
        """Record a request that left the engine, then answer its caller (if it still listens)."""
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


