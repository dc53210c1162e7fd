"""The Serve app on vLLM with the softwatch observer (`engine: vllm`), through the official
`openai` client: every choice has its record, the records' statistics equal a float64
recomputation, and a temperature push is reported as drift. (The serve tests of test_serve.py,
concurrent clients and a config push among them, run on vLLM too: its `service` is parametrized.)"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from softwatch.admission import PromptLimits
from softwatch.completion import prompt_key
from softwatch.prompts import prompt_set
from softwatch.serve.app import run
from softwatch.stats import FIELDS
from softwatch.store import Store, wait_for_records

from .conftest import API_KEY, SMOL_SERVICE, serve_on
from .reference import reference_vllm_stats
from .test_vllm import assert_fields_match, recorded, teacher_forced_logits

pytest.importorskip("vllm")  # make test installs it; a machine without it runs the softwatch engine only

MODEL = "SmolLM2-135M-Instruct"
DEFAULTS = {"temperature": 0.7, "max_tokens": 16}


@pytest.fixture(scope="module")
def vllm_service(ray_cluster, tmp_path_factory):
    yield from serve_on(tmp_path_factory, engine="vllm", **SMOL_SERVICE, defaults=DEFAULTS)


@pytest.fixture(scope="module")
def client(vllm_service):
    return openai.OpenAI(base_url=f"{vllm_service['url']}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def teacher(smollm2):
    import copy

    return copy.deepcopy(smollm2.model).double()


def test_openai_client_on_vllm_every_choice_recorded_with_exact_fields(vllm_service, client, smollm2, teacher):
    messages = [{"role": "user", "content": "What is a unit test?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, n=2, temperature=0.8, top_p=0.9, seed=3,
                                          max_tokens=16, logprobs=True, top_logprobs=2)
    chat_ids = chat.model_extra["softwatch"]["request_ids"]
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    assert all(len(c.logprobs.content) >= 1 and len(c.logprobs.content[0].top_logprobs) == 2 for c in chat.choices)
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12)
    completion_ids = completion.model_extra["softwatch"]["request_ids"]
    streamed_ids, text = [], ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                streamed_ids.append(choice.model_extra["softwatch"]["request_id"])
    assert text and len(streamed_ids) == 1

    ids = chat_ids + completion_ids + streamed_ids
    wait_for_records(vllm_service["data"], ids, timeout_s=60)
    store = Store(vllm_service["data"])
    rows = store.rows("SELECT request_id, model_id, model_rev, params_id, prompt_key, generated_tokens FROM sequences")
    store.close()
    assert sorted(r["request_id"] for r in rows) == sorted(ids), "one sequences row per choice, no more"
    assert {r["model_id"] for r in rows} == {MODEL} and all(r["model_rev"] and r["params_id"] for r in rows)

    prompt_ids = PromptLimits.of(smollm2, max_batch=1).encode(messages, chat=True)  # the teacher checks them
    keys = {r["request_id"]: r["prompt_key"] for r in rows}
    assert {keys[rid] for rid in chat_ids + streamed_ids} == {prompt_key(prompt_ids)}, "one prompt, one key"
    assert keys[completion_ids[0]] == prompt_key(smollm2.tokenizer.encode("Once upon a time"))
    for rid, choice in zip(chat_ids, chat.choices):
        sequence, stats, tokens = recorded(vllm_service["data"], rid)
        assert stats.shape == (len(tokens), len(FIELDS)) and not torch.isnan(stats).any(), "all ten fields"
        reference = reference_vllm_stats(teacher_forced_logits(teacher, prompt_ids, tokens), torch.tensor(tokens),
                                         [0.8] * len(tokens), [0] * len(tokens), [0.9] * len(tokens))
        assert_fields_match(stats, reference)
        assert smollm2.tokenizer.decode(tokens, skip_special_tokens=True) == choice.message.content


def test_a_temperature_push_from_0_3_to_1_3_is_reported_as_drift(vllm_service, client):
    """The issue's must-show: 110 served requests at T 0.3, then a config push and 110 at T 1.3;
    `softwatch drift` compares the newest regime with the one before it and says drift. (Both
    regimes are new to the service: a regime seen before is not "newest" again, issue 16's rollback.)"""
    prompts = prompt_set()

    def ask(i: int) -> tuple[str, str]:
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24)
        return r.model_extra["softwatch"]["request_ids"][0], r.model_extra["softwatch"]["regime"]["params_id"]

    params_ids, answered = [], []
    for temperature in (0.3, 1.3):
        run({**vllm_service["args"], "defaults": {**DEFAULTS, "temperature": temperature}}, port=vllm_service["port"])
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, range(110)))
        answered += [request_id for request_id, _ in replies]
        params_ids.append({params_id for _, params_id in replies})
    assert all(len(ids) == 1 for ids in params_ids) and params_ids[0] != params_ids[1]
    wait_for_records(vllm_service["data"], answered, timeout_s=60)
    out = subprocess.run([sys.executable, "-m", "softwatch.cli", "drift", "--data", vllm_service["data"], "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (before,), (after,) = params_ids
    compared = {(_params_id(r["baseline_regime"]), _params_id(r["current_regime"])) for r in report["rows"]}
    assert compared == {(before, after)}, report["rows"][0]
    # the monitor's min_sequences, for every metric each sequence has (repetition: from 4 generated tokens on)
    assert min(min(r["n_baseline"], r["n_current"]) for r in report["rows"] if r["metric"] != "repetition") >= 100
    undefined = Store(vllm_service["data"]).rows(
        "SELECT count(*) AS n FROM sequences WHERE generated_tokens >= 4 AND repetition IS NULL")
    assert undefined == [{"n": 0}]
    assert report["verdict"] == "drift", report["rows"]


def _params_id(regime_label: str) -> str:
    """The params_id of a report's regime label, `model@rev/params_id[other columns]`."""
    return regime_label.split("/", 1)[1].split("[")[0]
