"""Drift tests on clustered traffic (repeated prompts), the calibrated effect gate, and
permutation counts tied to alpha."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softwatch.completion import prompt_key
from softwatch.drift import twosample
from softwatch.drift.monitor import Monitor, MonitorConfig
from softwatch.records import SEQUENCES, rows_table
from softwatch.store import ParquetSink, Store

TRIALS = 60


def clustered_side(g: np.random.Generator, prompts: int, per_prompt: int, rho: float, metrics: int = 2,
                   shift: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`prompts` fresh prompts x `per_prompt` sequences; unit-variance values whose
    intra-prompt correlation is rho; the prompt keys of the sequences."""
    prompt_effect = np.repeat(g.normal(size=(prompts, metrics)), per_prompt, axis=0)
    values = np.sqrt(rho) * prompt_effect + np.sqrt(1 - rho) * g.normal(size=(prompts * per_prompt, metrics)) + shift
    keys = np.repeat(np.array([prompt_key(g.integers(0, 50_000, 20).tolist()) for _ in range(prompts)], object),
                     per_prompt)
    return {f"m{i}": values[:, i] for i in range(metrics)}, keys


def drift_verdicts(prompts: int, per_prompt: int, rho: float, *, clustered: bool, shift: float = 0.0,
                   seed: int = 0) -> int:
    """Comparisons out of TRIALS that say drift; different prompts on each side."""
    alarms = 0
    for trial in range(TRIALS):
        g = np.random.default_rng([seed, trial])
        (a, a_keys), (b, b_keys) = clustered_side(g, prompts, per_prompt, rho), \
            clustered_side(g, prompts, per_prompt, rho, shift=shift)
        keys = {"baseline_keys": a_keys, "current_keys": b_keys} if clustered else {}
        results = twosample.compare(a, b, permutations=0, seed=trial, **keys)
        alarms += any(r.verdict == "drift" for r in results)
    return alarms


@pytest.mark.parametrize("prompts,per_prompt,rho", [(12, 10, 0.5), (24, 10, 0.3)])
def test_repeated_prompts_false_drift_rate_is_nominal_only_when_clusters_are_permuted(prompts, per_prompt, rho):
    # alpha = 1% per comparison: P(more than 3 of 60) < 0.3% for a valid test
    assert drift_verdicts(prompts, per_prompt, rho, clustered=True) <= 3
    assert drift_verdicts(prompts, per_prompt, rho, clustered=False) > 3  # the sequence-level test fails the check


def test_a_real_shift_in_clustered_traffic_is_still_found():
    assert drift_verdicts(12, 10, 0.5, clustered=True, shift=1.5, seed=1) >= 0.9 * TRIALS


def test_results_say_which_unit_was_permuted():
    g = np.random.default_rng(2)
    (a, a_keys), (b, b_keys) = clustered_side(g, 12, 10, 0.5), clustered_side(g, 12, 10, 0.5)
    clustered = twosample.compare(a, b, baseline_keys=a_keys, current_keys=b_keys)
    assert {(r.unit, r.clusters_baseline, r.clusters_current) for r in clustered} == {("prompt", 12, 12)}
    plain = twosample.compare(a, b, baseline_keys=np.full(120, None), current_keys=None)
    assert {(r.unit, r.clusters_baseline, r.clusters_current) for r in plain} == {("sequence", 120, 120)}


def test_too_few_prompts_for_alpha_is_insufficient_data():
    g = np.random.default_rng(3)
    (a, a_keys), (b, b_keys) = clustered_side(g, 4, 30, 0.5), clustered_side(g, 4, 30, 0.5, shift=3.0)
    results = twosample.compare(a, b, baseline_keys=a_keys, current_keys=b_keys)  # 70 splits: p >= 1/70
    assert {r.verdict for r in results} == {"insufficient_data"}


def test_sequences_without_a_key_are_clusters_of_one():
    keys = np.array(["a", None, "b", "a", None], dtype=object)
    clusters = twosample.prompt_clusters(keys, 5)
    assert clusters[0] == clusters[3] and len(set(clusters.tolist())) == 4


# ---- the effect gate --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [100, 300])
def test_effect_threshold_is_exceeded_by_noise_at_rate_alpha(n):
    alpha, exceeded, thresholds = 0.05, 0, []
    for trial in range(100):
        g = np.random.default_rng([4, trial])
        result = twosample.compare({"a": g.gamma(2, 1, n)}, {"a": g.gamma(2, 1, n)}, alpha=alpha, min_effect=0.0,
                                   permutations=999, seed=trial)[0]
        exceeded += result.effect_size >= result.threshold
        thresholds.append(result.threshold)
    assert exceeded <= 10  # Binomial(100, 0.05): P(more than 10) < 1.2%
    assert np.median(thresholds) > 0.1  # the old fixed gate, min_effect = 0.1, was below the noise


def test_min_effect_governs_the_gate_once_noise_is_below_it():
    g = np.random.default_rng(5)
    big = twosample.compare({"a": g.normal(size=20_000)}, {"a": g.normal(0.05, 1, 20_000)}, permutations=199)
    assert all(r.threshold == 0.1 and r.p_value <= 0.01 and r.verdict == "no_drift" for r in big)


# ---- permutations tied to alpha ---------------------------------------------------------------
@pytest.mark.parametrize("alpha,tests", [(0.01, 14), (0.001, 14), (0.05, 4)])
def test_permutations_let_the_smallest_holm_p_reach_alpha(alpha, tests):
    permutations = twosample.permutations_for(alpha, tests, requested=99)
    assert tests / (permutations + 1) <= alpha / 2
    g = np.random.default_rng(6)
    far = {f"m{i}": g.normal(size=60) for i in range(tests // 2)}
    moved = {f"m{i}": g.normal(5, 1, 60) for i in range(tests // 2)}
    results = twosample.compare(far, moved, alpha=alpha, permutations=99)
    assert {r.verdict for r in results} == {"drift"}  # 99 permutations alone: Holm p >= tests/100 > alpha


def test_an_alpha_no_permutation_count_can_reach_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="alpha=1e-06 cannot be reached"):
        MonitorConfig(alpha=1e-6)
    with pytest.raises(ValueError, match="alpha must be in"):
        MonitorConfig(alpha=0)


# ---- the prompt key in the store ---------------------------------------------------------------
def test_prompt_key_hashes_token_ids():
    assert prompt_key([1, 2, 3]) == prompt_key([1, 2, 3]) != prompt_key([1, 2, 4])
    assert prompt_key([12, 3]) != prompt_key([1, 23]) and len(prompt_key([1])) == 16


START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def sequence_rows(n: int, params_id: str, start: datetime, g: np.random.Generator, keys: list | None,
                  shift: float = 0.0) -> list[dict]:
    rows = []
    for i in range(n):
        entropy = g.gamma(4, 0.4) + shift
        rows.append({"ts": start + timedelta(seconds=i), "created": start + timedelta(seconds=i),
                     "request_id": f"{params_id}-{i}", "prompt_tokens": 12, "generated_tokens": 20,
                     "prompt_key": keys[i] if keys else None, "mean_entropy": entropy, "perplexity": np.exp(entropy),
                     "mean_top_prob": 0.5, "p10_top_prob": 0.2, "mean_sampling_entropy": entropy, "nonfinite": 0,
                     "overflow": 0, "model_id": "m", "model_rev": "r1", "params_id": params_id, "temperature": 1.0,
                     "top_p": 1.0, "top_k": 0, "template_version": "v1", "deployment": "t", "replica": "r"})
    return rows


def test_old_files_without_prompt_key_still_read_and_fall_back_to_sequences(tmp_path):
    g = np.random.default_rng(7)
    old = rows_table(sequence_rows(150, "p-old", START, g, None), SEQUENCES).drop_columns(["prompt_key"])
    (tmp_path / "sequences" / "dt=2026-11-01").mkdir(parents=True)
    pq.write_table(old, tmp_path / "sequences" / "dt=2026-11-01" / "part-old-000000.parquet")
    only_old = Store(str(tmp_path))
    assert only_old.rows("SELECT count(*) AS n, count(prompt_key) AS keyed FROM sequences") == [{"n": 150, "keyed": 0}]
    keys = [prompt_key([i % 15]) for i in range(150)]
    with ParquetSink(str(tmp_path), journal=None) as sink:
        sink.write("sequences", rows_table(sequence_rows(150, "p-new", START + timedelta(days=1), g, keys), SEQUENCES))
    assert Store(str(tmp_path)).rows("SELECT params_id, count(prompt_key) AS keyed FROM sequences GROUP BY 1 "
                                     "ORDER BY 1") == [{"params_id": "p-new", "keyed": 150},
                                                       {"params_id": "p-old", "keyed": 0}]
    report = Monitor(str(tmp_path), MonitorConfig(min_sequences=100, window=1000)).run()
    regime = [r for r in report.rows if r["kind"] == "regime"]
    assert regime and {(r["unit"], r["clusters_baseline"], r["clusters_current"]) for r in regime} == \
        {("prompt", 150, 15)}
    stored = Store(str(tmp_path)).rows("SELECT DISTINCT unit FROM drift_reports")
    assert stored == [{"unit": "prompt"}]


def test_the_monitor_permutes_prompt_clusters_of_a_keyed_dataset(tmp_path):
    g = np.random.default_rng(8)
    keys = [prompt_key([i // 10]) for i in range(200)]
    with ParquetSink(str(tmp_path), journal=None) as sink:
        sink.write("sequences", rows_table(sequence_rows(200, "p", START, g, keys), SEQUENCES))
    report = Monitor(str(tmp_path), MonitorConfig(window=100, min_sequences=100)).run()
    window = [r for r in report.rows if r["kind"] == "window"]
    assert window and {(r["unit"], r["clusters_baseline"], r["clusters_current"]) for r in window} == \
        {("prompt", 10, 10)}
    assert pa.types.is_string(Store(str(tmp_path)).query("SELECT prompt_key FROM sequences").schema[0].type)
