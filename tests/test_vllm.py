"""softwatch inside vLLM (its CPU build): every record field of requests that vLLM decoded
equals a float64 recomputation from a teacher-forced forward pass of the same model."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import vllm  # noqa: F401 - `make test` installs vLLM; these tests must run, not skip

from softwatch.completion import prompt_key
from softwatch.stats import FIELDS
from softwatch.store import Store
from softwatch.vllm import LLM, tag, wait_for_records
from softwatch.vllm.settings import ObserverSettings

from .reference import reference_vllm_stats

PROMPT = "What is a unit test?"


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """One vLLM engine on SmolLM2 with the fault injector (tests only) before the observer."""
    data = str(tmp_path_factory.mktemp("vllm-data"))
    settings = ObserverSettings(data=data, metrics="none", flush_interval_s=0.2)
    llm = LLM("SmolLM2-135M-Instruct", settings, enforce_eager=True, max_model_len=2048, dtype="float32",
              logits_processors=["tests.vllm_faults:FaultInjector", "softwatch.vllm.observer:SoftwatchObserver"])
    yield llm, data
    del llm


@pytest.fixture(scope="module")
def teacher(smollm2):
    """SmolLM2 in float64 for teacher-forced recomputation."""
    return copy.deepcopy(smollm2.model).double()


def teacher_forced_logits(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """float64 logits of each emitted token's step: the forward over prompt + tokens[:-1]."""
    ids = torch.tensor([prompt_ids + token_ids[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return logits[len(prompt_ids) - 1:]


def recorded(data: str, request_id: str) -> tuple[dict, torch.Tensor, list[int]]:
    store = Store(data)
    sequence = store.rows("SELECT * FROM sequences WHERE request_id = $1", [request_id])[0]
    rows = store.rows("SELECT * FROM tokens WHERE request_id = $1 ORDER BY position", [request_id])
    store.close()
    stats = torch.tensor([[float("nan") if r[f] is None else r[f] for f in FIELDS] for r in rows], dtype=torch.float64)
    return sequence, stats, [r["token_id"] for r in rows]


def assert_fields_match(stats: torch.Tensor, reference: torch.Tensor) -> None:
    """1e-4 relative (1e-5 absolute for values near 0); rank and the counts exact."""
    for i, name in enumerate(FIELDS):
        if name in ("rank", "nonfinite", "overflow"):
            assert stats[:, i].tolist() == reference[:, i].tolist(), name
        else:
            torch.testing.assert_close(stats[:, i], reference[:, i], rtol=1e-4, atol=1e-5, msg=name)


def check_against_teacher(teacher, data, request_id, prompt_ids, params) -> dict:
    sequence, stats, tokens = recorded(data, request_id)
    logits = teacher_forced_logits(teacher, prompt_ids, tokens)
    temperature = 0.0 if params.temperature < 1e-5 else params.temperature
    reference = reference_vllm_stats(logits, torch.tensor(tokens), [temperature] * len(tokens),
                                     [params.top_k] * len(tokens), [params.top_p] * len(tokens),
                                     [params.min_p] * len(tokens))
    assert_fields_match(stats, reference)
    assert sequence["generated_tokens"] == len(tokens)
    logprob = reference[:, FIELDS.index("logprob")]
    assert sequence["perplexity"] == pytest.approx(float(torch.exp(-logprob.mean())), rel=1e-4)
    return sequence


def test_every_field_of_a_mixed_batch_equals_float64_recomputation(observed, teacher):
    from vllm import SamplingParams

    llm, data = observed
    requests = {
        "greedy": ("What is a unit test?", SamplingParams(temperature=0, max_tokens=24)),
        "nucleus": ("Write a haiku about rain.", SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3,
                                                               max_tokens=40)),
        "min-p": ("Name three colours", SamplingParams(temperature=1.2, min_p=0.05, seed=5, max_tokens=9,
                                                       ignore_eos=True)),
        "hot": ("Once upon a time", SamplingParams(temperature=1.0, seed=7, max_tokens=17, ignore_eos=True)),
    }
    outputs = llm.generate([p for p, _ in requests.values()],
                           [tag(params, rid) for rid, (_, params) in requests.items()], use_tqdm=False)
    wait_for_records(data, list(requests))
    for (rid, (_, params)), output in zip(requests.items(), outputs):
        sequence = check_against_teacher(teacher, data, rid, list(output.prompt_token_ids), params)
        assert recorded(data, rid)[2] == list(output.outputs[0].token_ids), "the observer changed a token"
        assert sequence["finish_reason"] == output.outputs[0].finish_reason
        assert sequence["model_id"] == "SmolLM2-135M-Instruct"
    assert recorded(data, "min-p")[0]["generated_tokens"] == 9


def test_preempted_requests_are_recorded_once_with_every_token_in_place(tmp_path, teacher):
    """A KV cache too small for the batch: vLLM preempts requests (they leave the batch and come
    back later with the same output list) and each must still be one record, aligned."""
    from vllm import SamplingParams

    data = str(tmp_path)
    settings = ObserverSettings(data=data, metrics="none", flush_interval_s=0.2)
    llm = LLM("SmolLM2-135M-Instruct", settings, enforce_eager=True, max_model_len=256, dtype="float32",
              kv_cache_memory_bytes=40 << 20, disable_log_stats=False)
    prompts = [f"Count from {i} to a hundred:" for i in range(8)]
    params = [tag(SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), f"p{i}") for i in range(8)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0, "the KV cache was large enough: nothing was preempted"
    wait_for_records(data, [f"p{i}" for i in range(8)])
    assert Store(data).rows("SELECT count(*) AS n FROM sequences")[0]["n"] == 8
    for i, output in enumerate(outputs):
        sequence, stats, tokens = recorded(data, f"p{i}")
        assert tokens == list(output.outputs[0].token_ids)
        assert sequence["finish_reason"] == "length" and not torch.isnan(stats[:, :8]).any()
    check_against_teacher(teacher, data, "p7", list(outputs[7].prompt_token_ids), params[7])
    del llm


def test_model_rev_and_params_id_name_the_same_regime_as_the_own_engine(observed, smollm2):
    from vllm import SamplingParams

    from softwatch.completion import DecodingParams

    llm, data = observed
    llm.generate(["Hi"], [tag(SamplingParams(temperature=0.7, top_p=0.95, top_k=20, max_tokens=3), "regime")],
                 use_tqdm=False)
    wait_for_records(data, ["regime"])
    sequence = recorded(data, "regime")[0]
    assert sequence["model_rev"] == smollm2.model_rev
    assert sequence["params_id"] == DecodingParams(temperature=0.7, top_p=0.95, top_k=20).params_id


def test_stop_strings_and_penalties_are_recorded_as_vllm_applied_them(observed):
    from vllm import SamplingParams

    llm, data = observed
    requests = {
        "stopped": SamplingParams(temperature=0, max_tokens=60, stop=["."]),
        "penalized": SamplingParams(temperature=0.8, seed=2, max_tokens=8, ignore_eos=True, repetition_penalty=1.3),
        "unpenalized": SamplingParams(temperature=0.8, seed=2, max_tokens=8, ignore_eos=True),
    }
    outputs = llm.generate([PROMPT] * 3, [tag(p, rid) for rid, p in requests.items()], use_tqdm=False)
    wait_for_records(data, list(requests))
    stopped = outputs[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "."
    sequence, _, tokens = recorded(data, "stopped")
    assert sequence["finish_reason"] == "stop"
    assert tokens == list(stopped.token_ids)  # cut after the token that completed the stop string
    assert "." in llm.get_tokenizer().decode(tokens) and "." not in llm.get_tokenizer().decode(tokens[:-1])
    penalized, stats, _ = recorded(data, "penalized")
    sampling = [FIELDS.index("sampling_entropy"), FIELDS.index("sampling_logprob")]
    assert torch.isnan(stats[:, sampling]).all(), "the penalized distribution is not the observer's to describe"
    assert torch.isfinite(stats[:, FIELDS.index("entropy")]).all()
    assert penalized["params_id"] != recorded(data, "unpenalized")[0]["params_id"]


def test_n_choices_each_get_a_record_keyed_by_their_prompt(observed):
    from vllm import SamplingParams

    llm, data = observed
    out, again, other = llm.generate(
        ["Tell me a joke", "Tell me a joke", "Tell me a story"],
        [tag(SamplingParams(temperature=1.0, n=3, max_tokens=6, seed=1), "three"),
         tag(SamplingParams(max_tokens=2), "again"), tag(SamplingParams(max_tokens=2), "other")],
        use_tqdm=False)
    ids = ["three", "three-1", "three-2", "again", "other"]
    wait_for_records(data, ids)
    recorded_tokens = sorted(recorded(data, rid)[2] for rid in ids[:3])
    assert recorded_tokens == sorted(list(c.token_ids) for c in out.outputs)
    keys = [recorded(data, rid)[0]["prompt_key"] for rid in ids]
    joke, story = prompt_key(out.prompt_token_ids), prompt_key(other.prompt_token_ids)
    assert again.prompt_token_ids == out.prompt_token_ids and joke != story
    assert keys == [joke] * 4 + [story]


def test_a_request_aborted_midway_is_recorded_with_what_it_generated(observed, teacher):
    from vllm import SamplingParams

    llm, data = observed
    engine = llm.llm_engine
    params = tag(SamplingParams(temperature=0.9, seed=11, max_tokens=200, ignore_eos=True), "aborted")
    engine.add_request("abort-me", PROMPT, params)
    produced = 0
    while produced < 5:
        for out in engine.step():
            produced = len(out.outputs[0].token_ids)
    engine.abort_request(["abort-me"])
    while engine.has_unfinished_requests():
        engine.step()
    wait_for_records(data, ["aborted"])
    prompt_ids = llm.get_tokenizer()(PROMPT)["input_ids"]
    sequence = check_against_teacher(teacher, data, "aborted", prompt_ids, params)
    assert sequence["finish_reason"] == "cancelled"
    assert 5 <= sequence["generated_tokens"] < 200


def test_injected_nonfinite_and_overflowing_logits_are_counted_and_other_rows_untouched(observed, teacher):
    from vllm import SamplingParams

    llm, data = observed
    faulty = {"nan-inf": "nonfinite", "overflow": "overflow"}
    params = {rid: SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, extra_args={"inject_fault": fault})
              for rid, fault in faulty.items()}
    params["clean"] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([PROMPT] * 3, [tag(p, rid) for rid, p in params.items()], use_tqdm=False)
    wait_for_records(data, list(params))
    for rid in faulty:
        sequence, stats, tokens = recorded(data, rid)
        assert len(tokens) == 6
        assert stats[:, FIELDS.index("nonfinite" if rid == "nan-inf" else "overflow")].tolist() == [4.0] * 6
        assert sequence["nonfinite" if rid == "nan-inf" else "overflow"] == 24
    clean = check_against_teacher(teacher, data, "clean", list(outputs[2].prompt_token_ids), params["clean"])
    assert clean["nonfinite"] == 0 and clean["overflow"] == 0


@pytest.mark.parametrize("extra", [[], ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "3"]],
                         ids=["greedy", "sampled"])
def test_cli_generate_with_vllm_prints_fields_equal_to_float64_recomputation(extra, teacher, smollm2, tmp_path):
    from vllm import SamplingParams

    cmd = [sys.executable, "-m", "softwatch.cli", "generate", "--engine", "vllm", PROMPT, "--chat", "--json",
           "--max-tokens", "24", "--dtype", "float32", "--data", str(tmp_path), *extra]
    if not extra:
        cmd += ["--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result) == {"text", "tokens", "summary", "regime"}
    tokens = [t["id"] for t in result["tokens"]]
    stats = torch.tensor([[float("nan") if t[f] is None else t[f] for f in FIELDS] for t in result["tokens"]],
                         dtype=torch.float64)
    prompt_ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                       add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert result["summary"]["prompt_tokens"] == len(prompt_ids)
    params = SamplingParams(temperature=float(extra[1]) if extra else 0.0, top_p=float(extra[3]) if extra else 1.0,
                            top_k=int(extra[5]) if extra else 0)
    logits = teacher_forced_logits(teacher, prompt_ids, tokens)
    n = len(tokens)
    reference = reference_vllm_stats(logits, torch.tensor(tokens), [params.temperature] * n, [params.top_k] * n,
                                     [params.top_p] * n)
    assert_fields_match(stats, reference)
    assert recorded(str(tmp_path), Store(str(tmp_path)).rows("SELECT request_id FROM sequences")[0]["request_id"])[2] == tokens


def server_command(data: str, port: int) -> list[str]:
    """The README's command for vLLM's OpenAI server with the observer."""
    checkpoint = subprocess.run([sys.executable, "-m", "softwatch.cli", "checkpoint"], capture_output=True, text=True,
                                check=True).stdout.strip()
    settings = {"softwatch": {"data": data, "metrics": "none", "flush_interval_s": 1}}
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
            "--served-model-name", "SmolLM2-135M-Instruct", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager", "--max-model-len", "2048",
            "--logits-processors", "softwatch.vllm.observer:SoftwatchObserver",
            "--additional-config", json.dumps(settings), "--host", "127.0.0.1", "--port", str(port)]


def test_openai_server_with_the_observer_records_every_chat_request(tmp_path):
    import time

    import httpx
    import openai

    from .prometheus import free_port

    data, port = str(tmp_path / "data"), free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(server_command(data, port), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.getcwd(), "VLLM_USE_V2_MODEL_RUNNER": "0"})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        answers = [client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0.7,
                                                  messages=[{"role": "user", "content": f"Say something about {i}"}])
                   for i in range(16)]
        assert all(a.choices[0].message.content for a in answers)
        query = [sys.executable, "-m", "softwatch.cli", "sql", "SELECT count(*) AS n FROM sequences", "--data", data,
                 "--json"]
        deadline = time.monotonic() + 30
        while json.loads(subprocess.run(query, capture_output=True, text=True, check=True).stdout or '{"n": 0}')["n"] < 16:
            assert time.monotonic() < deadline, "records did not arrive"
            time.sleep(0.5)
        assert json.loads(subprocess.run(query, capture_output=True, text=True, check=True).stdout)["n"] == 16
        store = Store(data)
        tokens = store.rows("SELECT sum(generated_tokens) AS n FROM sequences")[0]["n"]
        assert tokens == sum(a.usage.completion_tokens for a in answers)
        assert store.rows("SELECT count(*) AS n FROM tokens")[0]["n"] == tokens
        drift = subprocess.run([sys.executable, "-m", "softwatch.cli", "drift", "--data", data, "--json"],
                               capture_output=True, text=True)
        assert drift.returncode == 0, drift.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
