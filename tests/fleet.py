"""Worker nodes on this machine for a multi-node Ray cluster in tests.

A pytest process is one Ray driver, and a driver is connected to one cluster at a time: the
session cluster (`ray_cluster`, started by `ray.init`) is the fleet's head, and the worker
nodes join it with `ray start --address` on their own loopback addresses (all of 127.0.0.0/8
is local). Each node runs `ray start --block` in its own process group, so that killing the
group kills exactly that node (its raylet, its workers, its agents) and nothing else on the
machine; a SIGTERM stops it cleanly. Every port a node binds is chosen free here: the
defaults of two nodes on one machine collide. Each node has its own `--temp-dir`: `ray start`
records the cluster's address in its temp dir, and in the default /tmp/ray that record would
make every later `ray.init()` on this machine connect to this test cluster.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .prometheus import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@dataclass
class WorkerNode:
    ip: str
    process: subprocess.Popen
    log: Path
    temp_dir: str

    def kill(self) -> None:
        """The node dies at once, as a machine that loses power: SIGKILL to all its processes
        (its process group, frozen first, and every descendant, whatever group it moved to)."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_worker(gcs_address: str, ip: str, num_cpus: int, log_dir: Path) -> WorkerNode:
    log = log_dir / f"ray-node-{ip}.log"
    ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port")}
    temp_dir = tempfile.mkdtemp(prefix=f"ray-{ip}-", dir="/tmp")  # short: Ray's socket paths live under it
    with open(log, "w") as out:
        process = subprocess.Popen(
            [RAY, "start", f"--address={gcs_address}", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
             "--num-gpus=0", f"--temp-dir={temp_dir}", "--block", "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    return WorkerNode(ip, process, log, temp_dir)


def wait_for_nodes(ips: set[str], timeout_s: float = 120) -> None:
    """Until a live node of the cluster has each of `ips`."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        if ips <= alive:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes {sorted(ips - alive)} did not join the cluster (alive: {sorted(alive)})")
        time.sleep(0.2)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
