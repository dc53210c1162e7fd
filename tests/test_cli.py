import json
import math
import subprocess
import sys

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
    assert [s["shape"] for s in out["stats_shapes"]] == [[32, 259], [64, 128256]]
