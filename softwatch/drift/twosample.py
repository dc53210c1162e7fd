"""Two-sample tests on sequence-level statistics, effect sizes, and the verdict rule.

The unit a test permutes is what is independent under "no change". Token statistics within a
sequence are correlated, so tokens are never permuted. Sequences of one prompt are correlated
too (retries, popular questions, one user's conversation): with prompt keys
(`completion.prompt_key`), the sequences of one side that share a key are one cluster, and
the tests move whole clusters between the sides. Under no change every cluster is a draw of
(a prompt, its sequences) from the same traffic, so clusters are exchangeable and the
permutation null keeps the within-prompt correlation the data has: the test is exact at any
correlation, where permuting single sequences gave 11/60 false drift verdicts at 12 prompts x
10 sequences and correlation 0.5. A prompt seen on both sides gives one cluster per side; the
two share the prompt, which only makes the sides more alike (conservative). Stratifying by
prompt would use only the prompts both sides share (few, between regimes a day apart), and a
cluster bootstrap is only asymptotically valid at the few dozen prompts a window may hold.
Power comes from the number of prompts, not sequences: a comparison whose clusters allow
fewer distinct splits than the permutations alpha needs says "insufficient_data". Sequences
without a key are clusters of one: on data without keys this is the sequence-level test,
and the result says so (`unit`).

A comparison says "drift" for a metric only when the difference is significant after Holm's
correction across every test of the comparison and its effect (normalized Wasserstein
distance, W1 / baseline standard deviation) reaches `threshold`: the larger of `min_effect`
and the effect that the same permutations, with no change, exceed with probability alpha. A
fixed `min_effect` alone is below the noise at small n (the no-change effect has median 0.16
at 100 sequences per side), so the gate would do nothing there; the calibrated floor makes
it mean "larger than this n can show by chance", and `min_effect` "large enough to matter"
once n is large. The permutation count is raised until the smallest attainable Holm-adjusted
p-value, tests / (permutations + 1), is at most half of alpha.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

TESTS = ("ks", "cvm")
MAX_PERMUTATIONS = 100_000
P_RESOLUTION = 0.5  # the smallest attainable Holm-adjusted p as a share of alpha
CHUNK_CELLS = 2_000_000  # permutations x sequences evaluated at once (16 MB per float array)
GROUPED_CELLS = 2  # distinct values x clusters per sequence below which the counts path is used


@dataclass(frozen=True)
class TestResult:
    metric: str
    test: str
    statistic: float
    p_value: float
    effect_size: float  # normalized Wasserstein distance (W1 / baseline standard deviation)
    threshold: float  # the effect size a significant result must reach
    n_baseline: int
    n_current: int
    psi: float
    js: float
    verdict: str  # "drift" | "no_drift" | "insufficient_data"
    unit: str = "sequence"  # what was permuted: "prompt" clusters, or single "sequence"s (no keys)
    clusters_baseline: int = 0
    clusters_current: int = 0


def permutations_for(alpha: float, tests: int, requested: int = 0) -> int:
    """`requested`, raised until the smallest attainable Holm-adjusted p-value of `tests`
    tests is at most P_RESOLUTION * alpha; ValueError naming `alpha` past MAX_PERMUTATIONS."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    needed = math.ceil(tests / (P_RESOLUTION * alpha) - 1e-9) - 1
    if needed > MAX_PERMUTATIONS:
        lowest = tests / (P_RESOLUTION * (MAX_PERMUTATIONS + 1))
        raise ValueError(f"alpha={alpha} cannot be reached: {tests} tests need {needed} permutations for a Holm-"
                         f"adjusted p-value below it, and the most is {MAX_PERMUTATIONS}; use alpha >= {lowest:.2g}")
    return max(requested, needed)


def ecdf_gaps(pooled_sorted_labels: np.ndarray, tie_ends: np.ndarray, n, m) -> np.ndarray:
    """F_baseline − F_current at every pooled point, for each row of labels (True = current);
    n and m are the side sizes, scalars or one per row ([rows, 1]).

    Labels are given in the order of the sorted pooled sample; at tied values both ECDFs are
    read at the end of the tie group, so ties count the way scipy counts them."""
    # baseline / n - current / m with baseline = position - current (an integer running count
    # first: a float cumulative sum costs several times as much)
    gaps = np.cumsum(pooled_sorted_labels, axis=-1, dtype=np.int32) * -(1 / np.asarray(n, np.float64)
                                                                        + 1 / np.asarray(m, np.float64))
    gaps += np.arange(1, pooled_sorted_labels.shape[-1] + 1) / np.asarray(n, np.float64)
    if len(tie_ends) and tie_ends[-1] == len(tie_ends) - 1 and np.all(tie_ends[:-1] < tie_ends[1:]):
        return gaps  # no ties: every point is its own group end
    return gaps[..., tie_ends]


def ks_cvm(x: np.ndarray, y: np.ndarray, permutations: int = 2999, seed: int = 0,
           clusters: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Kolmogorov–Smirnov and Cramér–von Mises statistics of baseline `x` vs current `y`, with
    permutation p-values (one shared set of permutations of the pooled clusters)."""
    null = permutation_null(x, y, permutations, seed, clusters)
    return {test: (float(null[test][0]), _p_value(null[test])) for test in TESTS}


def permutation_null(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0,
                     clusters: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """KS, CvM and normalized W1 ("effect") of the observed split (element 0) and of
    `permutations` random splits that keep every cluster on one side. `clusters` gives each
    sequence of x and of y its cluster number within its side (0..k-1); none: one per sequence."""
    cx, cy = clusters if clusters is not None else (np.arange(len(x)), np.arange(len(y)))
    kx, ky = int(cx.max()) + 1, int(cy.max()) + 1
    pooled = np.concatenate([x, y])
    values, group = np.unique(pooled, return_inverse=True)
    if len(values) * (kx + ky) <= GROUPED_CELLS * len(pooled):
        return _grouped_null(values, group, np.r_[cx, cy + kx], kx, ky, permutations, seed)
    order = np.argsort(pooled, kind="stable")
    sorted_values = pooled[order]
    # index of the last member of each tie group, repeated for every member
    last = np.r_[np.flatnonzero(np.diff(sorted_values) != 0), len(pooled) - 1]
    tie_ends = np.repeat(last, np.diff(np.r_[-1, last]))
    cluster_of = np.r_[cx, cy + kx][order]
    # per cluster: sequences, and sums of the centered values and their squares (a split's side
    # moments are a [splits, clusters] product, not a pass over every sequence)
    centered = sorted_values - sorted_values.mean()
    moments = np.zeros((kx + ky, 3))
    np.add.at(moments, cluster_of, np.c_[np.ones(len(pooled)), centered, centered**2])
    observed = np.r_[np.zeros(kx, bool), np.ones(ky, bool)]
    every = random_splits(kx, ky, permutations, seed)
    rows = max(1, CHUNK_CELLS // len(pooled))
    parts = [_split_statistics(observed[None, :], cluster_of, sorted_values, tie_ends, moments)]
    for start in range(0, permutations, rows):
        parts.append(_split_statistics(every[start:start + rows], cluster_of, sorted_values, tie_ends, moments))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


@functools.lru_cache(maxsize=4)
def random_splits(kx: int, ky: int, permutations: int, seed: int) -> np.ndarray:
    """[permutations, kx + ky] random deals of the clusters (True = current side), read-only:
    the same for every metric of a comparison whose sides have these cluster counts, so they
    are drawn once (a comparison's metrics share one set of relabelings)."""
    observed = np.r_[np.zeros(kx, bool), np.ones(ky, bool)]
    splits = np.random.default_rng(seed).permuted(np.tile(observed, (permutations, 1)), axis=1)
    splits.flags.writeable = False
    return splits


def _grouped_null(values: np.ndarray, group: np.ndarray, cluster: np.ndarray, kx: int, ky: int, permutations: int,
                  seed: int) -> dict[str, np.ndarray]:
    """`permutation_null` for a sample of few distinct values (an indicator, a constant): every
    statistic is a function of how many sequences of each value each side holds, and a split's
    counts are its clusters' (a [splits, clusters] @ [clusters, values] product), so no
    per-sequence array is built. The same splits, in the same order, as the general path."""
    counts = np.zeros((kx + ky, len(values)))
    np.add.at(counts, (cluster, group), 1.0)
    observed = np.r_[np.zeros(kx, bool), np.ones(ky, bool)]
    every = random_splits(kx, ky, permutations, seed)
    rows = max(1, CHUNK_CELLS // (kx + ky))
    parts = [_count_statistics(observed[None, :].astype(float) @ counts, counts.sum(axis=0), values)]
    for start in range(0, permutations, rows):
        splits = every[start:start + rows]
        parts.append(_count_statistics(splits.astype(float) @ counts, counts.sum(axis=0), values))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _count_statistics(current: np.ndarray, total: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """KS, CvM and normalized W1 from each split's current count of every distinct value
    ([splits, values], values ascending; `total` the pooled counts): `_split_statistics` with
    each tie group's gap counted once per member."""
    baseline = total - current
    m = current.sum(axis=1)
    n = baseline.sum(axis=1)
    gaps = np.cumsum(baseline, axis=1) / n[:, None] - np.cumsum(current, axis=1) / m[:, None]
    w1 = np.abs(gaps[:, :-1]) @ np.diff(values)
    centered = values - (total @ values) / total.sum()
    effect = _effect(w1, n, baseline @ centered, baseline @ centered**2, float(np.abs(centered).max()))
    return {
        "ks": np.abs(gaps).max(axis=1),
        "cvm": n * m / (n + m) ** 2 * ((gaps**2) @ total),
        "effect": effect,
    }


def _effect(w1: np.ndarray, n: np.ndarray, baseline_sum: np.ndarray, baseline_squares: np.ndarray,
            spread: float) -> np.ndarray:
    """W1 over the baseline's standard deviation, from the baseline's sums of the centered
    values and their squares; inf for a constant baseline the current differs from."""
    mean = baseline_sum / n
    scale = np.sqrt(np.maximum(baseline_squares / n - mean**2, 0.0))
    scale[scale <= 1e-9 * spread] = 0.0  # a constant baseline, up to rounding
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, w1 / scale, np.where(w1 > 1e-12 * max(spread, 1.0), np.inf, 0.0))


def _split_statistics(splits: np.ndarray, cluster_of: np.ndarray, sorted_values: np.ndarray, tie_ends: np.ndarray,
                      moments: np.ndarray) -> dict[str, np.ndarray]:
    """KS, CvM and normalized W1 for each row of cluster labels (True = current) over the
    sorted pooled sample, whose sequences belong to clusters `cluster_of`; `moments` are the
    clusters' sequence counts and sums of centered values and their squares."""
    current = splits.astype(np.float64) @ moments
    m = current[:, 0]
    n = len(cluster_of) - m
    gaps = ecdf_gaps(splits[:, cluster_of], tie_ends, n[:, None], m[:, None])
    absolute = np.abs(gaps)
    w1 = absolute[:, :-1] @ np.diff(sorted_values)
    total = moments.sum(axis=0)
    centered_spread = float(np.abs(sorted_values - sorted_values.mean()).max())
    effect = _effect(w1, n, total[1] - current[:, 1], total[2] - current[:, 2], centered_spread)
    return {
        "ks": absolute.max(axis=1),
        "cvm": n * m / (n + m) ** 2 * np.einsum("ij,ij->i", gaps, gaps),  # Anderson's form; equals scipy's rank formula
        "effect": effect,
    }


def prompt_clusters(keys: np.ndarray | None, n: int) -> np.ndarray:
    """Cluster number (0..k-1) of each of n sequences of one side: one per distinct prompt
    key, and one per sequence without a key."""
    if keys is None:
        return np.arange(n)
    keys = np.asarray(keys, dtype=object)
    keyed = ~np.equal(keys, None)
    codes = np.empty(n, np.int64)
    distinct, codes[keyed] = np.unique(keys[keyed].astype(str), return_inverse=True)
    codes[~keyed] = len(distinct) + np.arange(n - int(keyed.sum()))
    return codes


def log_splits(kx: int, ky: int) -> float:
    """log of the number of distinct ways to deal kx + ky clusters into sides of kx and ky."""
    return math.lgamma(kx + ky + 1) - math.lgamma(kx + 1) - math.lgamma(ky + 1)


def _p_value(stats: np.ndarray) -> float:
    """(1 + #permutations at least as extreme) / (1 + permutations); a small tolerance keeps
    floating-point ties on the extreme side."""
    observed = stats[0]
    return float((1 + np.sum(stats[1:] >= observed - 1e-12 * max(1.0, abs(observed)))) / len(stats))


def wasserstein(x: np.ndarray, y: np.ndarray) -> float:
    """First Wasserstein distance between the empirical distributions of x and y."""
    values = np.sort(np.concatenate([x, y]))
    widths = np.diff(values)
    fx = np.searchsorted(np.sort(x), values[:-1], side="right") / len(x)
    fy = np.searchsorted(np.sort(y), values[:-1], side="right") / len(y)
    return float(np.sum(np.abs(fx - fy) * widths))


def normalized_wasserstein(x: np.ndarray, y: np.ndarray) -> float:
    """W1 in units of the baseline's standard deviation (Evidently's normalization); 0 when both
    samples are constant and equal, inf when the baseline is constant and the current is not."""
    distance = wasserstein(x, y)
    scale = float(np.std(x))
    if scale > 0:
        return distance / scale
    return 0.0 if distance == 0 else float("inf")


def binned(x: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Shares of x and y in `bins` quantile bins of x (ties merged), each floored at 1e-4."""
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    px = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1) / len(x)
    py = np.bincount(np.searchsorted(edges, y, side="right"), minlength=len(edges) + 1) / len(y)
    return np.maximum(px, 1e-4), np.maximum(py, 1e-4)


def psi(x: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Population stability index of y against x over quantile bins of x."""
    px, py = binned(x, y, bins)
    return float(np.sum((py - px) * np.log(py / px)))


def jensen_shannon(x: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between the binned distributions."""
    px, py = binned(x, y, bins)
    px, py = px / px.sum(), py / py.sum()
    mid = (px + py) / 2
    divergence = 0.5 * np.sum(px * np.log2(px / mid)) + 0.5 * np.sum(py * np.log2(py / mid))
    return float(np.sqrt(max(divergence, 0.0)))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control, any dependence)."""
    order = np.argsort(p_values)
    k = len(p_values)
    adjusted = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare(
    baseline: dict[str, np.ndarray],
    current: dict[str, np.ndarray],
    alpha: float = 0.01,
    min_effect: float = 0.1,
    min_sequences: int = 50,
    permutations: int = 2999,
    seed: int = 0,
    baseline_keys: np.ndarray | None = None,
    current_keys: np.ndarray | None = None,
) -> list[TestResult]:
    """Every (metric, test) of `current` against `baseline`, Holm-corrected at family-wise
    level `alpha`; `p_value` in the results is the adjusted one. `*_keys` are the prompt
    keys of the sequences (None where unknown), aligned with every metric array."""
    permutations = permutations_for(alpha, len(TESTS) * len(baseline), permutations)
    unit = "prompt" if _has_keys(baseline_keys) or _has_keys(current_keys) else "sequence"
    pending: list[TestResult] = []
    for metric, x in baseline.items():
        x, x_clusters = _finite(x, baseline_keys)
        y, y_clusters = _finite(current[metric], current_keys)
        pending += _metric_results(metric, x, y, (x_clusters, y_clusters), unit, alpha, min_effect,
                                   min_sequences, permutations, seed)
    adjusted = holm([r.p_value for r in pending]) if pending else []
    return [replace(r, p_value=p, verdict=_verdict(r, p, alpha)) for r, p in zip(pending, adjusted)]


def _metric_results(metric: str, x: np.ndarray, y: np.ndarray, clusters: tuple[np.ndarray, np.ndarray], unit: str,
                    alpha: float, min_effect: float, min_sequences: int, permutations: int,
                    seed: int) -> list[TestResult]:
    """One metric's tests with raw p-values; verdict "insufficient_data" when either side has
    too few sequences, or the clusters too few distinct splits for `permutations`."""
    kx, ky = (int(c.max(initial=-1)) + 1 for c in clusters)
    common = dict(n_baseline=len(x), n_current=len(y), unit=unit, clusters_baseline=kx, clusters_current=ky)
    if min(len(x), len(y)) < min_sequences or log_splits(kx, ky) < math.log(permutations + 1):
        nan = float("nan")
        return [TestResult(metric, test, nan, 1.0, nan, nan, psi=nan, js=nan, verdict="insufficient_data", **common)
                for test in TESTS]
    null = permutation_null(x, y, permutations, seed, clusters)
    effect = null["effect"]
    threshold = max(min_effect, float(np.quantile(effect[1:], 1 - alpha, method="higher")))
    return [TestResult(metric, test, float(null[test][0]), _p_value(null[test]), float(effect[0]), threshold,
                       psi=psi(x, y), js=jensen_shannon(x, y), verdict="pending", **common) for test in TESTS]


def _verdict(result: TestResult, adjusted_p: float, alpha: float) -> str:
    if result.verdict == "insufficient_data":
        return result.verdict
    return "drift" if adjusted_p <= alpha and result.effect_size >= result.threshold else "no_drift"


def _has_keys(keys: np.ndarray | None) -> bool:
    return keys is not None and bool((~np.equal(np.asarray(keys, dtype=object), None)).any())


def _finite(values: np.ndarray, keys: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The finite values and the prompt cluster of each."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return values[finite], prompt_clusters(None if keys is None else np.asarray(keys, dtype=object)[finite],
                                            int(finite.sum()))
