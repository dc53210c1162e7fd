"""OpenAI-compatible request models and response shapes, and softwatch's error shape.

Every numeric field is bounded (out of range is a 400 naming it), and a field softwatch does
not implement is refused unless it has its no-op value: a client that sets `tools` or
`logit_bias` must learn that they did not take effect, not get an answer without them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..completion import MAX_INT32, MAX_STOP_CHARS, MAX_STOPS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SEED_RANGE

MAX_N = 16
MAX_CHOICES = 64  # prompts x n of one request
MAX_BODY_BYTES = 1 << 20

# OpenAI fields softwatch does not implement, each with the values that leave a request unchanged.
NO_OP_VALUES: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "suffix": (None, ""),
    "echo": (None, False),
}


class SoftwatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stats: bool = False  # return the per-token statistics and the sequence summary
    # corrupt this request's logits (drills of the alerting path); refused unless the
    # deployment sets allow_fault_injection
    inject_fault: Literal["nonfinite", "overflow"] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _refuse_unless_no_op(value: Any, info: ValidationInfo) -> Any:
    if value not in NO_OP_VALUES[info.field_name]:
        raise ValueError("is not supported by softwatch (leave it out)")
    return value


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never ignored

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id (OpenAI: abuse monitoring); changes no output
    softwatch: SoftwatchOptions | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    _no_op = field_validator("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                             "response_format", "logit_bias", "presence_penalty", "frequency_penalty")(
        _refuse_unless_no_op)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("is only allowed when stream is true")
        return options

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Any = None
    suffix: Any = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    _completion_no_op = field_validator("echo", "suffix")(_refuse_unless_no_op)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of, info: ValidationInfo):
        if best_of not in (None, info.data.get("n", 1)):
            raise ValueError("is not supported by softwatch unless it equals n (every choice is returned)")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _prompt_is_unicode(cls, prompt):
        _refuse_surrogates([prompt] if isinstance(prompt, str) else prompt)
        return prompt

    def prompts(self) -> list:
        return [self.prompt] if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text_is_unicode(cls, text):
        _refuse_surrogates([text])
        return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _content_is_unicode(cls, content):
        _refuse_surrogates([content] if isinstance(content, str) else [])
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def _refuse_surrogates(texts: list) -> None:
    """Strings that are text: a lone UTF-16 surrogate (JSON allows "\\ud800") encodes to nothing a
    tokenizer takes, and must be the client's 400, not the replica's 500."""
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("holds a lone UTF-16 surrogate (not valid Unicode text)") from None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
