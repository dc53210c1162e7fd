"""The LLM deployment's autoscaling under a load ramp: replicas are added and removed, every
record names a replica Serve ran while it was served, and the drift monitor does not take the
scale-out for drift."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from softwatch.drift.monitor import Monitor, MonitorConfig
from softwatch.serve.app import APP_NAME
from softwatch.store import Store, journal_dir, wait_for_records

from .conftest import API_KEY, TINY_SERVICE, serve_on

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# Ray's defaults wait 30 s to add a replica and 10 min to remove one, over a 30 s look-back.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 1,
               "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
WINDOW = 60  # sequences per side of the window comparison: the single-replica phase gives this many
PROMPTS = [f"Tell me about topic {i}." for i in range(12)]  # one traffic mix for the whole ramp
REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#LLMServer#"
# Ray deprecates `metrics_interval_s` in favour of process-wide variables, yet still pushes the
# handles' metrics every 10 s without it: too slow to see a burst here.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    args = {**TINY_SERVICE, "engine": "softwatch", "num_cpus": 0.25, "defaults": {"temperature": 0.7, "max_tokens": 24},
            "journal": str(tmp_path_factory.mktemp("shared-journal")),  # where every replica journals
            "drift": {"interval_s": 3600},  # the test runs the monitor itself, once the ramp is over
            "deployments": {"LLMServer": {"autoscaling_config": AUTOSCALING}}}
    yield from serve_on(tmp_path_factory, **args)


class ReplicaWatch:
    """Polls Serve for the LLM replicas: when each replica id was first and last seen alive, and
    how many replicas ran."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.seen: dict[str, list[float]] = {}  # replica id -> [first seen, last seen] (unix time)
        self.running: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["name"].startswith(REPLICA_PREFIX):
                    self.seen.setdefault(actor["name"][len(REPLICA_PREFIX):], [now, now])[1] = now
            self.running.append(self.replicas_running())
            self._stop.wait(self.interval_s)

    @staticmethod
    def replicas_running() -> int:
        deployment = serve.status().applications[APP_NAME].deployments["LLMServer"]
        return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self.running[-1] if self.running else 0):
            assert time.monotonic() < deadline, f"{what} within {timeout_s} s (replicas running: {self.running[-20:]})"
            time.sleep(0.2)


def test_autoscaling_ramp_keeps_replica_labels_and_raises_no_drift(service):
    rng = random.Random(0)
    answered: list[str] = []  # request ids
    client = httpx.Client(base_url=service["url"], headers=HEADERS, timeout=120)

    def ask() -> None:
        r = client.post("/v1/completions", json={"model": service["model"], "prompt": rng.choice(PROMPTS)})
        r.raise_for_status()
        answered.extend(r.json()["softwatch"]["request_ids"])

    def load(clients: int, until) -> None:
        def worker():
            while not until():
                ask()

        with ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(worker) for _ in range(clients)]:
                f.result()

    with ReplicaWatch() as watch:
        load(1, lambda: len(answered) >= WINDOW)  # one client: one replica is enough
        assert max(watch.running) == 1, watch.running
        scaled_out_at: list[tuple[float, int]] = []  # (when, requests answered by then)
        give_up = time.monotonic() + 90

        def served_a_while_after_scale_out() -> bool:
            """A window's worth of answers, over 4 s at least, once a second replica runs."""
            if not scaled_out_at and watch.running[-1] >= 2:
                scaled_out_at.append((time.time(), len(answered)))
            assert time.monotonic() < give_up, f"no scale-out under load (replicas running: {watch.running[-20:]})"
            return bool(scaled_out_at) and time.time() - scaled_out_at[0][0] > 4 and \
                len(answered) - scaled_out_at[0][1] >= WINDOW

        load(12, served_a_while_after_scale_out)  # a burst: Serve adds replicas
        watch.wait_for(lambda n: n == 1, 60, "the idle deployment scaled back to one replica")
    client.close()

    wait_for_records(service["data"], answered)
    journal = Path(journal_dir(service["data"], service["args"]["journal"]))
    assert journal.is_dir()  # the replicas journaled there (their segments are deleted once flushed)
    store = Store(service["data"])
    rows = store.rows("SELECT request_id, replica, ts FROM sequences ORDER BY ts")
    assert sorted(r["request_id"] for r in rows) == sorted(answered)  # every answer recorded once, nothing else
    served_by = {r["replica"] for r in rows}
    assert len(served_by) >= 2, served_by  # the replicas added served traffic
    slack_s = 2.0  # the poll's interval and the record's finish time vs the replica's last poll
    for r in rows:
        assert r["replica"] in watch.seen, (r, sorted(watch.seen))
        first, last = watch.seen[r["replica"]]
        assert first - slack_s <= r["ts"].timestamp() <= last + slack_s, (r, first, last)

    monitor = Monitor(service["data"], MonitorConfig(window=WINDOW, min_sequences=WINDOW, permutations=999))
    assert len(monitor.regimes()) == 1  # replicas come and go inside one regime
    # the window comparison spans the scale-out: its baseline is the first replica's alone
    assert len({r["replica"] for r in rows[:WINDOW]}) == 1 and len({r["replica"] for r in rows[-WINDOW:]}) >= 2
    report = monitor.run()
    compared = [r for r in report.rows if r["kind"] in ("window", "regime")]
    # repetition is defined from 4 generated tokens on: a sequence that stopped sooner has none
    defined = [r for r in compared if r["metric"] != "repetition"]
    assert defined and all(r["kind"] == "window" and r["n_baseline"] == WINDOW for r in defined), defined
    drifted = [(r["kind"], r["metric"], r["test"], r["p_value"]) for r in report.rows if r["verdict"] == "drift"]
    assert not drifted, drifted  # nor on any replica: the replicas added serve what the first one did
    assert {r["verdict"] for r in defined} == {"no_drift"}
