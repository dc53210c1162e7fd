import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from softwatch.store import Store, wait_for_records

from .conftest import API_KEY, SMOL_SERVICE, TINY_SERVICE, serve_on
from .openai_schema import SchemaChecks

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SCHEMA_CHECKS = SchemaChecks()  # every answer a `client` gets is checked against OpenAI's schema
DEFAULTS = {"temperature": 0.7, "max_tokens": 8}
DRIFT = {"interval_s": 2, "min_sequences": 20, "window": 20, "permutations": 999}
SERVICES = {  # vLLM cannot run tiny-random: it serves the real default model
    "softwatch": {**TINY_SERVICE, "engine": "softwatch"},
    "vllm": {**SMOL_SERVICE, "engine": "vllm", "defaults": DEFAULTS, "drift": DRIFT},
}
SOFTWATCH_ONLY = pytest.mark.parametrize("service", ["softwatch"], indirect=True)  # reuses the module's service


@pytest.fixture(scope="module", params=list(SERVICES))
def service(request, ray_cluster, tmp_path_factory):
    """Every test of this module on each engine: the same app, routes and records over softwatch's
    engine (tiny-random) and over vLLM with the observer (SmolLM2-135M-Instruct)."""
    if request.param == "vllm":
        pytest.importorskip("vllm")  # make test installs it; a machine without it runs the softwatch engine only
    yield from serve_on(tmp_path_factory, **SERVICES[request.param])


@pytest.fixture
def model(service):
    return service["model"]


@pytest.fixture
def client(service):
    return OpenAI(base_url=f"{service['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120,
                  http_client=httpx.Client(transport=SCHEMA_CHECKS.transport(), timeout=120))


def flush_and_read(service, sql):
    """Records reach Parquet within the sink's 10 s age flush."""
    deadline = time.time() + 30
    store = Store(service["data"])
    while True:
        rows = store.rows(sql)
        if rows and rows[0].get("ready", True) or time.time() > deadline:
            return rows
        time.sleep(0.5)


def test_models_completions_chat_and_stats(client, model):
    assert [m.id for m in client.models.list().data] == [model]
    r = client.completions.create(model=model, prompt="hello", max_tokens=5, logprobs=2, seed=3)
    choice = r.choices[0]
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) <= 5
    # a dict keyed by token text (OpenAI's shape): byte tokens that decode alike share a key
    assert all(1 <= len(top) <= 2 and max(top.values()) >= lp for top, lp in
               zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
    assert "".join(choice.logprobs.tokens) == choice.text or choice.finish_reason == "stop"

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          n=2, seed=1, logprobs=True, top_logprobs=3,
                                          extra_body={"softwatch": {"stats": True}})
    assert [c.index for c in chat.choices] == [0, 1]
    first = chat.choices[0]
    # a choice that stopped generated an end token that is in neither its content nor its logprobs
    assert sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in chat.choices) == \
        chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in first.logprobs.content)
    stats = first.model_extra["softwatch"]
    assert len(stats["tokens"]) == len(first.logprobs.content)
    for token, lp in zip(stats["tokens"], first.logprobs.content):
        assert token["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
    assert stats["regime"]["model_id"] == model and stats["regime"]["temperature"] == 0.7
    assert stats["summary"]["generated_tokens"] == len(stats["tokens"])


def test_stream_with_logprobs_equals_the_unstreamed_text(client, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "stream"}], max_tokens=8, seed=11,
                  temperature=0.9, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed_lp = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content], abs=1e-6)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    completion_chunks = list(client.completions.create(model=model, prompt="abc", max_tokens=6, seed=2, stream=True))
    assert completion_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_are_never_streamed(client, model):
    base = client.completions.create(model=model, prompt="xyz", max_tokens=12, seed=5, temperature=0)
    text = base.choices[0].text
    stop = next((ch for ch in text[2:] if ch != "\ufffd"), None)
    if stop is None:
        pytest.fail(f"the greedy continuation has no usable stop character: {text!r}")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="xyz", max_tokens=12, seed=5, temperature=0, stop=[stop], stream=True))
    assert streamed == text[: text.index(stop)]


@pytest.mark.parametrize("body, status, param", [  # $MODEL: the served model; $TOO_LONG: a prompt past its context
    (b'{"model": "$MODEL", "prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"model": "$MODEL", "prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"model": "$MODEL", "prompt": "x", "top_p": 1.5}', 400, "top_p"),
    (b'{"model": "$MODEL", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "$MODEL", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "$MODEL", "prompt": "$TOO_LONG"}', 400, "prompt"),
    (b'{"model": "$MODEL", "prompt": ""}', 400, "prompt"),
    (b'{"model": "$MODEL", "prompt": "a\\ud800b"}', 400, "prompt"),  # a lone surrogate: no text
    (b'{"model": "other-model", "prompt": "x"}', 404, "model"),
    (b'{"model": "$MODEL", "prompt": "x"', 400, None),
    (b'{"model": "$MODEL", "prompt": "\xff\xfe"}', 400, None),
])
def test_bad_completion_requests_get_a_4xx_naming_the_field(service, body, status, param):
    # "y y y ...": at least one token per word with any tokenizer, so as many tokens as the model's context
    too_long = b"y " * service["context_length"]
    body = body.replace(b"$MODEL", service["model"].encode()).replace(b"$TOO_LONG", too_long)
    r = httpx.post(f"{service['url']}/v1/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if body.endswith(too_long + b'"}'):
        assert f"context is {service['context_length']}" in error["message"], error


def test_bad_chat_requests_and_auth(service, client, model):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{service['url']}/v1/chat/completions", json={"model": model, "messages": []}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{service['url']}/v1/chat/completions", headers=headers,
                   json={"model": model, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{service['url']}/v1/completions", json={"model": model, "prompt": "x"}, headers=auth)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{service['url']}/healthz").json() == {"status": "ok"}
    assert client.completions.create(model=model, prompt="still serving", max_tokens=2).choices


def test_the_api_key_stays_out_of_the_serve_config_and_guards_every_route(service):
    import json

    from ray import serve
    from ray.serve.context import _get_global_client

    seen = json.dumps(_get_global_client().get_serve_details()) + repr(serve.status())
    assert "api_key_file" in seen and API_KEY not in seen  # the config names the file, never the key
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/no/such/route"):
        r = httpx.get(f"{service['url']}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    assert httpx.get(f"{service['url']}/openapi.json", headers=HEADERS).json()["paths"]
    assert httpx.get(f"{service['url']}/healthz").status_code == 200


@SOFTWATCH_ONLY  # it deploys an Ingress of its own with no LLM behind it: no engine is involved
def test_a_deployment_requiring_a_key_refuses_to_start_without_one(service, tmp_path):
    from ray import serve

    from softwatch.serve.ingress import Ingress

    for options in ({"api_key_file": str(tmp_path / "missing")},  # a secret that was never mounted
                    {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {"SOFTWATCH_API_KEY": ""}}}}):
        ingress = Ingress.options(name="KeylessIngress", max_constructor_retry_count=1,
                                  ray_actor_options=options.pop("ray_actor_options", {"num_cpus": 0}))
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(ingress.bind(None, require_api_key=True, **options), name="keyless", route_prefix="/keyless")
        why = serve.status().applications["keyless"].deployments["KeylessIngress"].message
        assert "MissingApiKey" in why and ("require_api_key" in why or "API key file" in why), why
        serve.delete("keyless")
    assert httpx.get(f"{service['url']}/healthz").status_code == 200


def test_every_answer_and_chunk_follows_openais_schema(service, client, model):
    bodies, chunks = SCHEMA_CHECKS.bodies, SCHEMA_CHECKS.chunks
    rev = client.models.list().data[0].model_extra["softwatch"]["model_rev"]
    messages = [{"role": "user", "content": "schema"}]
    one = client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=4, logprobs=True,
                                         top_logprobs=2)
    three = client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=4, n=3, logprobs=True,
                                           extra_body={"softwatch": {"stats": True}})
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, not once per choice
    for r in (one, three):
        assert r.system_fingerprint == rev
        for c in r.choices:
            assert c.message.refusal is None and "refusal" in c.message.model_fields_set
            assert c.logprobs.refusal is None and "refusal" in c.logprobs.model_fields_set
            assert c.finish_reason in ("stop", "length")
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=4, n=3,
                                                   logprobs=True, stream=True, stream_options={"include_usage": True}))
    for i, whole in enumerate(three.choices):
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == whole.message.content
        assert [t.token for c in mine if c.logprobs for t in c.logprobs.content] == \
            [t.token for t in whole.logprobs.content]
        # one entry per content token: the end token of a choice that stopped is not among them
        generated = len(whole.model_extra["softwatch"]["tokens"])
        assert len(whole.logprobs.content) == generated - (whole.finish_reason == "stop")
    assert streamed[-1].usage.model_dump() == three.usage.model_dump()
    finals = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason]
    assert len({c.model_extra["softwatch"]["request_id"] for c in finals}) == 3  # each choice names its record
    assert {c.system_fingerprint for c in streamed} == {rev}

    prompts = ["first prompt", "the second prompt"]
    whole = client.completions.create(model=model, prompt=prompts, max_tokens=6, seed=8, n=2, logprobs=1)
    single = [client.completions.create(model=model, prompt=p, max_tokens=6, seed=8, logprobs=1) for p in prompts]
    assert whole.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in single)
    stream = list(client.completions.create(model=model, prompt=prompts[0], max_tokens=6, seed=8, logprobs=1,
                                            stream=True))
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == single[0].choices[0].logprobs.text_offset  # offsets run on across chunks
    assert len(offsets) == single[0].usage.completion_tokens > 1
    assert SCHEMA_CHECKS.bodies >= bodies + 5 and SCHEMA_CHECKS.chunks >= chunks + len(streamed) + len(stream)


REFUSED = [  # (body fields, the field the 4xx must name)
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": 2**62}, "top_k"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"n": 17}, "n"),
    ({"n": 16, "prompt": ["a", "b", "c", "d", "e"]}, "n"),
    ({"stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    ({"stop": ["x" * 10_000]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logit_bias": {"50": 100}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"echo": True}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"made_up_option": 1}, "made_up_option"),
]


def test_out_of_range_and_unsupported_fields_are_refused_and_hurt_no_one(service, client, model):
    url = f"{service['url']}/v1/completions"
    answered, stop = [], threading.Event()

    def load(worker):  # requests in flight on the replica while the bad ones arrive
        i = 0
        while not stop.is_set():
            r = client.completions.create(model=model, prompt=f"bystander {worker} {i}", max_tokens=6, seed=i)
            answered.extend(r.model_extra["softwatch"]["request_ids"])
            i += 1

    with ThreadPoolExecutor(3) as pool:
        bystanders = [pool.submit(load, w) for w in range(3)]
        for fields, param in REFUSED:
            r = httpx.post(url, json={"model": model, "prompt": "x", "max_tokens": 4, **fields}, headers=HEADERS,
                           timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.text)
            assert param in r.json()["error"]["message"]
        for field in ("tools", "logit_bias", "response_format"):
            value = next(fields[field] for fields, param in REFUSED if param == field)
            r = httpx.post(f"{service['url']}/v1/chat/completions", headers=HEADERS, timeout=60,
                           json={"model": model, "messages": [{"role": "user", "content": "x"}], field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = httpx.post(url, content=b'{"prompt": "' + b"y" * (2 << 20) + b'"}', headers={
            **HEADERS, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["message"]
        # the edges of every range are served, and their records flush (int32 / int64 columns)
        for fields in ({"seed": 2**63 - 1, "n": 2}, {"seed": -(2**63)}, {"top_k": 2**31 - 1}, {"n": 16},
                       {"stop": ["z" * 256] * 4}, {"tools": [], "logit_bias": {}, "echo": False, "best_of": 1,
                                                   "response_format": {"type": "text"}, "presence_penalty": 0}):
            r = client.completions.create(model=model, prompt="edge", max_tokens=4, extra_body=fields)
            answered.extend(r.model_extra["softwatch"]["request_ids"])
        stop.set()
        for b in bystanders:
            b.result()  # no bystander failed
    assert len(answered) > 25
    rows = flush_and_read(service, "SELECT request_id, count(*) AS n, "
                          f"(SELECT count(*) FROM sequences WHERE request_id IN {tuple(answered)}) >= {len(answered)} "
                          f"AS ready FROM sequences WHERE request_id IN {tuple(answered)} GROUP BY request_id")
    assert {r["request_id"]: r["n"] for r in rows} == {rid: 1 for rid in answered}


def test_concurrent_clients_each_get_one_sequence_row_and_config_push_changes_params_id(service, client, model):
    from softwatch.serve.app import run

    def one(i):
        r = client.completions.create(model=model, prompt=f"request {i}", max_tokens=4 + i % 5)
        (request_id,) = r.model_extra["softwatch"]["request_ids"]
        return request_id, r.usage.completion_tokens, r.model_extra["softwatch"]["regime"]["params_id"]

    with ThreadPoolExecutor(32) as pool:
        before = list(pool.map(one, range(64)))
    old_params = {p for _, _, p in before}
    assert len(old_params) == 1

    from ray import serve

    from softwatch.serve.app import APP_NAME

    llm = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
    pid = llm.info.remote().result()["pid"]
    run({**service["args"], "defaults": {"temperature": 1.0, "max_tokens": 8}}, port=service["port"])  # config push
    assert llm.info.remote().result()["pid"] == pid  # reconfigured in place, not restarted
    after = [one(i) for i in range(4)]
    new_params = {p for _, _, p in after}
    assert len(new_params) == 1 and new_params != old_params
    # a client's own temperature is a request override; the deployment's own value is not one
    sources = {}
    for temperature, expected in ((0.3, "request"), (1.0, "deployment")):
        r = client.completions.create(model=model, prompt="own", max_tokens=4, temperature=temperature)
        assert r.model_extra["softwatch"]["regime"]["params_source"] == expected
        sources[r.model_extra["softwatch"]["request_ids"][0]] = expected

    answered = before + after
    ids = [rid for rid, _, _ in answered]
    assert len(set(ids)) == len(ids) == 68
    wait_for_records(service["data"], ids, timeout_s=60)
    store = Store(service["data"])
    rows = store.rows("SELECT request_id, params_id, temperature, generated_tokens FROM sequences "
                      f"WHERE request_id IN ({', '.join('?' * len(ids))})", ids)
    assert sorted(r["request_id"] for r in rows) == sorted(ids), "each answered request has exactly one row"
    recorded = {r["request_id"]: r for r in rows}
    for rid, generated, params_id in answered:  # the row is the answer's: its params_id and its token count
        assert recorded[rid]["params_id"] == params_id and recorded[rid]["generated_tokens"] == generated, rid
    assert {recorded[rid]["temperature"] for rid, _, _ in after} == {1.0}
    assert {recorded[rid]["temperature"] for rid, _, _ in before} == {DEFAULTS["temperature"]}
    wait_for_records(service["data"], list(sources), timeout_s=60)
    recorded_sources = store.rows("SELECT request_id, params_source FROM sequences WHERE request_id IN (?, ?) OR "
                                  f"request_id IN ({', '.join('?' * len(ids))})", [*sources, *ids])
    assert {r["request_id"]: r["params_source"] for r in recorded_sources} == \
        {**sources, **{rid: "deployment" for rid in ids}}
    assert store.rows("SELECT count(*) AS n FROM tokens")[0]["n"] == \
        store.rows("SELECT sum(generated_tokens)::BIGINT AS n FROM sequences")[0]["n"]
    ids = {r["request_id"] for r in store.rows("SELECT request_id FROM sequences")}
    assert len(ids) == store.rows("SELECT count(*) AS n FROM sequences")[0]["n"]  # exactly one row per sequence
    store.close()


def test_drift_monitor_reports_the_config_push_over_http(service, client, model):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reports = f"{service['url']}/v1/drift/reports"
    for i in range(30):  # the pushed regime (previous test) needs min_sequences of its own
        client.completions.create(model=model, prompt=f"after the push {i}", max_tokens=8)
    deadline = time.time() + 90  # records flush within 10 s; the monitor looks every 2 s
    while True:
        rows = httpx.get(reports, params={"kind": "regime", "latest": "true"}, headers=headers, timeout=30).json()["data"]
        if rows and min(r["n_current"] for r in rows) >= 20 or time.time() > deadline:
            break
        time.sleep(1)
    assert rows, "the drift monitor wrote no regime comparison"
    assert {(r["metric"], r["test"]) for r in rows} >= {("mean_entropy", "ks"), ("log_perplexity", "cvm")}
    assert len({r["report_id"] for r in rows}) == 1 and all(r["baseline_regime"] != r["current_regime"] for r in rows)
    assert {r["verdict"] for r in rows} <= {"drift", "no_drift", "insufficient_data"}
    one = httpx.get(reports, params={"report_id": rows[0]["report_id"], "metric": "mean_entropy", "limit": 1},
                    headers=headers).json()["data"]
    assert len(one) == 1  # the report has two mean_entropy rows (ks, cvm): limit cut it to one
    assert {r["metric"] for r in one} == {"mean_entropy"}
    for params, field in (({"limit": 0}, "limit"), ({"kind": "bogus"}, "kind"), ({"since": "yesterday"}, "since"),
                          ({"latest": "maybe"}, "latest")):
        r = httpx.get(reports, params=params, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (params, r.text)
    assert httpx.get(reports).status_code == 401


def test_fault_injection_is_refused_unless_allowed(service):
    # on both engines: the replica refuses it before any engine sees the request (LLMServer.generate)
    r = httpx.post(f"{service['url']}/v1/completions", json={"prompt": "x", "softwatch": {"inject_fault": "nonfinite"}},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "softwatch.inject_fault"


def test_deploy_files_are_valid_serve_configs():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from softwatch.serve.app import args_from_config, build_app

    root = Path(__file__).parent.parent / "deploy"
    ServeDeploySchema.model_validate(yaml.safe_load((root / "serve.yaml").read_text()))
    args, http = args_from_config(str(root / "serve.yaml"))
    assert http == {"host": "127.0.0.1", "port": 8000}
    assert args["deployments"]["LLMServer"]["user_config"]["temperature"] == 0.7
    assert args["engine"] == "auto"
    build_app(args)  # every arg and deployment option is accepted
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterConfig"]
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    vllm_app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert vllm_app["args"]["engine"] == "vllm"
    llm_deployment = next(d for d in vllm_app["deployments"] if d["name"] == "LLMServer")
    assert llm_deployment["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ValueError, match="engine"):
        build_app({"engine": "tensorrt"})
    # who gets in: a key from a Secret on every pod, none in the Serve config; Ray's dashboard needs its token
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["args"]["require_api_key"] is True
    assert "api_key" not in serve_config["applications"][0]["args"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["SOFTWATCH_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "softwatch-api-key"
        assert pod["rayStartParams"].get("dashboard-host") != "0.0.0.0"
    assert cluster["authOptions"]["mode"] == "token"
    assert args["require_api_key"] is True
    with pytest.raises(ValueError, match="api_key must not be an application arg"):
        build_app({"api_key": "secret"})
    with pytest.raises(ValueError, match="unknown"):
        build_app({"modle": "typo"})
    with pytest.raises(ValueError, match="journal: must be an absolute path"):
        build_app({"journal": "softwatch-journal"})  # each node's process would resolve it elsewhere
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run .ci/install-prometheus"
    check = subprocess.run([promtool, "check", "config", str(root / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@SOFTWATCH_ONLY  # what it checks is the bench's pooling over rounds and variants: no engine's behaviour
def test_bench_serve_pools_every_rounds_requests_and_tokens(service, model):
    from softwatch.bench.serve import bench

    urls = {"softwatch": service["url"], "again": service["url"]}  # two variants, one service
    result = bench(urls, model, API_KEY, concurrencies=(1, 4), requests_per_client=2, max_tokens=4, rounds=2)
    for variant in urls:
        for c, phase in result["variants"][variant].items():
            assert phase["requests"] == int(c) * 2 * 2  # c clients x 2 requests x 2 rounds
            assert 0 < phase["tokens"] <= phase["requests"] * 4
            assert phase["ttft_p50_s"] <= phase["ttft_p99_s"] <= phase["latency_p99_s"]
            assert phase["token_latency_p50_s"] is not None  # some answer came in two text chunks or more
            assert 0 < phase["token_latency_p50_s"] <= phase["token_latency_p99_s"]
    # Seeded requests at T 0.7: both variants drew the same tokens.
    assert result["variants"]["softwatch"]["4"]["tokens"] == result["variants"]["again"]["4"]["tokens"]
    assert result["vllm_vs_softwatch"] is None and result["observer_overhead"] is None  # no vLLM variants
    assert len(result["per_round"]) == 2


def test_killing_a_replica_under_load_loses_no_completed_record(service, client, model):
    import os
    import signal
    import threading

    from ray import serve

    from softwatch.serve.app import APP_NAME

    llm = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
    victim = llm.info.remote().result()["pid"]
    answered, failed, stop = [], [], threading.Event()

    def load(worker):
        i = 0
        while not stop.is_set():
            try:
                r = client.completions.create(model=model, prompt=f"load {worker} {i}", max_tokens=6)
                answered.extend(r.model_extra["softwatch"]["request_ids"])
            except Exception as exc:  # noqa: BLE001 - requests on the killed replica fail
                failed.append(exc)
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    while len(answered) < 16:
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 180
    while time.time() < deadline:  # Serve starts a replacement (a vLLM one loads its engine: ~1 min)
        try:
            if llm.info.remote().result(timeout_s=10)["pid"] != victim:
                break
        except Exception:  # noqa: BLE001
            time.sleep(1)
    served_before = len(answered)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert len(answered) > served_before  # later requests succeed
    # a message and an id, never the exception text
    for exc in (e for e in failed if isinstance(e, openai.APIStatusError)):
        error = exc.response.json()["error"]
        assert exc.status_code >= 500 and error["id"] in error["message"], error
        assert "Error" not in error["message"] and "actor" not in error["message"].lower(), error
    after = client.completions.create(model=model, prompt="after the kill", max_tokens=3)
    assert after.choices

    wanted = set(answered)
    deadline = time.time() + 60
    store = Store(service["data"])
    while True:
        have = {r["request_id"] for r in store.rows("SELECT request_id FROM sequences")}
        if wanted <= have or time.time() > deadline:
            break
        time.sleep(1)
    assert not wanted - have, f"{len(wanted - have)} answered requests have no record"
    assert store.rows("SELECT count(*) AS n FROM tokens")[0]["n"] > 0  # the store stays readable


def test_the_engine_setting_picks_vllm_where_it_runs_the_model():
    from softwatch.vllm import resolve_engine

    assert resolve_engine("softwatch", "SmolLM2-135M-Instruct") == "softwatch"
    assert resolve_engine("auto", "tiny-random-3") == "softwatch"  # built in memory: softwatch's engine only
    assert resolve_engine("auto", "SmolLM2-135M-Instruct") == "vllm"  # make test installs vLLM
    with pytest.raises(ValueError, match="engine: vllm cannot run tiny-random"):
        resolve_engine("vllm", "tiny-random")
    with pytest.raises(ValueError, match="engine: must be one of"):
        resolve_engine("tgi")


def test_logprobs_zero_returns_the_sampled_tokens_logprob(client, model):
    r = client.completions.create(model=model, prompt="hello", max_tokens=4, logprobs=0, seed=1)
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and len(logprobs.token_logprobs) == len(logprobs.tokens) >= 1
    assert all(v <= 0 for v in logprobs.token_logprobs) and all(top == {} for top in logprobs.top_logprobs)
