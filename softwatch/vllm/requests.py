"""A request the observer follows through vLLM's batch, and the `Completion` it becomes."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict

import torch

from ..completion import Completion, DecodingParams, summarize
from ..stats import FIELDS
from .served import ServedModel
from .settings import ObserverSettings

REQUEST_ID_KEY = "softwatch_request_id"  # in SamplingParams.extra_args (`vllm_xargs` over HTTP)
TEMPLATE_KEY = "softwatch_template_version"
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it decodes greedily


class TrackedRequest:
    def __init__(self, request_id: str, params, prompt: list[int] | None, output: list[int], model: ServedModel):
        self.request_id = request_id
        self.params = params
        self.prompt = prompt
        self.output = output  # vLLM's live list of this request's output token ids
        self.model = model
        self.created, self.started = time.time(), time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.stats: list[torch.Tensor] = []  # one [F] row per observed token, on the device
        self.penalized = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                          or params.presence_penalty != 0.0)

    @property
    def temperature(self) -> float:
        return self.params.temperature if self.params.temperature >= GREEDY_BELOW else 0.0

    def observe(self, row: torch.Tensor, at: float) -> None:
        self.stats.append(row)
        self.first_at = self.first_at or at
        self.last_at = at

    def completion(self, settings: ObserverSettings) -> tuple[Completion, str | None]:
        """The finished request, and its prompt text when text is stored."""
        n = len(self.stats)
        tokens = list(self.output[:n])
        stats = torch.stack(self.stats).float().cpu() if n else torch.empty(0, len(FIELDS))
        reason, n = self._finish_reason(tokens)
        tokens, stats = tokens[:n], stats[:n]
        now = time.perf_counter()
        ttft = (self.first_at or now) - self.started
        latency = (self.last_at or now) - self.started
        summary = summarize(stats)
        summary.update(prompt_tokens=len(self.prompt or ()), generated_tokens=n, finish_reason=reason,
                       ttft_s=ttft, latency_s=latency)
        extra = self.params.extra_args or {}
        decoding = DecodingParams(temperature=self.temperature, top_p=self.params.top_p,
                                  top_k=max(self.params.top_k, 0),
                                  template_version=str(extra.get(TEMPLATE_KEY, settings.template_version)))
        regime = {"model_id": self.model.model_id, "model_rev": self.model.model_rev,
                  "params_id": decoding.params_id, **decoding.regime_params()}
        text = prompt = None
        if settings.store_text:
            text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
            prompt = self.model.tokenizer.decode(self.prompt or [], skip_special_tokens=False)
        completion = Completion(request_id=self.request_id, text=text or "", token_ids=tokens,
                                prompt_tokens=len(self.prompt or ()), finish_reason=reason, stats=stats,
                                summary=summary, regime=regime, created=self.created, ttft_s=ttft, latency_s=latency)
        return completion, prompt

    def _finish_reason(self, tokens: list[int]) -> tuple[str, int]:
        """Why the request left the batch, and how many of its tokens its answer holds. vLLM ends
        a request on a stop token or its length in the engine, on a stop string in the API
        process (which then aborts it, maybe a step later), and on an abort."""
        params, n = self.params, len(tokens)
        if n and tokens[-1] in params.all_stop_token_ids:
            return "stop", n
        if params.stop and n:
            cut = _stop_string_end(self.model.tokenizer, tokens, params.stop)
            if cut is not None:
                return "stop", cut
        max_tokens = params.max_tokens if params.max_tokens is not None else self.model.max_model_len
        if n >= max_tokens or len(self.prompt or ()) + n >= self.model.max_model_len:
            return "length", n
        return "cancelled", n


def _stop_string_end(tokenizer, tokens: list[int], stop: str | list[str]) -> int | None:
    """The fewest leading tokens whose text holds a stop string, or None."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stops):
        return None
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if any(s in text for s in stops):
            return end
    return None


class RequestIds:
    """Record ids: the client's tag from extra_args, else a new one; the children of an `n > 1`
    request share their parent's params and get `-1`, `-2`, ... after the first."""

    def __init__(self, remembered: int = 65536):
        self._uses: OrderedDict[str, int] = OrderedDict()
        self._remembered = remembered

    def next(self, params) -> str:
        tag = (params.extra_args or {}).get(REQUEST_ID_KEY)
        if not isinstance(tag, str) or not tag:
            return f"vllm-{uuid.uuid4().hex[:16]}"
        uses = self._uses.pop(tag, 0)
        self._uses[tag] = uses + 1
        if len(self._uses) > self._remembered:
            self._uses.popitem(last=False)
        return tag if uses == 0 else f"{tag}-{uses}"
