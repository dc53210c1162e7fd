"""Streaming in the OpenAI-compatible layer: the replica's incremental text deltas, and how a
multi-choice stream starts (every choice admitted first) and ends (an error event, no [DONE])."""

import asyncio
import json
import time

import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from softwatch.serve.llm import _TextStream
from softwatch.serve.protocol import MAX_BODY_BYTES
from softwatch.store import Store

from .conftest import API_KEY

# the ASGI wrapper's __del__ is a coroutine; a bare Ingress (below) never ran its __init__
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")

MULTIBYTE = ("Hello 世界! 🎉🎉 naïve café — 日本語のテキスト 👍🏽 family: 👨‍👩‍👧 flag: 🇯🇵 "
             "Ελληνικά, русский, עברית, हिन्दी. The end.")


class CountingTokenizer:
    """A tokenizer whose decode calls are counted by how many ids each one decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, _TextStream]:
    text = _TextStream(tokenizer, stop)
    return "".join(text.push(token) for token in ids), text


def test_streamed_multibyte_text_equals_the_full_decode(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids)  # characters split across tokens
    streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE


def test_a_special_token_inside_the_output_streams_as_the_full_decode_does(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode("before 🎉", add_special_tokens=False) + [tokenizer.eos_token_id] + \
        tokenizer.encode(" after 世界", add_special_tokens=False)
    streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == "before 🎉 after 世界"


@pytest.mark.parametrize("stop", ["日本語", "🎉", "The end", "Hello", "."])
def test_a_stop_string_is_never_streamed_and_the_rest_completes_the_text(smollm2, stop):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    final = MULTIBYTE[:MULTIBYTE.index(stop)]  # the engine's text: cut before the stop string
    streamed, text = stream(tokenizer, ids, (stop, "never there"))
    assert stop not in streamed and final.startswith(streamed)
    assert streamed + final[text.sent_chars:] == final  # what "done" adds


def test_per_token_decoding_work_does_not_grow_with_the_output(smollm2):
    tokenizer = CountingTokenizer(smollm2.tokenizer)
    ids = smollm2.tokenizer.encode(MULTIBYTE * 40, add_special_tokens=False)
    assert len(ids) > 2000
    streamed, _ = stream(tokenizer, ids, ("never there",))
    assert streamed + MULTIBYTE[-len("never there") + 1:] == MULTIBYTE * 40
    assert max(tokenizer.decoded_lengths) <= 8  # a window of recent ids, not the whole output
    assert sum(tokenizer.decoded_lengths) <= 8 * len(ids)


# ---- the ingress, with the LLM deployment's handle scripted (no Ray) ----------------------------

ADMITTED = {"type": "admitted"}
LONG_WAIT = 30.0  # a choice still running when its request is answered


def token(text: str) -> dict:
    return {"type": "token", "text": text, "logprobs": None}


def done(rid: str, rest: str = "", finish_reason: str = "length") -> dict:
    return {"type": "done", "rest": rest, "request_id": rid, "text": rest, "token_ids": [1, 2], "finish_reason":
            finish_reason, "prompt_tokens": 3, "regime": {"model_rev": "rev"}, "logprobs": None}


def refused(status: int, param: str | None = None) -> dict:
    return {"type": "error", "status": status, "param": param, "message": f"refused with {status}"}


class ScriptedLLM:
    """The LLM deployment's handle: choice i's call plays scripts[i] (events; a number waits that
    many seconds; an exception is raised). Records which calls were cancelled: like Serve's, a call
    cancelled before its first event may have reached its replica and run on regardless."""

    def __init__(self, scripts: dict[int, list]):
        self.scripts = scripts
        self.cancelled: list[int] = []
        self.cancelled_unheard: list[int] = []

    def options(self, stream: bool):
        return self

    @property
    def generate(self):
        return self

    def remote(self, call: dict):
        return ScriptedCall(self, call["index"])


class ScriptedCall:
    def __init__(self, llm: ScriptedLLM, index: int):
        self.llm, self.index = llm, index
        self.heard = False

    async def __aiter__(self):
        for step in self.llm.scripts[self.index]:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                self.heard = True
                yield step

    def cancel(self) -> None:
        (self.llm.cancelled if self.heard else self.llm.cancelled_unheard).append(self.index)


def ingress(llm: ScriptedLLM):
    """The Ingress class outside Serve (its ASGI wrapper's async __init__ left out)."""
    from softwatch.serve.ingress import Ingress

    bare = object.__new__(Ingress.func_or_class)
    bare.llm, bare.monitor, bare._info = llm, None, {"model_id": "m", "model_rev": "rev"}
    return bare


def completions(llm: ScriptedLLM, prompts: list[str], **fields):
    from softwatch.serve.protocol import CompletionRequest

    return ingress(llm).completions(CompletionRequest(prompt=prompts, max_tokens=4, **fields))


async def body_of(response) -> list[str]:
    return [part async for part in response.body_iterator]


async def settle() -> None:
    """Lets cancelled tasks run their cancellation."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("refusal, status", [(refused(400, "max_tokens"), 400), (refused(503), 503),
                                             (BackPressureError(512, 512, retry_after_s=2.0), 503)])
@pytest.mark.parametrize("stream", [True, False])
def test_a_choice_refused_after_its_siblings_started_is_the_status_of_the_whole_request(refusal, status, stream):
    from softwatch.serve.ingress import ApiError

    llm = ScriptedLLM({0: [ADMITTED, token("a"), token("b"), LONG_WAIT], 1: [ADMITTED, LONG_WAIT],
                       2: [0.05, refusal]})  # refused after choice 0 streamed its first tokens

    async def answer():
        with pytest.raises(ApiError) as refusal_raised:
            await asyncio.wait_for(completions(llm, ["p0", "p1", "p2"], stream=stream), 5)
        await settle()
        return refusal_raised.value

    error = asyncio.run(answer())
    assert error.status == status
    assert sorted(llm.cancelled) == [0, 1]  # the admitted siblings stop (their records: cancelled)


def test_a_refusal_before_a_siblings_admission_waits_to_cancel_it_where_it_runs():
    from softwatch.serve.ingress import ApiError

    llm = ScriptedLLM({0: [0.05, ADMITTED, LONG_WAIT], 1: [refused(400, "max_tokens")]})

    async def answer():
        with pytest.raises(ApiError) as refusal_raised:
            await asyncio.wait_for(completions(llm, ["p0", "p1"], stream=True), 5)
        await settle()
        return refusal_raised.value

    assert asyncio.run(answer()).status == 400
    assert llm.cancelled == [0] and llm.cancelled_unheard == []


def test_tokens_that_come_while_siblings_are_admitted_are_all_streamed():
    llm = ScriptedLLM({0: [ADMITTED, token("a"), token("b"), done("r0", "c")],
                       1: [0.05, ADMITTED, token("x"), done("r1", "y")]})

    async def stream():
        return await body_of(await completions(llm, ["p0", "p1"], stream=True))

    events = asyncio.run(stream())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "abc", 1: "xy"} and llm.cancelled == []


def test_an_answer_names_its_choices_records_in_choice_order_whatever_order_they_finished_in():
    llm = ScriptedLLM({0: [ADMITTED, 0.1, done("r0", "a")], 1: [ADMITTED, 0.05, done("r1", "b")],
                       2: [ADMITTED, done("r2", "c")]})
    answer = asyncio.run(completions(llm, ["p"], n=3))
    assert [c["text"] for c in answer["choices"]] == ["a", "b", "c"]
    assert answer["softwatch"]["request_ids"] == ["r0", "r1", "r2"]


@pytest.mark.parametrize("failure", [refused(500), done("r0", finish_reason="error"), RuntimeError("replica died")])
def test_a_failure_after_the_stream_started_ends_it_with_an_error_event_and_no_done(failure):
    llm = ScriptedLLM({0: [ADMITTED, token("a"), 0.05, failure], 1: [ADMITTED, token("x"), LONG_WAIT]})

    async def stream():
        response = await completions(llm, ["p0", "p1"], stream=True)
        assert response.status_code == 200
        events = await asyncio.wait_for(body_of(response), 5)
        await settle()
        return events

    events = asyncio.run(stream())
    assert "data: [DONE]\n\n" not in events
    last = json.loads(events[-1].removeprefix("data: "))
    assert set(last) == {"error"} and {"message", "type", "code"} <= set(last["error"])
    assert last["error"]["type"] == "server_error" and last["error"]["message"]
    assert llm.cancelled == [1]  # the sibling still running stops


# ---- through the service (tiny-random on softwatch's engine) ------------------------------------

MODEL = "tiny-random-0"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def records(service, expected: int) -> list[str]:
    """The finish reasons of the service's records, once `expected` reached Parquet (its 10 s flush)."""
    store, deadline = Store(service["data"]), time.monotonic() + 30
    while len(rows := store.rows("SELECT finish_reason FROM sequences")) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return sorted(r["finish_reason"] for r in rows)


def test_a_streamed_request_with_a_refused_prompt_is_refused_whole_and_its_sibling_recorded_cancelled(service):
    url, fields = f"{service['url']}/v1/completions", {"model": MODEL, "max_tokens": 400, "temperature": 0}
    lone = httpx.post(url, json={**fields, "prompt": "ok"}, headers=HEADERS, timeout=120)
    assert lone.json()["choices"][0]["finish_reason"] == "length"  # alone, it runs all 400 tokens
    too_long = "x" * 200  # its 200 tokens and max_tokens exceed the context of 512
    with httpx.stream("POST", url, json={**fields, "prompt": ["ok", too_long], "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        r.read()
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert records(service, 2) == ["cancelled", "length"]  # the admitted sibling did not finish as a success


def test_a_chunked_body_over_the_limit_is_a_413_and_one_within_it_is_served(service):
    url = f"{service['url']}/v1/completions"

    def chunked(prompt_bytes: int):
        yield b'{"model": "' + MODEL.encode() + b'", "max_tokens": 2, "prompt": "'
        for start in range(0, prompt_bytes, 1 << 16):
            yield b"y" * min(1 << 16, prompt_bytes - start)
        yield b'"}'

    over = httpx.post(url, content=chunked(MAX_BODY_BYTES), headers=HEADERS, timeout=60)
    assert over.status_code == 413 and str(MAX_BODY_BYTES) in over.json()["error"]["message"]
    within = httpx.post(url, content=chunked(100), headers=HEADERS, timeout=60)
    assert within.status_code == 200 and within.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stop", ["日本語", "🎉", "The end", "."])
def test_the_engine_cuts_at_the_first_stop_string_decoding_a_window_per_token(smollm2, stop):
    """The engine's stop-string check sees the same text as a full decode, and decodes only a
    window of recent ids per token."""
    from softwatch.completion import DecodingParams
    from softwatch.engine import Engine, _Sequence

    tokenizer = CountingTokenizer(smollm2.tokenizer)
    engine = Engine.__new__(Engine)  # the check needs the tokenizer only
    engine.lm, engine._eos = type("LM", (), {"tokenizer": tokenizer})(), set()
    ids = smollm2.tokenizer.encode(MULTIBYTE * 20, add_special_tokens=False)
    seq = _Sequence("r", [], DecodingParams(max_tokens=10**6, stop=(stop, "never there")), 0, 0.0, 0.0)
    ended = next(i for i, token in enumerate(ids) if engine._stop_reason(seq, token) == "stop")
    full = smollm2.tokenizer.decode(ids[:ended + 1], skip_special_tokens=True)
    assert stop in full and stop not in smollm2.tokenizer.decode(ids[:ended], skip_special_tokens=True)
    assert seq.text == full[:full.index(stop)]
    assert max(tokenizer.decoded_lengths) <= 8
