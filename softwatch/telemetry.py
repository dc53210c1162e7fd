"""OpenTelemetry metrics of a softwatch process: sequence summaries as histograms, token and
logit counts as counters, drift as gauges.

Each `Telemetry` owns its MeterProvider (the global one belongs to the application). It
records once per finished sequence and adds token counts in bulk, never per token.
Exporters: OTLP (configured by the standard `OTEL_EXPORTER_OTLP_*` variables), Prometheus
(this process serves `/metrics` and registers itself in a `file_sd` targets file under the
data root, so one Prometheus finds every replica), an in-memory reader for tests, or none.
A process in a Ray cluster serves and registers on its Ray node's IP, the address other nodes
reach it at; outside Ray, on loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from .completion import Completion
from .host import pid_alive
from .records import RecordContext

log = logging.getLogger("softwatch.telemetry")

EXPORTERS = ("prometheus", "otlp", "memory", "none")
# Decoding parameters are per request: a client sending a new temperature each time would make
# a new label set each time. A process labels its first MAX_LABELED_REGIMES regimes exactly (the
# deployment's configured defaults come first: most traffic uses them) and every later one as
# CUSTOM; the records keep every request's exact parameters.
MAX_LABELED_REGIMES = 8
CUSTOM = "custom"
TARGETS_DIR = "prometheus/targets"  # under the data root

# Bucket upper bounds chosen per quantity, so that the quantiles a dashboard draws land
# where the quantity moves: perplexity is log-scaled, entropy is in nats (ln |V| ~ 11 for
# a 50k vocabulary), top_prob lives near 1 for confident models.
BUCKETS = {
    "softwatch.sequence.perplexity": (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0,
                                      128.0, 256.0, 1024.0),
    "softwatch.sequence.entropy": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0,
                                   8.0, 11.0),
    "softwatch.sequence.top_prob": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
    # the GenAI semantic conventions' advised boundaries
    "gen_ai.server.time_to_first_token": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                          2.5, 5.0, 7.5, 10.0),
    "gen_ai.server.time_per_output_token": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                            2.5),
    "gen_ai.server.request.duration": (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                                       40.96, 81.92),
}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


class Telemetry:
    def __init__(
        self,
        exporter: str = "none",
        *,
        instance_id: str | None = None,
        data_root: str | None = None,
        host: str | None = None,
        port: int = 0,
        export_interval_s: float = 10.0,
    ):
        if exporter not in EXPORTERS:
            raise ValueError(f"metrics exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
        self.exporter = exporter
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.endpoint: Endpoint | None = None
        self.reader: MetricReader | None = None
        self._server = None
        self._targets_file: str | None = None
        readers = []
        if exporter == "prometheus":
            readers.append(self._start_prometheus(host or node_address(), port, data_root))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(),
                                                         export_interval_millis=export_interval_s * 1000))
        elif exporter == "memory":
            readers.append(InMemoryMetricReader())
        self.reader = readers[0] if readers else None
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create({"service.name": "softwatch", "service.instance.id": self.instance_id}),
            exemplar_filter=AlwaysOffExemplarFilter(),
            views=[View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
                   for name, bounds in BUCKETS.items()],
            shutdown_on_exit=False,
        )
        meter = self.provider.get_meter("softwatch")
        self.perplexity = meter.create_histogram(
            "softwatch.sequence.perplexity", unit="1", description="Perplexity exp(-mean logprob) of a sequence")
        self.entropy = meter.create_histogram(
            "softwatch.sequence.entropy", unit="{nat}", description="Mean token entropy of a sequence")
        self.top_prob = meter.create_histogram(
            "softwatch.sequence.top_prob", unit="1", description="Mean top-1 probability of a sequence")
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to generate the first token")
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", description="Time per output token after the first")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Time from request to last token")
        self.tokens = meter.create_counter("softwatch.tokens", unit="{token}", description="Tokens processed")
        self.sequences = meter.create_counter(
            "softwatch.sequences", unit="{sequence}", description="Finished sequences by finish reason")
        self.nonfinite = meter.create_counter(
            "softwatch.logits.nonfinite", unit="{logit}", description="NaN or infinite logits seen while decoding")
        self.overflow = meter.create_counter(
            "softwatch.logits.overflow", unit="{logit}", description="Finite logits beyond the fp32 exp bound")
        self.drift_score = meter.create_gauge(
            "softwatch.drift.score", unit="1", description="Drift effect size of the latest comparison")
        self.drift_alarm = meter.create_gauge(
            "softwatch.drift.alarm", unit="1", description="1 while the latest comparison says drift, else 0")
        self._attributes: dict[tuple, dict] = {}
        self._labeled_params: set[str] = set()

    # ---- recording ----------------------------------------------------------------------------
    def record(self, completion: Completion, context: RecordContext) -> None:
        """One finished sequence: a handful of instrument calls whatever its length."""
        attrs = self._regime_attributes(completion.regime, context)
        s = completion.summary
        n = len(completion.token_ids)
        if s.get("perplexity") is not None and n:
            self.perplexity.record(s["perplexity"], attrs)
            self.entropy.record(s["mean_entropy"], attrs)
            self.top_prob.record(s["mean_top_prob"], attrs)
        if n:
            self.ttft.record(completion.ttft_s, attrs)
        if n > 1:
            self.tpot.record((completion.latency_s - completion.ttft_s) / (n - 1), attrs)
        self.duration.record(completion.latency_s, attrs)
        self.tokens.add(n, {**attrs, "gen_ai.token.type": "output"})
        self.tokens.add(completion.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.sequences.add(1, {**attrs, "finish_reason": completion.finish_reason})
        self.nonfinite.add(s.get("nonfinite", 0), attrs)
        self.overflow.add(s.get("overflow", 0), attrs)

    def set_drift(self, score: float, alarm: bool, attributes: dict) -> None:
        self.drift_score.set(score, attributes)
        self.drift_alarm.set(int(alarm), attributes)

    def _regime_attributes(self, regime: dict, context: RecordContext) -> dict:
        labeled = self._labels_params(regime["params_id"])
        key = (regime["model_id"], regime["model_rev"], regime["params_id"] if labeled else CUSTOM,
               context.deployment, context.replica)
        attrs = self._attributes.get(key)
        if attrs is None:
            attrs = self._attributes[key] = {
                "gen_ai.request.model": regime["model_id"],
                "model_rev": regime["model_rev"],
                "params_id": regime["params_id"] if labeled else CUSTOM,
                "temperature": float(regime["temperature"]) if labeled else CUSTOM,
                "top_p": float(regime["top_p"]) if labeled else CUSTOM,
                "top_k": int(regime["top_k"]) if labeled else CUSTOM,
                "deployment": context.deployment,
                "replica": context.replica,
            }
        return attrs

    def _labels_params(self, params_id: str) -> bool:
        """Whether this regime's decoding parameters get labels of their own (see MAX_LABELED_REGIMES)."""
        if params_id not in self._labeled_params and len(self._labeled_params) < MAX_LABELED_REGIMES:
            self._labeled_params.add(params_id)
        return params_id in self._labeled_params

    # ---- exporters ----------------------------------------------------------------------------
    def _start_prometheus(self, host: str, port: int, data_root: str | None) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=True)  # this process's, not prometheus_client's global
        reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False,
                                        resource_attribute_filter=lambda k: k == "service.instance.id")
        self._server, _ = start_http_server(port, addr=host, registry=registry)
        advertised = socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "") else host
        self.endpoint = Endpoint(advertised, self._server.server_port)
        if data_root:
            self._register_target(data_root)
        return reader

    def _register_target(self, data_root: str) -> None:
        if "://" in data_root:
            log.warning("softwatch: %s is not a local path; not registering a Prometheus file_sd target", data_root)
            return
        directory = os.path.join(data_root, TARGETS_DIR)
        os.makedirs(directory, exist_ok=True)
        _remove_dead_targets(directory)
        entry = [{"targets": [f"{self.endpoint.host}:{self.endpoint.port}"],
                  "labels": {"job": "softwatch", "host": socket.gethostname(), "pid": str(os.getpid())}}]
        path = os.path.join(directory, f"{_safe(self.instance_id)}.json")
        tmp = os.path.join(directory, f".{_safe(self.instance_id)}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)  # Prometheus never reads a half-written file
        self._targets_file = path

    def shutdown(self) -> None:
        """Export what is pending, stop serving `/metrics`, and deregister the target."""
        if self._targets_file:
            try:
                os.remove(self._targets_file)
            except FileNotFoundError:
                pass
            self._targets_file = None
        try:
            self.provider.shutdown()
        except Exception:  # an unreachable OTLP collector must not fail a shutdown
            log.exception("softwatch: metrics shutdown failed")
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def node_address() -> str:
    """The address other machines reach this process at: the IP of its Ray node when it runs
    in a Ray cluster (a replica, an actor, a connected driver), else loopback."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    if not ray.is_initialized():
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _remove_dead_targets(directory: str) -> None:
    """Drop the targets of processes on this host that died without deregistering."""
    here = socket.gethostname()
    for name in os.listdir(directory):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                labels = json.load(f)[0]["labels"]
            if labels.get("host") == here and not pid_alive(int(labels["pid"])):
                os.remove(path)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
