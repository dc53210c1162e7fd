"""The LLM replica under faults: a request that breaks, a step that fails, a request that times
out, a record that cannot be written, a client that goes away. Each answered request must have
exactly one record, and no request may hurt the others."""

import asyncio
import time

import httpx
import pytest

from softwatch.serve.llm import LLMServer
from softwatch.store import Store

from .conftest import API_KEY
from .test_engine import ALTERNATING_TEMPLATE, break_attention

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def replica(tmp_path, **settings) -> LLMServer:
    return LLMServer({"model": "tiny-random", "data": str(tmp_path), "max_batch": 8, **settings})


async def ask(server: LLMServer, rid: str, prompt="hello", messages=None, stream=False, on_event=None, **params):
    """The last event of one request; `on_event(event)` sees every event as it comes."""
    spec = {"request_id": rid, "params": params, "stream": stream}
    spec["messages" if messages else "prompt"] = messages or prompt
    event = None
    async for event in server.generate(spec):
        if on_event is not None:
            on_event(event)
    return event


def gather(*requests, timeout_s=60.0):
    """Run requests concurrently; a request that hangs fails the test instead of hanging it."""
    async def all_of():
        return await asyncio.wait_for(asyncio.gather(*requests), timeout_s)
    return asyncio.run(all_of())


def records(server: LLMServer, tmp_path) -> dict[str, dict]:
    server.shutdown()  # flushes the sink
    rows = Store(str(tmp_path)).rows("SELECT request_id, finish_reason, generated_tokens FROM sequences")
    assert len(rows) == len({r["request_id"] for r in rows}), "a request was recorded twice"
    return {r["request_id"]: r for r in rows}


def test_a_chat_template_that_raises_fails_only_its_own_request(tmp_path):
    server = replica(tmp_path)
    server.lm.tokenizer.chat_template = ALTERNATING_TEMPLATE
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "there"}]
    results = gather(*(ask(server, f"good-{i}", messages=good, stream=True, **{**LONG, "max_tokens": 100})
                       for i in range(3)),
                     ask(server, "bad", messages=bad), ask(server, "late", messages=good, max_tokens=5))
    *fine, refused, late = results
    assert refused["type"] == "error" and refused["status"] == 400 and refused["param"] == "messages"
    assert "roles must alternate" in refused["message"]
    assert all(r["type"] == "done" and len(r["token_ids"]) == 100 for r in fine) and late["type"] == "done"
    server.check_health()
    assert set(records(server, tmp_path)) == {"good-0", "good-1", "good-2", "late"}


def test_a_failing_engine_fails_its_requests_with_records_and_turns_the_replica_unhealthy(tmp_path):
    server = replica(tmp_path, max_failed_steps=2)
    repair = None

    streamed = []

    def watch(event):
        nonlocal repair
        streamed.append(event)
        if len(streamed) == 3:  # the batch is mid-decode: the next step fails for real
            repair = break_attention(server.lm)

    (mid,) = gather(ask(server, "mid", stream=True, on_event=watch, **LONG))
    assert mid["type"] == "error" and mid["status"] == 500 and mid["message"]
    server.check_health()  # one failed step is not yet a broken replica
    failed = gather(*(ask(server, f"next-{i}") for i in range(3)))  # each prefill fails
    assert all(r["type"] == "error" and r["status"] == 500 for r in failed)
    with pytest.raises(RuntimeError, match=r"failed its last \d+ decode steps"):
        server.check_health()
    repair()
    (after,) = gather(ask(server, "after", max_tokens=4))
    assert after["type"] == "done"
    server.check_health()
    rows = records(server, tmp_path)
    assert set(rows) == {"mid", "next-0", "next-1", "next-2", "after"}
    assert rows["mid"]["finish_reason"] == "error" and rows["mid"]["generated_tokens"] >= 3
    assert all(rows[f"next-{i}"]["finish_reason"] == "error" for i in range(3))
    tokens = Store(str(tmp_path)).rows("SELECT count(*) AS n FROM tokens WHERE request_id = 'mid'")[0]["n"]
    assert tokens == rows["mid"]["generated_tokens"]  # its token rows are kept too


def test_a_request_past_its_timeout_is_cancelled_freed_and_recorded(tmp_path):
    server = replica(tmp_path, request_timeout_s=0.3)
    slow, quick = gather(ask(server, "slow", max_tokens=480, ignore_eos=True),
                         ask(server, "quick", max_tokens=2))
    assert slow["type"] == "error" and slow["status"] == 504 and "0.3 s" in slow["message"]
    assert quick["type"] == "done"
    deadline = time.monotonic() + 10
    while asyncio.run(server.info())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asyncio.run(server.info())["running"] == 0  # its sequence left the batch
    rows = records(server, tmp_path)
    assert rows["slow"]["finish_reason"] == "timeout" and 0 < rows["slow"]["generated_tokens"] < 480
    assert rows["quick"]["finish_reason"] in ("stop", "length")


def test_a_request_whose_record_cannot_be_written_is_not_answered_as_a_success(tmp_path):
    server = replica(tmp_path)
    server.recorder.sink.close()  # every later write raises: the record would not be durable
    (answer,) = gather(ask(server, "unrecorded", max_tokens=3))
    assert answer["type"] == "error" and answer["status"] == 503
    server.check_health()  # the decode loop serves on
