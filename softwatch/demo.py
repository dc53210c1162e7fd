"""`softwatch demo`: the whole story on one machine — serve the default model, send varied
traffic, push a temperature change halfway, let the drift monitor catch it, and show where
everything went."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .prompts import prompt_set

SQL_EXAMPLES = [
    ("Sequences, perplexity and entropy per regime",
     "SELECT params_id, temperature, count(*) AS sequences, round(avg(perplexity), 3) AS mean_perplexity, "
     "round(avg(mean_entropy), 3) AS mean_entropy FROM sequences GROUP BY ALL ORDER BY min(ts)"),
    ("The least confident tokens (lowest top-1 probability)",
     "SELECT request_id, position, token_id, round(top_prob, 4) AS top_prob, round(entropy, 3) AS entropy, params_id "
     "FROM tokens ORDER BY top_prob LIMIT 5"),
    ("The drift verdicts of the report above",
     "SELECT kind, metric, test, round(p_value, 4) AS p_value, round(effect_size, 3) AS effect_size, verdict "
     "FROM drift_reports WHERE report_id = '{report_id}' AND kind = 'regime' AND test = 'cvm' ORDER BY metric"),
]


@dataclass
class DemoOptions:
    model: str = "SmolLM2-135M-Instruct"
    engine: str = "auto"
    data: str = "softwatch-demo-data"
    requests: int = 200  # in all, half before the config push and half after
    concurrency: int = 8
    max_tokens: int = 48
    port: int = 8000
    keep_running: bool = False


def say(message: str) -> None:
    print(f"softwatch demo: {message}", flush=True)


def fail(message: str, fix: str) -> int:
    print(f"softwatch demo: FAILED: {message}\n  how to fix: {fix}", file=sys.stderr, flush=True)
    return 1


def run(opts: DemoOptions) -> int:
    import ray
    from ray import serve

    from .cli import format_table
    from .drift.monitor import Monitor
    from .drift.report import render
    from .serve.app import APP_NAME
    from .serve.app import run as deploy
    from .store import Store, wait_for_records
    from .vllm import resolve_engine

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the demo narrates its own steps
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT was inherited as ignored
    os.makedirs(opts.data, exist_ok=True)
    data = os.path.abspath(opts.data)
    half = max(1, opts.requests // 2)
    say(f"starting a local Ray cluster ({os.cpu_count()} CPUs)")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        engine = resolve_engine(opts.engine, opts.model)
        say(f"deploying the Serve app on {opts.model}, decoded by "
            f"{'vLLM with the softwatch observer' if engine == 'vllm' else 'softwatch engine'} "
            "(the first run converts the model once, ~30 s)")
        args = {"engine": engine, "model": opts.model, "data": data, "metrics": "prometheus", "max_batch": 32,
                "num_cpus": 1, "defaults": {"temperature": 0.7, "max_tokens": opts.max_tokens},
                "drift": {"interval_s": 5, "min_sequences": min(100, max(20, half - 10)), "window": max(20, half // 2),
                          "permutations": 2999}}
        try:
            deploy(args, port=opts.port)
        except Exception as exc:  # Serve reports a failed replica start as a generic error
            return fail(f"the service did not start: {exc}",
                        f"is port {opts.port} free (--port)? Is the model name right? See /tmp/ray/session_latest/logs")
        url = f"http://127.0.0.1:{opts.port}"
        say(f"serving at {url}/v1 (OpenAI-compatible)")

        prompts = prompt_set()
        say(f"sending {half} requests at temperature 0.7 from {len(prompts)} built-in prompts "
            f"({opts.concurrency} clients at a time)")
        answered = _traffic(url, prompts, range(half), opts)
        if answered is None:
            return fail("requests failed", "see the error above; the service log is in /tmp/ray/session_latest/logs")
        say("pushing a config change: temperature 0.7 -> 1.0 (a new user_config, no restart)")
        deploy({**args, "defaults": {"temperature": 1.0, "max_tokens": opts.max_tokens}}, port=opts.port)
        say(f"sending {half} more requests at the new temperature")
        more = _traffic(url, prompts, range(half, 2 * half), opts)
        if more is None:
            return fail("requests failed after the config push", "see the error above")

        say(f"waiting until the records of all {len(answered + more)} answered requests are in Parquet")
        wait_for_records(data, answered + more, timeout_s=120)
        say("the drift monitor compares the two regimes")
        monitor_handle = serve.get_deployment_handle("DriftMonitor", app_name=APP_NAME)
        report_id, rows = _verdict(url, monitor_handle)
        if not rows:
            return fail("the drift monitor wrote no regime comparison",
                        "send more requests (--requests) so both regimes have enough sequences")
        verdict = "drift" if any(r["verdict"] == "drift" for r in rows) else rows[0]["verdict"]
        print()
        print(_verdict_table(rows))
        print(f"\nverdict for the temperature push: {verdict.upper()}\n")

        report = os.path.join(data, "report.html")
        monitor = Monitor(data)
        render(monitor, report)
        monitor.close()
        metrics_urls = _metrics_endpoints(data)
        say(f"HTML report:      {report}")
        say(f"Parquet data:     {data}  ({_count_files(data)} files)")
        for endpoint in metrics_urls:
            with urllib.request.urlopen(endpoint, timeout=10) as r:
                body = r.read().decode()
            series = sum(1 for line in body.splitlines() if line.startswith(("softwatch_", "gen_ai_")))
            say(f"metrics endpoint: {endpoint}  ({len(body)} bytes, {series} softwatch series)")
        if not metrics_urls:
            return fail("no metrics endpoint registered", "check that the metrics exporter started (see the logs)")
        say(f"drift reports:    {url}/v1/drift/reports?latest=true")
        store = Store(data)
        for title, sql in SQL_EXAMPLES:
            sql = sql.format(report_id=report_id)
            print(f"\n-- {title}\n$ softwatch sql --data {opts.data} \"{sql}\"")
            print(format_table(store.query(sql)))
        print()
        if opts.keep_running:
            say("--keep-running: the service stays up; press Ctrl-C to stop")
            while True:
                time.sleep(1)
        return 0 if verdict == "drift" else fail(f"the verdict was {verdict}, not drift",
                                                 "more requests per side (--requests) give the tests more power")
    except KeyboardInterrupt:
        return 0
    finally:
        say("shutting down (finishing in-flight requests, flushing records)")
        # deleting the app drains its replicas; stopping Serve's controller itself while this
        # process still polls it (through the monitor's handle) makes Ray print task errors
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _traffic(url: str, prompts: list[str], indices: range, opts: DemoOptions) -> list[str] | None:
    """Send the requests; the record ids of the answered ones, or None when any failed."""
    started = time.perf_counter()
    done = [0]
    errors: list[str] = []
    record_ids: list[str] = []

    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": opts.max_tokens,
                "seed": i}
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                record_ids.extend(json.loads(r.read())["softwatch"]["request_ids"])
        except Exception as exc:
            errors.append(f"request {i}: {exc}")
        done[0] += 1
        _bar(done[0], len(indices), started)

    with ThreadPoolExecutor(opts.concurrency) as pool:
        list(pool.map(one, indices))
    print(file=sys.stderr)
    for e in errors[:3]:
        print(f"  {e}", file=sys.stderr)
    return None if errors else record_ids


def _bar(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total)
    elapsed = time.perf_counter() - started
    left = elapsed / done * (total - done) if done else 0
    print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests, {elapsed:.0f} s, ~{left:.0f} s left",
          end="", file=sys.stderr, flush=True)


def _verdict(url: str, monitor_handle) -> tuple[str | None, list[dict]]:
    """Run the drift monitor now, on every record; its report id and regime comparison rows."""
    run = monitor_handle.run_now.remote().result(timeout_s=300)
    if run is None:
        return None, []
    query = urllib.parse.urlencode({"kind": "regime", "report_id": run["report_id"]})
    with urllib.request.urlopen(f"{url}/v1/drift/reports?{query}", timeout=30) as r:
        return run["report_id"], json.loads(r.read())["data"]


def _verdict_table(rows: list[dict]) -> str:
    import pyarrow as pa

    from .cli import format_table

    keep = ["metric", "test", "statistic", "p_value", "effect_size", "n_baseline", "n_current", "verdict"]
    rows = sorted(rows, key=lambda r: (r["metric"], r["test"]))
    return format_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in rows]))


def _metrics_endpoints(data: str) -> list[str]:
    urls = []
    for path in glob.glob(os.path.join(data, "prometheus", "targets", "*.json")):
        with open(path) as f:
            for group in json.load(f):
                urls += [f"http://{t}/metrics" for t in group["targets"]]
    return sorted(urls)


def _count_files(data: str) -> int:
    return len(glob.glob(os.path.join(data, "*", "dt=*", "*.parquet")))
