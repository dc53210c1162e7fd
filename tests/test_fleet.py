"""A fleet on one machine: the session cluster's head and two worker nodes (127.0.0.2 and
127.0.0.3, started with `ray start`; see tests/fleet.py), LLM replicas spread one per node, all
writing one data root (on one machine, the shared volume). Prometheus finds every replica
through file_sd alone, and a worker node killed under load loses no answered record."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import openai
import pytest

from softwatch.store import Store, wait_for_records
from softwatch.telemetry import TARGETS_DIR

from .conftest import API_KEY, TINY_SERVICE, serve_on
from .fleet import start_worker, wait_for_nodes
from .prometheus import file_sd_config, prometheus, query

WORKER_IPS = ("127.0.0.2", "127.0.0.3")
FLEET_SERVICE = {**TINY_SERVICE, "replicas": 2, "metrics": "prometheus",
                 "deployments": {"LLMServer": {"max_replicas_per_node": 1}}}


@pytest.fixture(scope="module")
def workers(ray_cluster, tmp_path_factory):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    log_dir = tmp_path_factory.mktemp("ray-nodes")
    nodes = {ip: start_worker(gcs, ip, num_cpus=1, log_dir=log_dir) for ip in WORKER_IPS}
    try:
        wait_for_nodes(set(WORKER_IPS))
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


@pytest.fixture(scope="module")
def fleet(workers, tmp_path_factory):
    # A proxy on the head only: every node's proxy would bind the same host:port on this one machine.
    yield from serve_on(tmp_path_factory, proxy_location="HeadOnly", **FLEET_SERVICE)


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=f"{fleet['url']}/v1", api_key=API_KEY, timeout=60, max_retries=3)


def replica_targets(data: str) -> dict[str, str]:
    """{replica id: its `host:port`} of the LLM replicas registered for Prometheus."""
    targets = {}
    for path in (Path(data) / TARGETS_DIR).glob("*.json"):
        if not path.name.startswith("drift-monitor"):
            targets[path.stem] = json.loads(path.read_text())[0]["targets"][0]
    return targets


def complete(client, model: str, marker: str) -> list[str]:
    r = client.completions.create(model=model, prompt=f"fleet {marker}", max_tokens=8)
    return r.model_extra["softwatch"]["request_ids"]


def test_replicas_on_several_nodes_are_scraped_through_discovery_and_write_one_dataset(fleet, client, tmp_path):
    import ray

    targets = replica_targets(fleet["data"])
    assert len(targets) == 2, targets
    node_ips = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    replica_ips = {address.rsplit(":", 1)[0] for address in targets.values()}
    assert replica_ips <= node_ips and len(replica_ips) == 2, (targets, node_ips)  # one per node, on its node's IP

    answered = []
    with ThreadPoolExecutor(8) as pool:
        for ids in pool.map(lambda i: complete(client, fleet["model"], f"spread {i}"), range(24)):
            answered += ids
    wait_for_records(fleet["data"], answered, timeout_s=60)
    store = Store(fleet["data"])
    by_replica = {r["replica"]: r["n"] for r in store.rows(
        "SELECT replica, count(*) AS n FROM sequences WHERE request_id IN (SELECT unnest($ids)) GROUP BY replica",
        {"ids": answered})}
    assert set(by_replica) == set(targets), by_replica  # every replica's records, in one dataset
    assert sum(by_replica.values()) == len(answered)

    # No static target: Prometheus knows the replicas only from the file_sd files they wrote.
    config = file_sd_config(Path(fleet["data"]) / TARGETS_DIR)
    assert "static_configs" not in config
    with prometheus(config, tmp_path / "prometheus") as url:
        deadline = time.time() + 60
        while True:
            up = {r["metric"]["instance"]: r["value"][1] for r in query(url, 'up{job="softwatch"}')}
            scraped = {r["metric"]["replica"]: r["metric"]["instance"]
                       for r in query(url, "sum by (replica, instance) (softwatch_sequences_total)")}
            if scraped == {replica: address for replica, address in targets.items()} or time.time() > deadline:
                break
            time.sleep(0.5)
    assert all(up.get(address) == "1" for address in targets.values()), up
    assert scraped == targets, scraped  # each replica's metrics, from the address its node's IP


def test_a_worker_node_killed_under_load_loses_no_answered_record(fleet, workers, client):
    before = replica_targets(fleet["data"])
    victim_ip = next(ip for ip in WORKER_IPS if any(a.startswith(f"{ip}:") for a in before.values()))
    answered, failed, killed = [], [], threading.Event()
    after_kill = []

    def request(i: int) -> None:
        try:
            ids = complete(client, fleet["model"], f"kill {i}")
        except openai.APIStatusError as exc:  # answered, but not 2xx: no record is promised
            failed.append(exc)
            return
        answered.extend(ids)
        if killed.is_set():
            after_kill.extend(ids)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(request, i) for i in range(64)]
        while len(answered) < 12 and not all(f.done() for f in futures):
            time.sleep(0.01)
        workers[victim_ip].kill()
        killed.set()
        done, pending = wait(futures, timeout=240)
    assert not pending, f"{len(pending)} requests hung"
    for future in done:
        future.result()  # anything but a clean HTTP answer (a timeout, a dropped connection) fails here
    assert len(answered) + len(failed) == 64
    assert after_kill, "no request was answered after the node died"
    for exc in failed:
        assert exc.status_code >= 500, exc

    deadline = time.time() + 120
    while True:  # Serve replaces the lost replica on a live node
        now = replica_targets(fleet["data"])
        moved = {r: a for r, a in now.items() if r not in before}
        if moved or time.time() > deadline:
            break
        time.sleep(1)
    assert moved and not any(a.startswith(f"{victim_ip}:") for a in moved.values()), now
    assert complete(client, fleet["model"], "after the kill")

    wait_for_records(fleet["data"], answered, timeout_s=60)
    rows = Store(fleet["data"]).rows(
        "SELECT request_id, count(*) AS n FROM sequences WHERE request_id IN (SELECT unnest($ids)) GROUP BY request_id",
        {"ids": answered})
    assert len(rows) == len(answered) and all(r["n"] == 1 for r in rows), \
        [r for r in rows if r["n"] != 1] or f"{len(answered) - len(rows)} answered requests have no record"
