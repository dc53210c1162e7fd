import json
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import scipy.stats as st
from scipy.spatial.distance import jensenshannon

from softwatch.cli import main
from softwatch.drift import twosample
from softwatch.drift.monitor import Filter, FilterError, Monitor, MonitorConfig
from softwatch.drift.online import CUSUM, PoissonCUSUM
from softwatch.records import SEQUENCES, rows_table
from softwatch.store import ParquetSink, Store

rng = np.random.default_rng(12345)


# ---- exactness against scipy ----------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(40, 55), (300, 250)])
def test_ks_and_cvm_statistics_equal_scipy(n, m):
    x, y = rng.normal(size=n), rng.normal(0.3, 1.2, size=m)
    result = twosample.ks_cvm(x, y)
    assert result["ks"][0] == pytest.approx(st.ks_2samp(x, y).statistic, abs=1e-12)
    assert result["cvm"][0] == pytest.approx(st.cramervonmises_2samp(x, y).statistic, rel=1e-9)


def test_ks_counts_ties_the_way_scipy_does():
    x, y = rng.integers(0, 4, 300).astype(float), rng.integers(0, 5, 200).astype(float)
    assert twosample.ks_cvm(x, y)["ks"][0] == pytest.approx(st.ks_2samp(x, y).statistic, abs=1e-12)


def test_permutation_p_values_match_scipy_exact_and_permutation_tests():
    x, y = rng.normal(size=24), rng.normal(0.7, 1, size=20)  # small: scipy's exact CvM is combinatorial
    result = twosample.ks_cvm(x, y, permutations=9999, seed=1)
    exact_ks = st.ks_2samp(x, y, method="exact").pvalue
    assert result["ks"][1] == pytest.approx(exact_ks, abs=max(0.01, 0.15 * exact_ks))
    exact_cvm = st.cramervonmises_2samp(x, y, method="exact").pvalue
    assert result["cvm"][1] == pytest.approx(exact_cvm, abs=max(0.01, 0.15 * exact_cvm))
    # null data: a p-value far from significance
    same = twosample.ks_cvm(x, rng.normal(size=20), permutations=999)
    assert same["ks"][1] > 0.01 or same["cvm"][1] > 0.01


def test_effect_sizes_equal_their_scipy_definitions():
    x, y = rng.gamma(2, 1, 500), rng.gamma(2.3, 1, 400)
    assert twosample.wasserstein(x, y) == pytest.approx(st.wasserstein_distance(x, y), rel=1e-10)
    assert twosample.normalized_wasserstein(x, y) == pytest.approx(st.wasserstein_distance(x, y) / np.std(x))
    px, py = twosample.binned(x, y)
    assert twosample.jensen_shannon(x, y) == pytest.approx(jensenshannon(px, py, base=2), rel=1e-9)
    assert twosample.psi(x, y) == pytest.approx(np.sum((py - px) * np.log(py / px)))
    assert len(px) == 10 and px == pytest.approx(np.full(10, 0.1), abs=0.01)  # quantile bins of the baseline


def test_holm_adjustment():
    assert twosample.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_compare_needs_significance_and_effect():
    base = {"a": rng.normal(size=400), "b": rng.normal(size=400)}
    moved = {"a": rng.normal(0.5, 1, size=400), "b": rng.normal(size=400)}
    verdicts = {(r.metric, r.test): r.verdict for r in twosample.compare(base, moved)}
    assert verdicts[("a", "ks")] == verdicts[("a", "cvm")] == "drift"
    assert verdicts[("b", "ks")] == verdicts[("b", "cvm")] == "no_drift"
    # a tiny shift on many sequences is significant but below the effect gate
    big = rng.normal(size=20000)
    tiny = twosample.compare({"a": big}, {"a": rng.normal(0.05, 1, size=20000)}, permutations=199)
    assert all(r.p_value <= 0.01 and r.effect_size < r.threshold and r.verdict == "no_drift" for r in tiny)
    few = twosample.compare({"a": rng.normal(size=10)}, {"a": rng.normal(5, 1, size=10)})
    assert {r.verdict for r in few} == {"insufficient_data"}


def test_compare_false_alarm_rate_on_null_data_is_at_most_alpha():
    alarms = 0
    for trial in range(60):
        base = {f"m{i}": rng.gamma(2, 1, 150) for i in range(4)}
        same = {f"m{i}": rng.gamma(2, 1, 150) for i in range(4)}
        alarms += any(r.verdict == "drift" for r in twosample.compare(base, same, permutations=999, seed=trial))
    assert alarms <= 2  # alpha = 1% per comparison: P(more than 2 of 60) < 2%


# ---- online detectors -------------------------------------------------------------------------
def _run_length(detector, stream) -> int:
    detector.reset()
    for i, x in enumerate(stream):
        detector.update(*np.atleast_1d(x))
        if detector.drift_detected:
            return i + 1
    return len(stream)


def test_cusum_average_run_length_on_null_data_is_within_20_percent_of_target():
    reference = rng.gamma(2.0, 1.0, 20000)  # skewed: a normal-theory threshold would be wrong
    detector = CUSUM.calibrated(reference, target_arl=200, streams=1000, seed=3)
    lengths = [_run_length(detector, rng.gamma(2.0, 1.0, 4000)) for _ in range(400)]
    assert np.mean(lengths) == pytest.approx(200, rel=0.2)
    shifted = [_run_length(detector, rng.gamma(2.0, 1.0, 4000) + 0.7) for _ in range(50)]
    assert np.median(shifted) < 40


def test_poisson_cusum_average_run_length_and_detection():
    exposure = rng.integers(10, 60, 20000).astype(float)
    counts = rng.poisson(0.002 * exposure)
    detector = PoissonCUSUM.calibrated(counts, exposure, target_arl=200, streams=1000, seed=4)
    def stream(rate):
        e = rng.integers(10, 60, 4000).astype(float)
        return np.column_stack([rng.poisson(rate * e), e])
    assert np.mean([_run_length(detector, stream(0.002)) for _ in range(300)]) == pytest.approx(200, rel=0.2)
    assert np.median([_run_length(detector, stream(0.008)) for _ in range(50)]) < 60
    clean = PoissonCUSUM.calibrated(np.zeros(1000), np.full(1000, 30.0), target_arl=5000)
    clean.update(0, 30)
    clean.update(1, 30)
    assert not clean.drift_detected  # a clean reference does not say the rate is zero: one event is no evidence
    for _ in range(20):
        clean.update(3, 30)  # a burst is
    assert clean.drift_detected


# ---- the monitor over a real store --------------------------------------------------------------
START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def write_regime(root, n, *, params_id, temperature, start, entropy_shift=0.0, seed=0, model_rev="r1"):
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tokens = int(g.integers(8, 64))
        entropy = g.gamma(4, 0.4) + entropy_shift
        rows.append({
            "ts": start + timedelta(seconds=i), "created": start + timedelta(seconds=i - 1),
            "request_id": f"{params_id}-{seed}-{i}", "prompt_tokens": 12, "generated_tokens": tokens,
            "finish_reason": "length", "ttft_s": 0.05, "latency_s": 1.0,
            "perplexity": float(np.exp(entropy * 0.8 + g.normal(0, 0.1))), "sampling_perplexity": 1.5,
            "mean_entropy": entropy, "max_entropy": entropy * 2, "mean_sampling_entropy": entropy * temperature,
            "mean_top_prob": float(np.clip(0.7 - 0.1 * entropy + g.normal(0, 0.05), 0, 1)), "min_top_prob": 0.1,
            "p10_top_prob": 0.2 + g.normal(0, 0.02), "mean_margin": 0.3, "nonfinite": 0,
            "overflow": int(g.poisson(0.001 * tokens)), "tokens_kept": True,
            "model_id": "m", "model_rev": model_rev, "params_id": params_id, "temperature": temperature,
            "top_p": 1.0, "top_k": 0, "template_version": "v1", "deployment": "test", "replica": "r",
        })
    with ParquetSink(str(root), journal=None) as sink:
        sink.write("sequences", rows_table(rows, SEQUENCES))


def test_filters_are_parsed_and_refused_clearly():
    assert Filter.parse("params_id=abc, since=2026-11-01").sql() == ("params_id = ? AND ts >= ?::TIMESTAMPTZ",
                                                                      ["abc", "2026-11-01"])
    with pytest.raises(FilterError, match="key one of"):
        Filter.parse("1=1; DROP TABLE sequences")
    with pytest.raises(FilterError, match="ISO"):
        Filter.parse("since=yesterday")


def test_monitor_finds_a_regime_change_and_writes_the_report(tmp_path, capsys):
    write_regime(tmp_path, 400, params_id="p-old", temperature=0.7, start=START, seed=1)
    write_regime(tmp_path, 300, params_id="p-new", temperature=1.0, start=START + timedelta(hours=1),
                 entropy_shift=0.6, seed=2)
    assert main(["drift", "--data", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "drift"
    regime_rows = [r for r in report["rows"] if r["kind"] == "regime"]
    assert {r["metric"] for r in regime_rows if r["verdict"] == "drift"} >= {"mean_entropy", "log_perplexity"}
    assert all(r["baseline_regime"] == "m@r1/p-old" and r["current_regime"] == "m@r1/p-new" for r in regime_rows)
    assert {(r["n_baseline"], r["n_current"]) for r in regime_rows} == {(400, 300)}
    stored = Store(str(tmp_path)).rows("SELECT report_id, count(*) AS n, count(*) FILTER (verdict = 'drift') AS d "
                                       "FROM drift_reports GROUP BY report_id")
    assert stored == [{"report_id": report["report_id"], "n": len(report["rows"]),
                       "d": sum(r["verdict"] == "drift" for r in report["rows"])}]


def test_monitor_says_no_drift_for_an_unchanged_distribution(tmp_path):
    write_regime(tmp_path, 300, params_id="p-a", temperature=0.7, start=START, seed=3)
    write_regime(tmp_path, 300, params_id="p-b", temperature=0.7, start=START + timedelta(hours=1), seed=4)
    report = Monitor(str(tmp_path), MonitorConfig(window=100)).run()
    # one replica: no replica comparison; the same prompt lengths: no traffic change
    assert {r["kind"] for r in report.rows} == {"regime", "window", "online", "regime_traffic", "window_traffic"}
    assert report.verdict == "no_drift", [r for r in report.rows if r["verdict"] == "drift"]


def test_window_and_online_detectors_see_an_unannounced_change(tmp_path):
    # same regime labels throughout, the distribution moves halfway (a silent numerics change)
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START, seed=5)
    write_regime(tmp_path, 300, params_id="p", temperature=0.7, start=START + timedelta(hours=1),
                 entropy_shift=0.8, seed=6)
    report = Monitor(str(tmp_path), MonitorConfig(window=150, target_arl=500)).run()
    window = {r["metric"]: r["verdict"] for r in report.rows if r["kind"] == "window" and r["test"] == "cvm"}
    assert window["mean_entropy"] == "drift"
    online = {r["metric"]: r for r in report.rows if r["kind"] == "online"}
    assert online["mean_entropy"]["verdict"] == "drift"
    assert 150 <= online["mean_entropy"]["n_current"] <= 200  # alarm soon after the change at 150


def test_explicit_filters_and_bad_filters_on_the_command_line(tmp_path, capsys):
    write_regime(tmp_path, 200, params_id="p-a", temperature=0.7, start=START, seed=7)
    write_regime(tmp_path, 200, params_id="p-b", temperature=0.7, start=START + timedelta(hours=1),
                 entropy_shift=1.0, seed=8)
    assert main(["drift", "--data", str(tmp_path), "--baseline", "params_id=p-a", "--current", "params_id=p-b"]) == 0
    out = capsys.readouterr().out
    assert "verdict: drift" in out and "mean_entropy" in out
    assert main(["drift", "--data", str(tmp_path), "--baseline", "params_id=p-a"]) == 2
    assert main(["drift", "--data", str(tmp_path), "--baseline", "x=1", "--current", "params_id=p-b"]) == 2
    assert "key one of" in capsys.readouterr().err


def test_html_report_is_self_contained(tmp_path, capsys):
    write_regime(tmp_path, 300, params_id="p-old", temperature=0.7, start=START, seed=9)
    write_regime(tmp_path, 300, params_id="p-new", temperature=1.0, start=START + timedelta(hours=1),
                 entropy_shift=0.6, seed=10)
    out = tmp_path / "report.html"
    assert main(["report", "--data", str(tmp_path), "--out", str(out)]) == 0
    assert "verdict: drift" in capsys.readouterr().out
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 2  # the regime comparison's distributions, the time series
    assert "p-new" in page and "mean_entropy" in page and "<b class='drift'>drift</b>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_sweep_gives_one_row_per_temperature(tmp_path, capsys):
    assert main(["sweep", "--model", "tiny-random", "--prompts", "3", "--max-tokens", "6", "--temperatures", "0,0.5,1",
                 "--data", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["temperature"] for r in rows] == [0, 0.5, 1] and len({r["params_id"] for r in rows}) == 3
    assert rows[0]["mean_sampling_entropy"] == 0 and rows[2]["mean_sampling_entropy"] > rows[1]["mean_sampling_entropy"] > 0
    assert all(r["sequences"] == 3 for r in rows)
    stored = Store(str(tmp_path)).rows("SELECT temperature, count(*) AS n FROM sequences GROUP BY 1 ORDER BY 1")
    assert stored == [{"temperature": 0.0, "n": 3}, {"temperature": 0.5, "n": 3}, {"temperature": 1.0, "n": 3}]
    assert main(["sweep", "--model", "tiny-random", "--temperatures", "a,b"]) == 2


def test_probes_find_a_quantized_revision_and_not_a_rescore(tmp_path, capsys):
    data = ["--model", "tiny-random", "--data", str(tmp_path), "--json"]
    assert main(["probe", *data]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == []  # the first revision is the baseline
    assert main(["probe", *data, "--quantize", "4"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert quantized["verdict"] == "drift" and {r["kind"] for r in quantized["rows"]} == {"probe"}
    assert all(r["n_baseline"] == 64 for r in quantized["rows"])
    assert main(["probe", *data, "--quantize", "4"]) == 0  # the same revision again: compared with the original
    assert json.loads(capsys.readouterr().out)["verdict"] == "drift"
    store = Store(str(tmp_path))
    assert store.rows("SELECT count(DISTINCT run_id) AS runs, count(*) AS n FROM probes") == [{"runs": 3, "n": 3 * 128}]


def test_probe_rescoring_in_another_batch_composition_is_no_drift(tiny):
    from softwatch.drift.probes import builtin_probes, paired_test, score, score_twice

    probes = builtin_probes()
    baseline, replicate = score_twice(tiny, probes)
    results = paired_test(baseline, replicate, score(tiny, probes, batch=5))
    assert {r.verdict for r in results} == {"no_drift"} and all(r.statistic < 1e-4 for r in results)


def test_the_alarm_gauge_reaches_a_real_prometheus(tmp_path):
    from softwatch.telemetry import TARGETS_DIR, Telemetry

    from .prometheus import file_sd_config, prometheus, query

    write_regime(tmp_path / "data", 300, params_id="p-old", temperature=0.7, start=START, seed=11)
    write_regime(tmp_path / "data", 300, params_id="p-new", temperature=1.0, start=START + timedelta(hours=1),
                 entropy_shift=0.6, seed=12)
    telemetry = Telemetry("prometheus", data_root=str(tmp_path / "data"), instance_id="drift-monitor-test")
    try:
        report = Monitor(str(tmp_path / "data"), telemetry=telemetry).run()
        assert report.verdict == "drift"
        config = file_sd_config(tmp_path / "data" / TARGETS_DIR)
        with prometheus(config, tmp_path / "prometheus") as url:
            deadline = time.time() + 60
            while not (alarms := query(url, 'softwatch_drift_alarm{kind="regime"} == 1')) and time.time() < deadline:
                time.sleep(1)
            assert alarms, "the drift alarm gauge never reached Prometheus"
            labels = alarms[0]["metric"]
            assert labels["current_regime"] == "m@r1/p-new" and labels["params_id"] == "p-new"
            assert labels["gen_ai_request_model"] == "m"
            (score,) = query(url, 'softwatch_drift_score{kind="regime"}')
            assert float(score["value"][1]) >= 0.1
    finally:
        telemetry.shutdown()


def test_bench_drift_quick_runs_independent_trials_through_the_monitor(tmp_path, capsys):
    """The CI-sized run (tiny model, the monitor's settings scaled down): every null trial is one
    decided check of each kind, the traffic of different trials and regimes shares no prompt,
    each prompt is sampled the trial's number of times with its prompt_key, and generation
    resumes: a deleted segment comes back identical, nothing else is regenerated."""
    from collections import Counter
    from pathlib import Path

    import pyarrow.parquet as pq

    args = ["bench", "drift", "--quick", "--model", "tiny-random", "--data", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan = result["plan"]
    assert not result["partial"] and result["trials_evaluated"]["null"] == plan["null_trials"]
    for kind in ("regime", "window", "online"):
        r = result["false_alarm_rate"][kind]
        assert r["checks"] == plan["null_trials"] and 0 <= r["alarms"] <= r["checks"]
        assert r["ci95"][0] <= r["rate"] <= r["ci95"][1] <= 1 and r["upper95"] < 1
    assert set(result["detection_rate"]) == set(plan["changes"])
    assert all(r["checks"] == plan["change_trials"] for r in result["detection_rate"].values())
    evidently = result["evidently"]
    assert evidently["default"]["false_alarm_rate"]["checks"] == plan["null_trials"]
    # matched: Evidently's per-column rule alarms on no more null trials than the monitor's regime check
    assert evidently["per_column_matched"]["false_alarm_rate"]["alarms"] <= result["false_alarm_rate"]["regime"]["alarms"]
    assert set(evidently["per_column_matched"]["detection_rate"]) == set(plan["changes"])

    folder = Path(result["traffic"])
    segments = sorted(folder.glob("*.parquet"))
    assert len(segments) == 2 * (plan["null_trials"] + plan["change_trials"] * len(plan["changes"]))
    keys = {p.name: pq.read_table(p, columns=["prompt_key"])["prompt_key"].to_pylist() for p in segments}
    assert all(None not in k for k in keys.values())
    distinct = [set(k) for k in keys.values()]
    assert len(set().union(*distinct)) == sum(map(len, distinct))  # no prompt in two segments
    repeats = {t["trial"]: t["repeats"] for t in result["trials"]}
    assert sorted(set(repeats.values())) == sorted(plan["repeats"])
    for name, k in keys.items():
        assert set(Counter(k).values()) == {repeats[name.rsplit("-", 1)[0]]}, name

    victim = segments[1]
    columns = ["request_id", "ts", "prompt_key", "generated_tokens", "mean_entropy", "perplexity", "model_rev"]
    before = pq.read_table(victim, columns=columns)
    victim.unlink()
    assert main([*args, "--generate-only"]) == 0
    assert "generated 1 segments" in capsys.readouterr().out
    assert pq.read_table(victim, columns=columns).equals(before)


def test_bench_drift_plan_gives_disjoint_prompts_and_exact_bounds():
    """The full plan's trials use disjoint runs of the held-out prompts (none a built-in
    prompt), their own seeds, every repeat count and both arrival orders; 0 alarms in 149
    checks is the fewest that bounds the rate by 2% (one-sided 95%, exact)."""
    from collections import Counter

    from softwatch.bench import heldout
    from softwatch.bench.drift import clopper_pearson, matched_threshold, upper_bound
    from softwatch.bench.traffic import Plan, schedule
    from softwatch.prompts import prompt_set

    plan = Plan.full()
    trials = schedule(plan)
    assert dict(Counter(t.kind for t in trials)) == {"null": plan.null_trials, **dict.fromkeys(plan.changes, plan.change_trials)}
    ranges = sorted((s.prompt_start, s.prompt_start + s.prompts) for t in trials for s in t.segments)
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][1] <= len(heldout.heldout_order())
    nulls = [t for t in trials if t.kind == "null"]
    assert len({t.seed for t in trials}) == len(trials)
    assert {t.segments[0].repeats for t in nulls} == {1, 5, 10} and {t.order for t in nulls} == {"scattered", "bursts"}
    assert all(t.segments[1].relabel and t.segments[1].sequences >= 2 * 200 for t in nulls)  # window + online
    prompts = heldout.heldout_prompts(0, len(heldout.heldout_order()))
    assert len(set(prompts)) == len(prompts) == heldout.grid_size() - 8 and not set(prompts) & set(prompt_set())
    assert upper_bound(0, 149) <= 0.02 < upper_bound(0, 148)
    assert clopper_pearson(0, 149)[1] == pytest.approx(1 - 0.025 ** (1 / 149))
    assert clopper_pearson(3, 10) == pytest.approx((st.beta.ppf(0.025, 3, 8), st.beta.ppf(0.975, 4, 7)))
    assert matched_threshold([0.3, 0.01, 0.2, 0.05], allowed=1) == 0.05  # only 0.01 < 0.05 alarms
    assert main(["bench", "drift", "--generate-only", "--no-generate"]) == 2  # refused before any model loads
