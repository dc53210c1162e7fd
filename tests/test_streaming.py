"""Streaming in the OpenAI-compatible layer: the replica's incremental text deltas, and how a
multi-choice stream starts (every choice admitted first) and ends (an error event, no [DONE])."""

import asyncio
import json

import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from softwatch.serve.llm import _TextStream
from softwatch.serve.protocol import MAX_BODY_BYTES
from softwatch.store import Store, wait_for_records

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

    @property
    def all_special_ids(self) -> list[int]:
        return self.tokenizer.all_special_ids


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


def test_a_run_of_special_tokens_does_not_widen_the_decoded_window(smollm2):
    tokenizer = CountingTokenizer(smollm2.tokenizer)
    ids = [smollm2.tokenizer.eos_token_id] * 500 + smollm2.tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    streamed, _ = stream(tokenizer, ids, ("never there",))
    assert streamed + MULTIBYTE[-len("never there") + 1:] == MULTIBYTE
    assert max(tokenizer.decoded_lengths) <= 8


def test_a_client_gone_mid_body_is_not_served_a_cut_body():
    from softwatch.serve.ingress import _LimitBody

    served = []

    async def app(scope, receive, send):
        served.append(await receive())

    messages = iter([{"type": "http.request", "body": b'{"prompt": "hi", "max_tokens": 4}', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        raise AssertionError(f"nobody is listening: {message}")

    scope = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(_LimitBody(app)(scope, receive, send))
    assert served == []


# ---- the ingress, with the LLM deployment's handle scripted (no Ray) ----------------------------

ADMITTED = {"type": "admitted"}
LONG_WAIT = 30.0  # a choice still running when its request is answered


def token(index: int, text: str) -> dict:
    return {"type": "token", "index": index, "text": text, "logprobs": None}


def done(index: int, rid: str, rest: str = "", finish_reason: str = "length") -> dict:
    return {"type": "done", "index": index, "rest": rest, "request_id": rid, "text": rest, "token_ids": [1, 2],
            "finish_reason": finish_reason, "prompt_tokens": 3, "regime": {"model_rev": "rev"}, "logprobs": None}


def refused(status: int, param: str | None = None, index: int | None = 0) -> dict:
    return {"type": "error", "index": index, "status": status, "param": param, "message": f"refused with {status}"}


class ScriptedLLM:
    """The LLM deployment's handle: a request's one call plays `script` (events; a number waits
    that many seconds; an exception is raised) and keeps the choices it was sent. Records whether
    the call was cancelled, as Serve's handle does."""

    def __init__(self, script: list):
        self.script = script
        self.requests: list[dict] = []
        self.cancelled = False

    def options(self, stream: bool):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request: dict):
        self.requests.append(request)
        return ScriptedCall(self)


class ScriptedCall:
    def __init__(self, llm: ScriptedLLM):
        self.llm = llm

    async def __aiter__(self):
        for step in self.llm.script:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                yield step

    def cancel(self) -> None:
        self.llm.cancelled = True


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


def test_a_requests_choices_go_to_the_replica_in_one_call():
    llm = ScriptedLLM([ADMITTED, done(0, "r0", "a"), done(1, "r1", "b"), done(2, "r2", "c"), done(3, "r3", "d")])
    answer = asyncio.run(completions(llm, ["p0", "p1"], n=2, seed=7))
    (request,) = llm.requests
    assert [(c["index"], c["prompt"]) for c in request["choices"]] == [(0, "p0"), (1, "p0"), (2, "p1"), (3, "p1")]
    assert len({c["params"]["seed"] for c in request["choices"]}) == 2  # each choice of a prompt its own seed
    assert [c["text"] for c in answer["choices"]] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("refusal, status", [(refused(400, "max_tokens", index=2), 400), (refused(503), 503),
                                             (BackPressureError(512, 512, retry_after_s=2.0), 503)])
@pytest.mark.parametrize("stream", [True, False])
def test_a_refused_request_is_answered_with_the_refusals_status(refusal, status, stream):
    from softwatch.serve.ingress import ApiError

    llm = ScriptedLLM([0.05, refusal])

    async def answer():
        with pytest.raises(ApiError) as refusal_raised:
            await asyncio.wait_for(completions(llm, ["p0", "p1", "p2"], stream=stream), 5)
        return refusal_raised.value

    error = asyncio.run(answer())
    assert error.status == status
    if status == 400:
        assert error.param == "max_tokens"


def test_a_stream_that_ends_before_admission_is_a_500_not_a_hang():
    from softwatch.serve.ingress import ApiError

    async def answer():
        with pytest.raises(ApiError) as failed:
            await asyncio.wait_for(completions(ScriptedLLM([]), ["p0"], stream=True), 5)
        return failed.value

    assert asyncio.run(answer()).status == 500


def test_tokens_of_every_choice_are_streamed_in_the_order_they_come():
    llm = ScriptedLLM([ADMITTED, token(0, "a"), token(1, "x"), token(0, "b"), done(0, "r0", "c"),
                       0.05, done(1, "r1", "y")])

    async def stream():
        return await body_of(await completions(llm, ["p0", "p1"], stream=True))

    events = asyncio.run(stream())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert text == {0: "abc", 1: "xy"} and not llm.cancelled


def test_an_answer_names_its_choices_records_in_choice_order_whatever_order_they_finished_in():
    llm = ScriptedLLM([ADMITTED, done(2, "r2", "c"), 0.05, done(1, "r1", "b"), done(0, "r0", "a")])
    answer = asyncio.run(completions(llm, ["p"], n=3))
    assert [c["text"] for c in answer["choices"]] == ["a", "b", "c"]
    assert answer["softwatch"]["request_ids"] == ["r0", "r1", "r2"]


@pytest.mark.parametrize("failure, still_running", [(refused(500), True), (done(0, "r0", finish_reason="error"), True),
                                                   (RuntimeError("replica died"), False), ("ends", False)])
def test_a_failure_after_the_stream_started_ends_it_with_an_error_event_and_no_done(failure, still_running):
    script = [ADMITTED, token(0, "a"), token(1, "x"), 0.05] + ([] if failure == "ends" else [failure, LONG_WAIT])
    llm = ScriptedLLM(script)

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
    assert llm.cancelled == still_running  # a call that still runs is stopped (its choices recorded cancelled)


def test_a_client_that_goes_away_cancels_the_call():
    llm = ScriptedLLM([ADMITTED, token(0, "a"), LONG_WAIT])

    async def stream():
        response = await completions(llm, ["p0"], stream=True)
        body = response.body_iterator
        first = await asyncio.wait_for(anext(body), 5)
        await body.aclose()
        await settle()
        return first

    assert json.loads(asyncio.run(stream()).removeprefix("data: "))["choices"][0]["text"] == "a"
    assert llm.cancelled


# ---- through the service (tiny-random on softwatch's engine) ------------------------------------

MODEL = "tiny-random-0"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def test_a_streamed_request_with_a_refused_prompt_is_refused_whole_and_none_of_it_decodes(service):
    url, fields = f"{service['url']}/v1/completions", {"model": MODEL, "max_tokens": 400, "temperature": 0}

    def recorded_after(prompt: str) -> set[str]:
        """Every record id in the dataset once this request's record is in (one replica, one
        sink, flushed in order: what came before it is in too)."""
        answer = httpx.post(url, json={**fields, "prompt": prompt, "max_tokens": 3}, headers=HEADERS, timeout=120)
        wait_for_records(service["data"], answer.json()["softwatch"]["request_ids"], timeout_s=60)
        return {r["request_id"] for r in Store(service["data"]).rows("SELECT request_id FROM sequences")}

    before = recorded_after("before")
    too_long = "x" * 200  # its 200 tokens and max_tokens exceed the context of 512
    with httpx.stream("POST", url, json={**fields, "prompt": ["ok", too_long], "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        r.read()
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert len(recorded_after("after") - before) == 1  # the marker's: the refused request's sibling never ran


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
