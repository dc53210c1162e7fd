"""The metric names a PromQL expression uses, and the names softwatch and Ray Serve really
export: softwatch's read from its own Prometheus endpoint, Ray Serve's from the installed Ray's
source (its metric definitions, with the names Ray's exporter gives them). A dashboard or alert
that names anything else shows nothing, silently."""

import re
import urllib.request
from functools import cache
from pathlib import Path

from softwatch.records import RecordContext
from softwatch.telemetry import Telemetry

from .test_telemetry import completion

PROMETHEUS_SERIES = {"up"}  # series Prometheus itself writes for every target
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_DEFINITION = re.compile(r'\b(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?f?"(serve_[^"]+)"')
# Ray's exporter prefixes `ray_`, gives a counter the `_total` suffix unless it has one, and a
# histogram its _bucket/_sum/_count series.
_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)  # identifiers that are not calls
    return {n for n in names if n not in _KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", n)}


@cache
def softwatch_metrics() -> frozenset[str]:
    """Every series name on a softwatch process's /metrics once it recorded a sequence and a drift
    comparison."""
    telemetry = Telemetry("prometheus")
    try:
        telemetry.record(completion(2.0, 1.0, 0.5), RecordContext(replica="r0"))
        telemetry.set_drift(0.2, True, {"kind": "window", "current_regime": "m@r/p"})
        body = urllib.request.urlopen(telemetry.endpoint.url, timeout=5).read().decode()
    finally:
        telemetry.shutdown()
    return frozenset(re.match(r"[\w:]+", line).group(0) for line in body.splitlines()
                     if line and not line.startswith("#"))


@cache
def ray_serve_metric_patterns() -> tuple[re.Pattern, ...]:
    """The exported names of every metric Ray Serve defines, as patterns (a name built with a
    placeholder, e.g. the proxy's per-protocol `serve_num_{protocol_name}_requests`, matches any word)."""
    import ray.serve

    patterns = set()
    for source in Path(ray.serve.__file__).parent.rglob("*.py"):
        for kind, name in _DEFINITION.findall(source.read_text()):
            base = "ray_" + re.escape(name).replace(r"\{", "{").replace(r"\}", "}")
            base = re.sub(r"\{[^}]*\}", "[a-z]+", base)
            for suffix in _SUFFIXES[kind]:
                patterns.add(base if kind == "Counter" and name.endswith("_total") else base + suffix)
    return tuple(re.compile(p) for p in sorted(patterns))


def is_ray_serve_metric(name: str) -> bool:
    return any(p.fullmatch(name) for p in ray_serve_metric_patterns())


def unknown_metrics(expr: str) -> set[str]:
    """The names in `expr` that neither softwatch, Ray Serve nor Prometheus export."""
    return {n for n in metric_names(expr)
            if n not in softwatch_metrics() and n not in PROMETHEUS_SERIES and not is_ray_serve_metric(n)}
