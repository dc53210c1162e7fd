"""`softwatch bench monitor`: the cost of one drift monitor run over a large store.

Synthetic `sequences` rows (REGIMES regimes one after the other over one day, REPLICAS
writers whose files overlap in time, FILE_ROWS rows a file, prompt keys drawn from a pool)
are written straight into the dataset's layout with the store's own Parquet writer, and
cached: a rerun only links the cached files into a scratch root. Generation is not measured.

Then, each in a fresh process (so its peak RSS is its own): the first monitor run over the
store (it builds the regime index and the online detectors' state), then, after a minute of
new traffic is added, the run every later interval makes. `run_s` and `peak_rss_mb` are the
later run's; `first_run_s` and `first_peak_rss_mb` the first's. Peak RSS is the process's
VmHWM (from /proc), imports included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REGIMES = 5
REPLICAS = 4
FILE_ROWS = 250_000
PROMPTS = 50_000
START_US = 1_795_046_400_000_000  # 2026-11-18 00:00 UTC
DAY_US = 86_400_000_000
LAYOUT_VERSION = "2"


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTWATCH_CACHE", Path.home() / ".cache" / "softwatch")) / "bench-monitor"


def run(sequences: int, new: int | None = None, cache: str | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda message: None)
    if sequences < 2_000:
        raise ValueError(f"--sequences must be >= 2000 (each of {REGIMES} regimes needs a few hundred), got {sequences}")
    new = max(100, sequences // 1440) if new is None else new  # a minute of the day's traffic
    if new < 1:
        raise ValueError(f"--new must be >= 1, got {new}")
    base = Path(cache) if cache else cache_dir()
    data = base / f"sequences-{sequences}-v{LAYOUT_VERSION}"
    if not (data / "complete.json").exists():
        say(f"generating {sequences:,} synthetic sequences into {data} (cached for later runs)")
        started = time.perf_counter()
        generate(data, sequences)
        say(f"  generated in {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory(prefix="softwatch-bench-monitor-", dir=base) as root:
        _link_tree(data / "sequences", Path(root) / "sequences")
        say("first run: builds the regime index and the online detectors' state")
        first = _measure(root)
        _write_new(Path(root), sequences, new)
        say(f"added {new:,} new sequences; the run every later interval makes")
        later = _measure(root)
    return {
        "sequences": later["sequences"],
        "sequences_generated": sequences,
        "new_sequences": new,
        "regimes": later["regimes"],
        "files": later["files"],
        "run_s": later["run_s"],
        "peak_rss_mb": later["peak_rss_mb"],
        "first_run_s": first["run_s"],
        "first_peak_rss_mb": first["peak_rss_mb"],
        "verdict": later["verdict"],
        "report_rows": later["rows"],
        "online_sequences_fed": later["online_fed"] - first["online_fed"],
        "cpus": os.cpu_count(),
    }


def _measure(root: str) -> dict:
    """One Monitor.run() in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "softwatch.bench.monitor", root], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measured monitor run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(root: str) -> None:
    from ..drift.monitor import Monitor, OnlineState

    monitor = Monitor(root)
    started = time.perf_counter()
    report = monitor.run()
    run_s = time.perf_counter() - started
    peak = _vm_hwm_mb()
    regimes = monitor.regimes()
    state = OnlineState.load(monitor.index.fs, monitor.index.path)
    fed = sum(watch.get("sequences_fed", 0) for watch in state.regimes.values())
    monitor.close()
    print(json.dumps({"run_s": run_s, "peak_rss_mb": peak, "sequences": sum(r["sequences"] for r in regimes),
                      "regimes": len(regimes), "files": len(set(monitor.index.table["file"].to_pylist())),
                      "verdict": report.verdict, "rows": len(report.rows), "online_fed": fed}))


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- synthetic data -----------------------------------------------------------------------------
def generate(data: Path, sequences: int, seed: int = 0) -> None:
    """`sequences` rows spread evenly over one day, in files of FILE_ROWS rows, each file one
    replica's contiguous stretch (replicas take turns sequence by sequence, so files overlap in
    time), in the store's layout and written by its writer."""
    from ..store import _write_parquet
    import pyarrow.fs as pafs

    if data.exists():
        shutil.rmtree(data)
    fs = pafs.LocalFileSystem()
    directory = data / "sequences" / "dt=2026-11-18"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pool = pa.array([f"{k:016x}" for k in rng.integers(0, 2**63, PROMPTS)], pa.string())
    n_file = 0
    for replica in range(REPLICAS):
        mine = np.arange(replica, sequences, REPLICAS)
        for start in range(0, len(mine), FILE_ROWS):
            index = mine[start:start + FILE_ROWS]
            table = _rows(index, sequences, replica, pool, rng)
            _write_parquet(fs, table, str(directory / f"part-bench-r{replica}-{n_file:06d}.parquet"))
            n_file += 1
    (data / "complete.json").write_text(json.dumps({"sequences": sequences, "files": n_file}))


def _rows(index: np.ndarray, total: int, replica: int, pool: pa.Array, rng: np.random.Generator) -> pa.Table:
    from ..records import SEQUENCES

    n = len(index)
    regime = (index * REGIMES) // total
    ts = START_US + (index * (DAY_US // total))
    tokens = rng.integers(8, 512, n).astype(np.int32)
    temperature = np.array([0.6, 0.7, 0.8, 0.7, 0.9])[regime]
    entropy = rng.gamma(4, 0.4, n) * (0.8 + 0.25 * temperature)
    top = np.clip(0.7 - 0.1 * entropy + rng.normal(0, 0.05, n), 0, 1)
    ids = pc.binary_join_element_wise("bench-", pc.cast(pa.array(index), pa.string()), "")
    keys = pool.take(pa.array(rng.zipf(1.3, n) % len(pool)))
    strings = lambda values: pa.array(values, pa.string()).take(pa.array(regime))  # noqa: E731
    columns = {
        "ts": pa.array(ts).view(pa.timestamp("us", tz="UTC")),
        "created": pa.array(ts - 2_000_000).view(pa.timestamp("us", tz="UTC")),
        "request_id": ids, "prompt_tokens": pa.array(rng.integers(16, 2048, n).astype(np.int32)),
        "prompt_key": keys, "generated_tokens": pa.array(tokens),
        "finish_reason": pa.array(np.where(rng.random(n) < 0.8, "stop", "length")),
        "repetition": pa.array(rng.beta(1, 12, n)),
        "ttft_s": pa.array(rng.gamma(2, 0.03, n)), "latency_s": pa.array(tokens * 0.02 + rng.gamma(2, 0.05, n)),
        "perplexity": pa.array(np.exp(entropy * 0.8 + rng.normal(0, 0.1, n))),
        "sampling_perplexity": pa.array(np.exp(entropy * 0.7)),
        "mean_entropy": pa.array(entropy), "max_entropy": pa.array(entropy * 2 + rng.gamma(1, 0.2, n)),
        "mean_sampling_entropy": pa.array(entropy * temperature), "mean_top_prob": pa.array(top),
        "min_top_prob": pa.array(top * rng.random(n)), "p10_top_prob": pa.array(np.clip(top - 0.3, 0, 1)),
        "mean_margin": pa.array(top * 0.5), "nonfinite": pa.array(np.zeros(n, np.int64)),
        "overflow": pa.array(rng.poisson(0.0005 * tokens).astype(np.int64)),
        "tokens_kept": pa.array(np.ones(n, bool)), "prompt": pa.nulls(n, pa.string()), "text": pa.nulls(n, pa.string()),
        "model_id": pa.array(["bench-model"] * n), "model_rev": strings([f"rev{r // 2}" for r in range(REGIMES)]),
        "params_id": strings([f"params{r}" for r in range(REGIMES)]),
        "temperature": pa.array(temperature), "top_p": pa.array(np.full(n, 0.95)),
        "top_k": pa.array(np.zeros(n, np.int32)), "template_version": pa.array(["v1"] * n),
        "deployment": pa.array(["bench"] * n), "replica": pa.array([f"bench-{replica}"] * n),
        "params_source": pa.array(["deployment"] * n),
    }
    return pa.Table.from_pydict(columns, schema=SEQUENCES)


def _write_new(root: Path, total: int, new: int) -> None:
    """A minute of new traffic in the newest regime, as one writer's flush would add it."""
    from ..store import _write_parquet
    import pyarrow.fs as pafs

    rng = np.random.default_rng(1)
    pool = pa.array([f"{k:016x}" for k in rng.integers(0, 2**63, PROMPTS)], pa.string())
    index = np.arange(total, total + new)
    table = _rows(np.minimum(index, total - 1), total, 0, pool, rng)
    ts = START_US + DAY_US + np.arange(new) * 1000  # after everything written so far
    table = table.set_column(0, "ts", pa.array(ts).view(pa.timestamp("us", tz="UTC")))
    table = table.set_column(2, "request_id", pc.binary_join_element_wise("bench-new-", pc.cast(pa.array(index),
                                                                                                 pa.string()), ""))
    directory = root / "sequences" / "dt=2026-11-19"
    directory.mkdir(parents=True, exist_ok=True)
    _write_parquet(pafs.LocalFileSystem(), table, str(directory / "part-bench-new-000000.parquet"))


def _link_tree(source: Path, target: Path) -> None:
    for path in source.rglob("*.parquet"):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)


if __name__ == "__main__":
    _child(sys.argv[1])
