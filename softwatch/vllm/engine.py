"""softwatch's engine interface (`submit`, `step`, `cancel`, `has_work`) over vLLM's engine, so
that everything that drives softwatch's own engine — the serve replica's decode thread with its
records, streaming, cancellation and health — drives vLLM unchanged.

vLLM's engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `step()` is one
decode step and the observer, which vLLM builds in this process, hands each finished request's
`Completion` (tokens, statistics, regime) back through a `Handoff` instead of recording it: the
caller records it before it answers, as with softwatch's own engine. vLLM gives the text, the
streamed tokens and their logprobs; the observer gives the statistics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ..completion import Completion, DecodingParams, InvalidRequest, TokenLogprobs, prompt_key, summarize
from ..admission import PromptLimits
from ..engine import StepFailed
from ..stats import FIELDS
from . import engine_kwargs, use_v1_model_runner
from .handoff import Handoff
from .params import sampling_params
from .requests import REQUEST_ID_KEY, TEMPLATE_KEY, vllm_regime
from .served import ServedModel, served_model
from .settings import ObserverSettings

if TYPE_CHECKING:
    from vllm import SamplingParams

log = logging.getLogger("softwatch.vllm")

HANDOFF_GRACE_S = 2.0
"""How long after vLLM finished or aborted a request its completion may take to come from the
observer (it comes at the next step, or from the observer's watcher within 0.5 s). Past it the
request is completed without statistics: the observer never saw it (aborted while queued) or
has failed, and a request must end either way."""


@dataclass
class ServedLM:
    """What the serve replica reads of its model (softwatch's `LoadedModel` for its own engine)."""

    served: ServedModel
    vocab_size: int

    model_id = property(lambda self: self.served.model_id)
    model_rev = property(lambda self: self.served.model_rev)
    context_length = property(lambda self: self.served.max_model_len)

    @cached_property
    def tokenizer(self):
        return self.served.tokenizer

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset([eos])


@dataclass
class _Request:
    params: DecodingParams
    sampling: SamplingParams  # as vLLM decodes it (a temperature below 0.01 raised to 0.01)
    prompt_tokens: int
    prompt_key: str
    on_token: Callable[[int, TokenLogprobs | None], None] | None
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent: int = 0  # output tokens passed on so far
    logprobs: list[TokenLogprobs] | None = None
    text: str | None = None  # vLLM's final text (stop strings cut)
    finish_reason: str | None = None  # vLLM's, once it finished
    finished_at: float | None = None  # monotonic
    token_ids: list[int] = field(default_factory=list)  # as streamed
    cancelled_at: float | None = None
    cancel_reason: str = "cancelled"


class VLLMEngine:
    """Continuous batching by vLLM, observed. Not thread-safe: one caller drives `step()` (and
    `submit`, `cancel`); `prepare` touches no engine state and may run on any thread."""

    def __init__(self, model: str = "SmolLM2-135M-Instruct", max_batch: int = 32, observe: bool = True,
                 max_prompt_tokens: int | None = None, max_batch_tokens: int | None = None, **vllm_overrides):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        use_v1_model_runner()
        import vllm

        self.max_batch = max_batch
        self.observe = observe
        self.handoff = Handoff() if observe else None
        settings = ObserverSettings(handoff=self.handoff.key, metrics="none") if observe else ObserverSettings()
        kwargs = engine_kwargs(model, settings, max_num_seqs=max_batch, **vllm_overrides)
        named = ObserverSettings.from_additional_config(kwargs["additional_config"])  # with the model's name
        if not observe:
            del kwargs["logits_processors"], kwargs["additional_config"]
        self._engine = vllm.LLM(**kwargs).llm_engine
        config = self._engine.vllm_config
        self.lm = ServedLM(served_model(config, named), int(config.model_config.get_vocab_size()))
        self.limits = PromptLimits.of(self.lm, max_batch, max_prompt_tokens, max_batch_tokens)
        self._requests: dict[str, _Request] = {}

    # ---- requests -------------------------------------------------------------------------
    def prepare(self, prompt: str | list[dict] | list[int], params: DecodingParams = DecodingParams(),
                chat: bool = False, fault: str | None = None) -> list[int]:
        """Validate a request and return its prompt's token ids; InvalidRequest names the field."""
        if fault is not None:
            raise InvalidRequest("softwatch.inject_fault", "fault injection is not available on the vLLM engine")
        return self.limits.prepare(prompt, params, chat)

    def submit(self, prompt: str | list[dict] | list[int], params: DecodingParams = DecodingParams(),
               chat: bool = False, request_id: str | None = None,
               on_token: Callable[[int, TokenLogprobs | None], None] | None = None, fault: str | None = None) -> str:
        """Queue a request; it joins vLLM's batch at the next step. Returns its id."""
        ids = self.prepare(prompt, params, chat, fault)
        request_id = request_id or f"vllm-req-{len(self._requests)}-{time.monotonic_ns()}"
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        wants_logprobs = params.logprobs or params.top_logprobs > 0
        sampling = sampling_params(params, logprobs=params.top_logprobs if wants_logprobs else None,
                                   extra_args={REQUEST_ID_KEY: request_id, TEMPLATE_KEY: params.template_version})
        self._engine.add_request(request_id, {"prompt_token_ids": ids}, sampling)
        self._requests[request_id] = _Request(params, sampling, len(ids), prompt_key(ids), on_token,
                                              logprobs=[] if wants_logprobs else None)
        return request_id

    def cancel(self, request_id: str, reason: str = "cancelled") -> Completion | None:
        """Abort a request (its client went away, or it timed out). Its completion, with what it
        generated so far and finish_reason `reason`, comes out of a later `step()`."""
        request = self._requests.get(request_id)
        if request is not None and request.cancelled_at is None:
            request.cancelled_at, request.cancel_reason = time.monotonic(), reason
            self._engine.abort_request([request_id])
        return None

    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def running(self) -> int:
        """Requests vLLM holds or whose completion is still to come."""
        return len(self._requests)

    @property
    def waiting(self) -> int:
        return 0  # vLLM queues them itself; they count as running here

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[Completion]:
        """One vLLM step; streams the tokens it emitted. Returns the requests whose completion
        the observer handed over (a request finishes in one step and is handed over in the next,
        when vLLM clears it from its batch)."""
        busy = self._engine.has_unfinished_requests()
        try:
            for output in self._engine.step():
                self._emit(output)
        except Exception as exc:  # noqa: BLE001 - the step failed: so did every request it held
            failed = [self._bare(rid, self._requests.pop(rid), "error") for rid in list(self._requests)]
            self._abort([c.request_id for c in failed])
            raise StepFailed(failed, exc) from exc
        if not self.observe:
            return self._overdue(grace_s=0.0)
        done = [self._complete(c, self._requests.pop(c.request_id)) for c in self.handoff.take()
                if c.request_id in self._requests]
        done += self._overdue(HANDOFF_GRACE_S)
        if not done and not busy:
            time.sleep(0.01)  # waiting for the observer's watcher to release an aborted request
        return done

    def _abort(self, request_ids: list[str]) -> None:
        """Abort requests in vLLM after a failed step: until then vLLM holds them (their KV cache,
        their place in the batch) and would run them again at the next step."""
        try:
            self._engine.abort_request(request_ids)
        except Exception:  # noqa: BLE001 - the StepFailed being raised says what failed
            log.exception("softwatch: aborting %d requests in vLLM after a failed step failed too", len(request_ids))

    def _emit(self, output) -> None:
        request = self._requests.get(output.request_id)
        if request is None:
            return
        choice = output.outputs[0]
        now = time.perf_counter()
        for i in range(request.sent, len(choice.token_ids)):
            token = choice.token_ids[i]
            entry = (_token_logprobs(choice.logprobs[i], token, request.params.top_logprobs)
                     if request.logprobs is not None else None)
            if entry is not None:
                request.logprobs.append(entry)
            request.first_token_at = request.first_token_at or now
            request.last_token_at = now
            request.token_ids.append(token)
            if request.on_token is not None:
                request.on_token(token, entry)
        request.sent = len(choice.token_ids)
        if output.finished:
            request.text, request.finished_at = choice.text, time.monotonic()
            request.finish_reason = {"abort": "cancelled"}.get(choice.finish_reason, choice.finish_reason)

    def _complete(self, c: Completion, request: _Request) -> Completion:
        """The observer's completion with what only this side knows: text, logprobs, timings."""
        if request.cancelled_at is not None and c.finish_reason == "cancelled":
            c.finish_reason = c.summary["finish_reason"] = request.cancel_reason
        c.text = request.text if request.text is not None else self.lm.tokenizer.decode(c.token_ids,
                                                                                           skip_special_tokens=True)
        c.logprobs = request.logprobs[: len(c.token_ids)] if request.logprobs is not None else None
        c.created = request.created
        c.prompt_tokens, c.prompt_key = request.prompt_tokens, request.prompt_key
        c.ttft_s = (request.first_token_at or time.perf_counter()) - request.started
        c.latency_s = (request.last_token_at or time.perf_counter()) - request.started
        c.summary.update(prompt_tokens=c.prompt_tokens, ttft_s=c.ttft_s, latency_s=c.latency_s)
        return c

    def _overdue(self, grace_s: float) -> list[Completion]:
        """Requests vLLM finished or aborted more than `grace_s` ago with no completion from the
        observer: completed here, their statistics unknown (or none, without the observer)."""
        now = time.monotonic()
        overdue = [rid for rid, r in self._requests.items()
                   if (ended := r.finished_at or r.cancelled_at) is not None and now - ended >= grace_s]
        return [self._bare(rid, r, r.finish_reason or r.cancel_reason, stats=self.observe)
                for rid, r in ((rid, self._requests.pop(rid)) for rid in overdue)]

    def _bare(self, rid: str, request: _Request, finish_reason: str, stats: bool = True) -> Completion:
        """A completion the observer did not give: the tokens this side saw, their statistics
        unknown (NaN rows, as the observer leaves a position it never observed), or none at all
        without the observer."""
        regime = vllm_regime(request.sampling, self.lm.model_id, self.lm.model_rev, request.params.template_version)
        rows = torch.full((len(request.token_ids), len(FIELDS)), float("nan")) if stats else None
        c = Completion(request_id=rid, text="", token_ids=list(request.token_ids), prompt_tokens=0,
                       finish_reason=finish_reason, stats=rows, summary={**summarize(rows), "finish_reason": finish_reason,
                                                                    "generated_tokens": len(request.token_ids)},
                       regime=regime, created=0.0, ttft_s=0.0, latency_s=0.0)
        return self._complete(c, request)

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()


def _token_logprobs(entries: dict, token: int, top_n: int) -> TokenLogprobs:
    """vLLM's {token id: Logprob} of one position (the `top_n` most likely and the emitted token)
    as softwatch's TokenLogprobs: the emitted token's log q, and the most likely, first first."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entries.items() if lp.rank is not None and lp.rank <= top_n)
    return TokenLogprobs(logprob=entries[token].logprob, top=[(t, v) for _, t, v in ranked])
