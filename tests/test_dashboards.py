"""The Grafana dashboards: their structure (classic JSON model, provisioned datasource uid,
template variables) and, end to end against a real Prometheus scraping a real service, that
every panel query returns data and that the non-finite and drift alerts fire."""

import json
import re
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from softwatch.dashboards import expand, load, panel_queries, query

from .exported_metrics import is_ray_serve_metric, metric_names, unknown_metrics
from .prometheus import free_port, prometheus

ROOT = Path(__file__).parent.parent
DASHBOARDS = load(ROOT / "dashboards")
PANEL_TYPES = {"timeseries", "bargauge", "stat", "table"}


def _datasource_uid() -> str:
    (ds,) = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/softwatch.yml").read_text())["datasources"]
    return ds["uid"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name):
    d = DASHBOARDS[name]
    uid = _datasource_uid()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int) and "${DS_" not in json.dumps(d)
    variables = {v["name"] for v in d["templating"]["list"]}
    for v in d["templating"]["list"]:
        assert v["datasource"]["uid"] == uid and v["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 2
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES and p["datasource"]["uid"] == uid
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip()
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, (p["title"], used - variables)
    for a in d["annotations"]["list"][1:]:
        assert a["datasource"]["uid"] == uid and a["expr"]
    provider = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/softwatch.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_query_names_a_metric_that_softwatch_or_ray_serve_exports(name):
    d = DASHBOARDS[name]
    exprs = [(title, expr) for title, _, expr, _ in panel_queries(d)]
    exprs += [(a["name"], a["expr"]) for a in d["annotations"]["list"][1:]]
    unknown = {title: unknown_metrics(expr) for title, expr in exprs if unknown_metrics(expr)}
    assert not unknown, unknown


def test_overview_shows_ray_serve_requests_latency_queue_and_replica_health():
    ray_names = {n for _, _, expr, _ in panel_queries(DASHBOARDS["overview"]) for n in metric_names(expr)
                 if is_ray_serve_metric(n)}
    assert {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
            "ray_serve_deployment_queued_queries", "ray_serve_deployment_replica_healthy"} <= ray_names, ray_names


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory):
    """A service with the Prometheus exporter and fault injection on, and a Prometheus started
    from deploy/prometheus.yml with the alert rules, scraping it through file_sd, and Ray's own
    metrics."""
    from ray import serve

    from softwatch.serve.app import run

    data = tmp_path_factory.mktemp("e2e-data")
    port = free_port()
    args = {"model": "tiny-random", "data": str(data), "metrics": "prometheus", "num_cpus": 0.5, "max_batch": 16,
            "allow_fault_injection": True, "defaults": {"temperature": 0.0, "max_tokens": 8},
            "drift": {"interval_s": 2, "min_sequences": 20, "window": 20, "permutations": 999}}
    run(args, port=port)
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "deploy/prometheus/softwatch.rules.yml")]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(data / "prometheus/targets/*.json")]
    config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    config["scrape_configs"].append({"job_name": "ray-session", "static_configs": [{"targets": [_ray_metrics_target()]}]})
    try:
        with prometheus(yaml.safe_dump(config), tmp_path_factory.mktemp("prometheus")) as prom:
            yield {"url": f"http://127.0.0.1:{port}", "prometheus": prom, "args": args, "port": port, "data": data}
    finally:
        serve.shutdown()


def _ray_metrics_target() -> str:
    """Ray's metrics agent on the session cluster's node: Ray Serve's own metrics, for the Ray
    panels (a Ray started without its dashboard writes no service-discovery file)."""
    import ray

    return f"127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}"


def _complete(url: str, i: int, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": f"request number {i} about {i * 7}", **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_panels_return_data_and_alerts_fire(live):
    from concurrent.futures import ThreadPoolExecutor

    from softwatch.serve.app import run

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _complete(live["url"], i), range(40)))
        run({**live["args"], "defaults": {"temperature": 1.0, "max_tokens": 8}}, port=live["port"])  # config push
        list(pool.map(lambda i: _complete(live["url"], i), range(40, 80)))
    faulty = _complete(live["url"], 999, softwatch={"inject_fault": "nonfinite", "stats": True})
    assert faulty["choices"][0]["softwatch"]["summary"]["nonfinite"] > 0

    queries = [(name, *q) for name, d in DASHBOARDS.items() for q in panel_queries(d)]
    deadline = time.time() + 300  # a loaded 2-core CI machine: records, scrapes and monitor runs lag
    while True:
        empty = [(name, title, ref) for name, title, ref, expr, _ in queries
                 if not query(live["prometheus"], expand(expr, "1m", "10m"))]
        if not empty or time.time() > deadline:
            break
        time.sleep(2)
    assert not empty, f"panel queries with no series: {empty}"

    deadline = time.time() + 300  # the drift alarm must hold for 1m before it fires
    while True:
        with urllib.request.urlopen(f"{live['prometheus']}/api/v1/alerts", timeout=10) as r:
            alerts = json.loads(r.read())["data"]["alerts"]
        firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        if {"SoftwatchNonFiniteLogits", "SoftwatchDriftAlarm"} <= firing or time.time() > deadline:
            break
        time.sleep(2)
    assert {"SoftwatchNonFiniteLogits", "SoftwatchDriftAlarm"} <= firing, alerts
    assert "SoftwatchTargetDown" not in firing


def test_dashboard_snapshot_renders_every_dashboard(live, tmp_path):
    from softwatch.cli import main

    assert main(["dashboard-snapshot", "--prometheus", live["prometheus"], "--dashboards", str(ROOT / "dashboards"),
                 "--minutes", "5", "--out", str(tmp_path)]) == 0
    for name in DASHBOARDS:
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
