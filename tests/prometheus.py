"""A real Prometheus server for tests (the Debian `prometheus` package; `.ci/run` installs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prometheus(config: str, workdir: Path, rule_files: list[str] = ()):
    """Start Prometheus on `config` (YAML text); yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not installed: run `.ci/install-prometheus` "
                    "(apt-get install prometheus) before the tests")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def file_sd_config(targets_dir: Path) -> str:
    """A Prometheus config scraping every softwatch process registered under `targets_dir`, each second."""
    return f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: softwatch
    file_sd_configs:
      - files: ["{targets_dir}/*.json"]
        refresh_interval: 1s
"""


def query(url: str, promql: str) -> list[dict]:
    """The result vector of an instant query."""
    body = urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10).read()
    reply = json.loads(body)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]
