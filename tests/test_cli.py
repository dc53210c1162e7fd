import json
import math
import subprocess
import sys

import pytest

from softwatch.stats import FIELDS


def softwatch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "softwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_json_has_text_tokens_summary_and_regime():
    r = softwatch("generate", "hello", "--model", "tiny-random", "--max-tokens", "5", "--seed", "1",
                  "--temperature", "0.8", "--top-k", "50", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "summary", "regime"}
    assert len(out["tokens"]) == out["summary"]["generated_tokens"] <= 5
    assert set(out["tokens"][0]) == {"id", "text", *FIELDS}
    assert "".join(t["text"] for t in out["tokens"]) == out["text"]
    assert math.isfinite(out["summary"]["perplexity"])
    assert out["regime"]["model_id"] == "tiny-random-0" and out["regime"]["top_k"] == 50
    again = json.loads(softwatch("generate", "hello", "--model", "tiny-random", "--max-tokens", "5", "--seed", "1",
                                 "--temperature", "0.8", "--top-k", "50", "--json").stdout)
    assert again["text"] == out["text"]


def test_generate_prints_a_table():
    r = softwatch("generate", "hi", "--model", "tiny-random", "--max-tokens", "3", "--chat")
    assert r.returncode == 0, r.stderr
    assert "logprob" in r.stdout and "entropy" in r.stdout and "regime:" in r.stdout


def test_bad_input_gives_a_message_and_no_traceback():
    cases = [
        (["generate", "x", "--temperature", "-1"], "temperature"),
        (["generate", "x", "--top-p", "0"], "top_p"),
        (["generate", "x", "--top-k", "-2"], "top_k"),
        (["generate", "x", "--max-tokens", "0"], "max_tokens"),
        (["generate", "x", "--model", "tiny-random", "--max-tokens", "100000"], "context"),
        (["generate", "", "--model", "tiny-random"], "prompt"),
        (["generate", "x", "--model", "no-such/model"], "unknown model"),
    ]
    for args, expected in cases:
        r = softwatch(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_decode_reports_every_figure():
    r = softwatch("bench", "decode", "--model", "tiny-random", "--batch", "2", "--new-tokens", "4",
                  "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ["instrumented_tok_s", "plain_tok_s", "hf_generate_tok_s", "hf_scores_tok_s", "overhead_ratio",
                "vs_hf_ratio", "stats_ms", "naive_stats_ms", "one_read_ms", "device"]:
        assert key in out
    assert all(out[k] > 0 for k in ["instrumented_tok_s", "plain_tok_s", "stats_ms", "one_read_ms"])
    assert out["same_tokens"] is True  # greedy: the engines and transformers decoded the same tokens
    assert [s["shape"] for s in out["stats_shapes"]] == [[32, 259], [64, 128256]]


def test_bench_store_reports_its_keys(tmp_path):
    r = softwatch("bench", "store", "--rows", "20000", "--data", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows"] == 20000 // 256 * 256 and out["write_rows_per_s"] > 0 and out["query_s"] > 0
    assert out["query_groups"] >= 4  # every regime appears


def test_bench_telemetry_reports_fractions():
    r = softwatch("bench", "telemetry", "--model", "tiny-random", "--batch", "2", "--new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 0 < out["telemetry_fraction"] and 0 < out["records_fraction"]
    assert out["telemetry_us_per_sequence"] == pytest.approx(out["telemetry_fraction"] * out["decode_ms_per_sequence"] * 1e3)


def test_sql_formats_and_errors(tmp_path):
    r = softwatch("generate", "hi", "--model", "tiny-random", "--max-tokens", "3", "--data", str(tmp_path))
    assert r.returncode == 0, r.stderr
    table = softwatch("sql", "--data", str(tmp_path), "SELECT finish_reason, generated_tokens FROM sequences")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["finish_reason", "generated_tokens"]
    csv = softwatch("sql", "--data", str(tmp_path), "--csv", "SELECT count(*) AS n FROM tokens")
    assert csv.stdout.splitlines()[0] == '"n"' and int(csv.stdout.splitlines()[1]) >= 1
    bad = softwatch("sql", "--data", str(tmp_path), "SELECT nope FROM tokens")
    assert bad.returncode == 2 and bad.stderr.startswith("softwatch: error:") and "Traceback" not in bad.stderr


def test_compact_prints_a_summary(tmp_path):
    for _ in range(2):
        assert softwatch("generate", "hi", "--model", "tiny-random", "--max-tokens", "3", "--data",
                         str(tmp_path)).returncode == 0
    r = softwatch("compact", "--data", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "4 files -> 2" in r.stdout


def test_serve_starts_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    import signal
    import socket
    import threading

    import httpx

    from softwatch.store import Store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "softwatch.cli", "serve", "--model", "tiny-random", "--port",
                             str(port), "--data", str(data), "--api-key", "k", "--ray-address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not any(line.startswith("serving on") for line in lines):
            line = proc.stdout.readline()
            assert line, f"softwatch serve exited: {lines}"
            lines.append(line)
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        # keep reading: Ray forwards the replicas' output to the driver, and a full pipe would block it
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny-random-0", "prompt": "hi",
                       "max_tokens": 3}, headers={"Authorization": "Bearer k"}, timeout=120)
        assert r.status_code == 200, r.text
        assert list((data / "prometheus" / "targets").glob("*.json"))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    store = Store(str(data))
    assert store.rows("SELECT count(*) AS n FROM sequences")[0]["n"] == 1  # flushed on shutdown
    assert not list((data / "prometheus" / "targets").glob("*.json"))  # deregistered


@pytest.mark.parametrize("flag, value", [("--engines", "softwatch,tgi"), ("--concurrency", "8,0"),
                                         ("--concurrency", "eight")])
def test_bench_serve_names_a_bad_flag_before_starting_anything(flag, value):
    r = softwatch("bench", "serve", flag, value, timeout=60)
    assert r.returncode != 0 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_serve_ratios_are_taken_at_concurrency_8():
    from softwatch.bench.serve import _ratios

    summaries = {"softwatch": {1: {"tok_s": 5.0}, 8: {"tok_s": 40.0}}, "vllm": {8: {"tok_s": 60.0}},
                 "vllm_plain": {8: {"tok_s": 63.0}}}
    assert _ratios(summaries) == {"vllm_vs_softwatch": 1.5, "observer_overhead": 1.05}
    assert _ratios({"softwatch": summaries["softwatch"]}) == {"vllm_vs_softwatch": None, "observer_overhead": None}
