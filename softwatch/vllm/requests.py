"""A request the observer follows through vLLM's batch, and the `Completion` it becomes."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict

import torch

from ..completion import Completion, DecodingParams, params_id, prompt_key, summarize
from ..stats import FIELDS
from .served import ServedModel
from .settings import ObserverSettings

REQUEST_ID_KEY = "softwatch_request_id"  # in SamplingParams.extra_args (`vllm_xargs` over HTTP)
TEMPLATE_KEY = "softwatch_template_version"
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it decodes greedily
# vLLM options that shape the sampled distribution beyond DecodingParams, with their neutral values:
# part of params_id when set, so that requests using them form regimes of their own
VLLM_REGIME_OPTIONS = {"min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


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
        self.positions: list[int] = []  # output positions observed, and their [F] rows on the device
        self.stats: list[torch.Tensor] = []
        self.penalized = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                          or params.presence_penalty != 0.0)

    @property
    def temperature(self) -> float:
        return decoded_temperature(self.params)

    @property
    def argmax_decoded(self) -> bool:
        """vLLM takes the argmax of the logits the observer sees: greedy, nothing applied after it."""
        return self.temperature == 0.0 and not self.penalized

    def observe(self, position: int, row: torch.Tensor, at: float) -> None:
        self.positions.append(position)
        self.stats.append(row)
        self.first_at = self.first_at or at
        self.last_at = at

    def done(self) -> bool:
        """Whether its tokens show that it finished: a stop token, its length, a stop string."""
        return self._finish_reason(list(self.output))[0] != "cancelled"

    def completion(self, settings: ObserverSettings) -> tuple[Completion, str | None]:
        """The request as recorded, and its prompt text when text is stored."""
        tokens = list(self.output)
        reason, n = self._finish_reason(tokens)
        tokens = tokens[:n]
        stats = torch.full((n, len(FIELDS)), float("nan"))  # a position never observed stays NaN
        if self.stats:
            rows = torch.stack(self.stats).float().cpu()
            kept = [i for i, p in enumerate(self.positions) if p < n]
            stats[[self.positions[i] for i in kept]] = rows[kept]
        now = time.perf_counter()
        ttft = (self.first_at or now) - self.started
        latency = (self.last_at or now) - self.started
        summary = summarize(stats)
        summary.update(prompt_tokens=len(self.prompt or ()), generated_tokens=n, finish_reason=reason,
                       ttft_s=ttft, latency_s=latency)
        completion = Completion(request_id=self.request_id, text="", token_ids=tokens,
                                prompt_tokens=len(self.prompt or ()), finish_reason=reason, stats=stats,
                                summary=summary, regime=self.regime(settings), created=self.created, ttft_s=ttft,
                                latency_s=latency, prompt_key=None if self.prompt is None else prompt_key(self.prompt))
        prompt = None
        if settings.store_text:
            completion.text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
            prompt = self.model.tokenizer.decode(self.prompt or [], skip_special_tokens=False)
        return completion, prompt

    def regime(self, settings: ObserverSettings) -> dict:
        return vllm_regime(self.params, self.model.model_id, self.model.model_rev, settings.template_version)

    def _finish_reason(self, tokens: list[int]) -> tuple[str, int]:
        """Why the request is done, and how many of its tokens its answer holds. vLLM ends a
        request on a stop token or its length in the engine, on a stop string in the API process
        (which then aborts it, maybe a step later: the tokens after the stop string are cut), and
        on an abort ("cancelled")."""
        params, n = self.params, len(tokens)
        if params.stop and n:
            cut = _stop_string_end(self.model.tokenizer, tokens, params.stop, params.skip_special_tokens,
                                   params.min_tokens or 0)
            if cut is not None:
                return "stop", cut
        stop_tokens = set(params.stop_token_ids or ())
        if params.eos_token_id is not None:  # None under ignore_eos
            stop_tokens.add(params.eos_token_id)
        if n and tokens[-1] in stop_tokens and n >= (params.min_tokens or 0):
            return "stop", n
        max_tokens = params.max_tokens if params.max_tokens is not None else self.model.max_model_len
        if n >= max_tokens or len(self.prompt or ()) + n >= self.model.max_model_len:
            return "length", n
        return "cancelled", n


def decoded_temperature(params) -> float:
    """The temperature vLLM samples a request's tokens at: 0 (greedy) below GREEDY_BELOW. It
    reads `params` (vLLM's SamplingParams) after they raised a temperature in (0, 0.01) to 0.01."""
    return params.temperature if params.temperature >= GREEDY_BELOW else 0.0


def vllm_regime(params, model_id: str, model_rev: str, template_version: str) -> dict:
    """The regime of a request vLLM decodes with `params` (its SamplingParams): the decoding vLLM
    does, so that requests decoded alike share it (the temperatures below 0.01 that vLLM raises
    to 0.01 are 0.01 here), and the template version its tag names, else `template_version`."""
    extra = params.extra_args or {}
    decoding = DecodingParams(temperature=decoded_temperature(params), top_p=params.top_p, top_k=max(params.top_k, 0),
                              template_version=str(extra.get(TEMPLATE_KEY, template_version)))
    named = decoding.regime_params()
    options = {k: getattr(params, k) for k, neutral in VLLM_REGIME_OPTIONS.items() if getattr(params, k) != neutral}
    return {"model_id": model_id, "model_rev": model_rev, "params_id": params_id({**named, **options}), **named}


def _stop_string_end(tokenizer, tokens: list[int], stop: str | list[str], skip_special: bool,
                     min_tokens: int) -> int | None:
    """The fewest leading tokens whose text holds a stop string ending after the first
    `min_tokens` tokens' text (vLLM looks no earlier), or None. A longer prefix's text holds
    every stop string a shorter one does, so the cut is found by bisection."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    start = len(tokenizer.decode(tokens[:min_tokens], skip_special_tokens=skip_special)) if min_tokens else 0

    def holds(end: int) -> bool:
        text = tokenizer.decode(tokens[:end], skip_special_tokens=skip_special)
        return any(s in text[max(0, start - len(s) + 1):] for s in stops)

    if not holds(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid + 1
    return low


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
