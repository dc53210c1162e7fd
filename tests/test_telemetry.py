import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from softwatch.completion import Completion
from softwatch.records import RecordContext
from softwatch.telemetry import BUCKETS, TARGETS_DIR, Telemetry, node_address

from .prometheus import file_sd_config, prometheus, query

REGIME = {"model_id": "m", "model_rev": "abc123", "params_id": "p1", "temperature": 0.7, "top_p": 0.9, "top_k": 0,
          "template_version": "v1"}
ATTRS = {"gen_ai.request.model": "m", "model_rev": "abc123", "params_id": "p1", "temperature": 0.7, "top_p": 0.9,
         "top_k": 0, "deployment": "dep", "replica": "r0"}


def completion(perplexity, entropy, top_prob, n=4, finish="stop", nonfinite=0, overflow=0, ttft=0.05, latency=0.35):
    return Completion(
        request_id="x", text="", token_ids=list(range(n)), prompt_tokens=10, finish_reason=finish,
        stats=torch.zeros(n, 10), regime=REGIME, created=0.0, ttft_s=ttft, latency_s=latency,
        summary={"perplexity": perplexity, "mean_entropy": entropy, "mean_top_prob": top_prob,
                 "nonfinite": nonfinite, "overflow": overflow},
    )


def metrics(telemetry: Telemetry) -> dict[str, list]:
    data = telemetry.reader.get_metrics_data()
    return {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics}


def bucket_of(value: float, bounds) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def test_in_memory_buckets_attributes_and_counts():
    t = Telemetry("memory", instance_id="proc-1")
    context = RecordContext(deployment="dep", replica="r0")
    seqs = [completion(1.1, 0.02, 0.99), completion(5.0, 2.2, 0.5, finish="length", nonfinite=3, overflow=2),
            completion(300.0, 9.0, 0.05, n=1, finish="error")]
    for c in seqs:
        t.record(c, context)
    t.set_drift(0.4, True, {"metric": "mean_entropy"})
    got = metrics(t)

    for name, field in (("softwatch.sequence.perplexity", "perplexity"), ("softwatch.sequence.entropy", "mean_entropy"),
                        ("softwatch.sequence.top_prob", "mean_top_prob")):
        (point,) = got[name]
        assert tuple(point.explicit_bounds) == BUCKETS[name]
        expected = [0] * (len(BUCKETS[name]) + 1)
        for c in seqs:
            expected[bucket_of(c.summary[field], BUCKETS[name])] += 1
        assert list(point.bucket_counts) == expected
        assert point.count == 3 and point.sum == pytest.approx(sum(c.summary[field] for c in seqs))
        assert dict(point.attributes) == ATTRS
        assert not point.exemplars

    (ttft,) = got["gen_ai.server.time_to_first_token"]
    assert tuple(ttft.explicit_bounds) == BUCKETS["gen_ai.server.time_to_first_token"] and ttft.count == 3
    (tpot,) = got["gen_ai.server.time_per_output_token"]
    assert tpot.count == 2 and tpot.sum == pytest.approx(2 * (0.35 - 0.05) / 3)  # the 1-token sequence has none
    (duration,) = got["gen_ai.server.request.duration"]
    assert duration.count == 3 and duration.sum == pytest.approx(3 * 0.35)

    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in got["softwatch.tokens"]}
    assert tokens == {"output": 9, "input": 30}
    assert all({k: v for k, v in p.attributes.items() if k != "gen_ai.token.type"} == ATTRS
               for p in got["softwatch.tokens"])
    assert {p.attributes["finish_reason"]: p.value for p in got["softwatch.sequences"]} == \
        {"stop": 1, "length": 1, "error": 1}
    assert [p.value for p in got["softwatch.logits.nonfinite"]] == [3]
    assert [p.value for p in got["softwatch.logits.overflow"]] == [2]
    assert [(dict(p.attributes), p.value) for p in got["softwatch.drift.score"]] == [({"metric": "mean_entropy"}, 0.4)]
    assert [p.value for p in got["softwatch.drift.alarm"]] == [1]
    resource = t.reader.get_metrics_data().resource_metrics[0].resource.attributes
    assert resource["service.instance.id"] == "proc-1"
    t.shutdown()


def test_providers_are_per_process_objects_not_the_global_one():
    from opentelemetry import metrics

    a, b = Telemetry("memory"), Telemetry("memory")
    a.record(completion(2.0, 1.0, 0.5), RecordContext())
    assert "softwatch.tokens" in metrics_names(a) and not metrics_names(b)
    assert metrics.get_meter_provider() not in (a.provider, b.provider)
    a.shutdown()
    b.shutdown()


def metrics_names(t: Telemetry) -> set[str]:
    data = t.reader.get_metrics_data()
    return {m.name for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics for m in sm.metrics}


def test_unknown_exporter_is_refused():
    with pytest.raises(ValueError, match="prometheus, otlp, memory, none"):
        Telemetry("statsd")


def test_prometheus_endpoint_registers_and_deregisters_its_target(tmp_path):
    t = Telemetry("prometheus", data_root=str(tmp_path))
    t.record(completion(2.0, 1.0, 0.5), RecordContext(replica="r0"))
    body = urllib.request.urlopen(t.endpoint.url, timeout=5).read().decode()
    assert "softwatch_sequence_perplexity_bucket{" in body and 'le="1.25"' in body
    (target,) = (tmp_path / TARGETS_DIR).glob("*.json")
    # the address it serves on: its Ray node's IP when this test process is a Ray driver, else loopback
    assert t.endpoint.host == node_address()
    assert json.loads(target.read_text())[0]["targets"] == [f"{t.endpoint.host}:{t.endpoint.port}"]
    t.shutdown()
    assert not list((tmp_path / TARGETS_DIR).glob("*.json"))


def test_a_dead_process_target_is_pruned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    directory = tmp_path / TARGETS_DIR
    directory.mkdir(parents=True)
    import socket

    (directory / "ghost.json").write_text(json.dumps(
        [{"targets": ["127.0.0.1:1"], "labels": {"host": socket.gethostname(), "pid": dead.stdout.strip()}}]))
    t = Telemetry("prometheus", data_root=str(tmp_path))
    assert not (directory / "ghost.json").exists()
    t.shutdown()


def test_real_prometheus_scrapes_two_processes_found_through_file_sd(tmp_path):
    script = str(Path(__file__).with_name("metrics_process.py"))
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path / "data"), f"replica-{i}"], stdout=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        urls = [p.stdout.readline().split()[1] for p in procs]
        exposed = urllib.request.urlopen(urls[0], timeout=5).read().decode()
        names = {line.split("{")[0].split(" ")[0] for line in exposed.splitlines()
                 if line.startswith(("softwatch_", "gen_ai_"))}
        assert len(names) >= 20
        config = file_sd_config(tmp_path / "data" / TARGETS_DIR)
        with prometheus(config, tmp_path / "prometheus") as url:
            deadline = time.time() + 90
            while True:
                seen = {}
                for r in query(url, 'count by (__name__, instance) ({__name__=~"softwatch_.*|gen_ai_.*"})'):
                    seen.setdefault(r["metric"]["__name__"], set()).add(r["metric"]["instance"])
                if all(len(seen.get(n, ())) == 2 for n in names) or time.time() > deadline:
                    break
                time.sleep(1)
            missing = {n: seen.get(n, set()) for n in names if len(seen.get(n, ())) != 2}
            assert not missing, f"series not scraped from both processes: {missing}"
            replicas = {r["metric"]["replica"] for r in query(url, "softwatch_tokens_total")}
            assert replicas == {"replica-0", "replica-1"}
            (total,) = query(url, 'sum(softwatch_tokens_total{gen_ai_token_type="output"})')
            assert float(total["value"][1]) == 2 * 5 * 256
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    assert not list((tmp_path / "data" / TARGETS_DIR).glob("*.json"))  # both deregistered on SIGTERM


def test_otlp_exporter_posts_to_the_configured_endpoint(monkeypatch):
    """A real OTLP/HTTP exchange: the SDK's exporter posts protobuf to a local receiver."""
    import http.server
    import threading

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    t = Telemetry("otlp", instance_id="otlp-proc", export_interval_s=60)
    t.record(completion(2.0, 1.0, 0.5), RecordContext(replica="r0"))
    t.shutdown()  # exports what is pending
    server.shutdown()
    assert received and received[0][0] == "/v1/metrics"
    request = ExportMetricsServiceRequest.FromString(received[0][1])
    (resource_metrics,) = request.resource_metrics
    resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
    assert resource["service.instance.id"] == "otlp-proc"
    names = {m.name for sm in resource_metrics.scope_metrics for m in sm.metrics}
    assert {"softwatch.sequence.perplexity", "softwatch.tokens", "gen_ai.server.request.duration"} <= names
