"""Length-aware drift metrics: generated tokens, the finish-reason mix and repetition, from the
record path to the monitor's comparisons."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq

from softwatch.completion import Completion, prompt_key
from softwatch.drift import twosample
from softwatch.drift.monitor import LENGTH_METRICS, Filter, Monitor, MonitorConfig
from softwatch.records import SEQUENCES, RecordContext, rows_table, sequence_row
from softwatch.store import ParquetSink

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
REGIME = {"model_id": "m", "model_rev": "r1", "params_id": "p", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
          "template_version": "v1"}


def seq_rep(ids: list[int], n: int = 4) -> float:
    """1 - distinct n-grams / n-grams, recomputed independently with numpy in float64."""
    if len(ids) < n:
        return float("nan")
    grams = np.lib.stride_tricks.sliding_window_view(np.asarray(ids, np.int64), n)
    return np.float64(1.0) - np.float64(len(np.unique(grams, axis=0))) / np.float64(len(grams))


def completions(g: np.random.Generator, n: int, start: datetime) -> list[Completion]:
    out = []
    for i in range(n):
        length = int(g.integers(1, 40))
        if i % 3 == 0:  # a degenerate loop of a short cycle
            cycle = g.integers(0, 50, int(g.integers(1, 5))).tolist()
            ids = (cycle * 40)[:length]
        else:
            ids = g.integers(0, 30, length).tolist()
        out.append(Completion(request_id=f"c{i}", text="", token_ids=ids, prompt_tokens=5,
                              finish_reason=str(g.choice(["stop", "length", "error", "cancelled"])), stats=None,
                              summary={}, regime=REGIME, created=(start + timedelta(seconds=i)).timestamp(),
                              ttft_s=0.01, latency_s=0.5, prompt_key=prompt_key([i % 7])))
    return out


def test_length_metrics_equal_an_independent_recomputation_and_old_files_read_as_null(tmp_path):
    g = np.random.default_rng(3)
    written = completions(g, 300, START)
    with ParquetSink(str(tmp_path), journal=None) as sink:  # the record path every producer takes
        for c in written:
            sink.write_completion(c, RecordContext(deployment="t", replica="r"))
    # a file from before the repetition / params_source columns existed
    old = completions(g, 50, START - timedelta(days=1))
    table = rows_table([sequence_row(c, RecordContext(), True) for c in old], SEQUENCES)
    (tmp_path / "sequences" / "dt=2026-10-31").mkdir(parents=True)
    pq.write_table(table.drop_columns(["repetition", "params_source"]),
                   tmp_path / "sequences" / "dt=2026-10-31" / "part-old-000000.parquet")

    monitor = Monitor(str(tmp_path))
    sample = monitor.sample(Filter.parse("since=2026-11-01"))
    by_id = {c.request_id: c for c in written}
    ids = [f"c{i}" for i in range(300)]  # the sample is in time order, as written
    assert len(sample) == 300
    expected = {
        "generated_length": np.array([len(by_id[r].token_ids) for r in ids], np.float64),
        "finish_length": np.array([by_id[r].finish_reason == "length" for r in ids], np.float64),
        "finish_stop": np.array([by_id[r].finish_reason == "stop" for r in ids], np.float64),
        "repetition": np.array([seq_rep(by_id[r].token_ids) for r in ids], np.float64),
    }
    assert set(expected) == set(LENGTH_METRICS)
    for metric, values in expected.items():
        np.testing.assert_allclose(sample.metrics[metric], values, rtol=1e-12, equal_nan=True, err_msg=metric)
    assert np.isnan(expected["repetition"]).any() and (expected["repetition"] > 0.5).any()
    old_sample = monitor.sample(Filter.parse("until=2026-11-01"))
    assert len(old_sample) == 50 and np.isnan(old_sample.metrics["repetition"]).all()
    np.testing.assert_array_equal(old_sample.metrics["generated_length"], [len(c.token_ids) for c in old])

    # a comparison of two old selections has no repetition to test: no row for it, rather than
    # "insufficient_data" on every run; the new side has it, so old-vs-new tests it
    noon = "2026-10-31T12:00:00+00:00"
    report = monitor.compare(Filter.parse(f"until={noon}"), Filter.parse(f"since={noon},until=2026-11-01"))
    assert report.rows and "repetition" not in {r["metric"] for r in report.rows}
    report = monitor.compare(Filter.parse("until=2026-11-01"), Filter.parse("since=2026-11-01"))
    assert {r["metric"] for r in report.rows} >= set(LENGTH_METRICS)
    monitor.close()


def clustered_finishes(g: np.random.Generator, prompts: int, per_prompt: int, stop_share: float,
                       concentration: float = 2.0) -> tuple:
    """Finish reasons of `prompts` prompts x `per_prompt` sequences: each prompt has its own
    chance of stopping (Beta around `stop_share`; intra-prompt correlation 1 / (concentration
    + 1)), the rest hit the length."""
    chance = g.beta(stop_share * concentration, (1 - stop_share) * concentration, prompts)
    stop = g.random((prompts, per_prompt)) < chance[:, None]
    keys = np.repeat([prompt_key([int(k)]) for k in g.integers(0, 2**31, prompts)], per_prompt)
    return stop.ravel(), keys


def test_the_finish_mix_test_is_valid_under_repeated_prompts_and_finds_a_shift():
    g = np.random.default_rng(11)

    def verdicts(shift: float, clustered: bool, trials: int, concentration: float = 1.0) -> list[str]:
        out = []
        for _ in range(trials):
            x, kx = clustered_finishes(g, 15, 10, 0.6, concentration)
            y, ky = clustered_finishes(g, 15, 10, 0.6 - shift, concentration)
            results = twosample.compare({"finish_stop": x.astype(float)}, {"finish_stop": y.astype(float)},
                                        min_sequences=100, permutations=999,
                                        baseline_keys=kx if clustered else None,
                                        current_keys=ky if clustered else None)
            out.append("drift" if any(r.verdict == "drift" for r in results) else "no_drift")
        return out

    # sequences of one prompt finish alike: permuting single sequences is over-confident
    naive = verdicts(0.0, clustered=False, trials=60).count("drift")
    fair = verdicts(0.0, clustered=True, trials=60).count("drift")
    assert naive >= 5 and fair <= 3, (naive, fair)
    assert verdicts(0.5, clustered=True, trials=10, concentration=8.0).count("drift") >= 9


def test_the_monitor_reports_a_finish_mix_and_length_change_between_regimes(tmp_path):
    g = np.random.default_rng(5)

    def rows(params_id: str, start: datetime, stop_share: float, length: int) -> list[dict]:
        stop, keys = clustered_finishes(g, 40, 8, stop_share)
        out = []
        for i, (s, k) in enumerate(zip(stop, keys)):
            n = int(g.integers(length // 2, length)) if s else length
            out.append({"ts": start + timedelta(seconds=i), "created": start + timedelta(seconds=i),
                        "request_id": f"{params_id}-{i}", "prompt_tokens": 12, "prompt_key": k,
                        "generated_tokens": n, "finish_reason": "stop" if s else "length",
                        "repetition": float(g.beta(2, 8)), "mean_entropy": float(g.gamma(4, 0.4)),
                        "perplexity": 3.0, "mean_top_prob": 0.5, "p10_top_prob": 0.2, "mean_sampling_entropy": 1.0,
                        "nonfinite": 0, "overflow": 0, "model_id": "m", "model_rev": "r1", "params_id": params_id,
                        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "template_version": "v1",
                        "deployment": "t", "replica": "r"})
        return out

    with ParquetSink(str(tmp_path), journal=None) as sink:
        sink.write("sequences", rows_table(rows("p-a", START, 0.7, 64), SEQUENCES))
        sink.write("sequences", rows_table(rows("p-b", START + timedelta(hours=1), 0.2, 64), SEQUENCES))
    report = Monitor(str(tmp_path), MonitorConfig(window=1000)).run()
    regime = {(r["metric"], r["test"]): r for r in report.rows if r["kind"] == "regime"}
    assert regime[("finish_stop", "ks")]["verdict"] == "drift" and regime[("finish_length", "ks")]["verdict"] == "drift"
    assert regime[("generated_length", "cvm")]["verdict"] == "drift"
    assert regime[("repetition", "ks")]["verdict"] == "no_drift"
    assert {r["unit"] for r in regime.values()} == {"prompt"}


def test_the_counts_path_for_few_distinct_values_equals_the_per_sequence_path(monkeypatch):
    g = np.random.default_rng(4)
    cases = [((g.random(180) < 0.6) * 1.0, (g.random(140) < 0.5) * 1.0),  # an indicator
             (g.integers(0, 3, 150) * 1.0, g.integers(0, 3, 170) * 1.0),  # three categories
             (np.zeros(120), np.zeros(90))]  # a constant
    for x, y in cases:
        clusters = (twosample.prompt_clusters(np.array([str(i % 17) for i in range(len(x))], object), len(x)),
                    twosample.prompt_clusters(np.array([str(i % 13) for i in range(len(y))], object), len(y)))
        for grouping in (None, clusters):
            counted = twosample.permutation_null(x, y, 300, 3, grouping)
            monkeypatch.setattr(twosample, "GROUPED_CELLS", 0)  # force the per-sequence path
            general = twosample.permutation_null(x, y, 300, 3, grouping)
            monkeypatch.undo()
            for name in general:
                np.testing.assert_allclose(counted[name], general[name], rtol=1e-9, atol=1e-12, err_msg=name)
