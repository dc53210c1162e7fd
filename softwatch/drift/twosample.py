"""Two-sample tests on sequence-level statistics, effect sizes, and the verdict rule.

One sample unit is one sequence: token statistics within a sequence are correlated, so the
tests permute whole sequences, never tokens. A comparison says "drift" for a metric only
when the difference is both significant after Holm's correction across every test of the
comparison and large (normalized Wasserstein distance at least `min_effect`): with
thousands of sequences a negligible shift is significant, and an operator should not be
paged for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

TESTS = ("ks", "cvm")


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


def ecdf_gaps(pooled_sorted_labels: np.ndarray, tie_ends: np.ndarray, n: int, m: int) -> np.ndarray:
    """F_baseline − F_current at every pooled point, for each row of labels (True = current).

    Labels are given in the order of the sorted pooled sample; at tied values both ECDFs are
    read at the end of the tie group, so ties count the way scipy counts them."""
    current = np.cumsum(pooled_sorted_labels, axis=-1)
    baseline = np.arange(1, pooled_sorted_labels.shape[-1] + 1) - current
    gaps = baseline / n - current / m
    return gaps[..., tie_ends]


def ks_cvm(x: np.ndarray, y: np.ndarray, permutations: int = 2999, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Kolmogorov–Smirnov and Cramér–von Mises statistics of baseline `x` vs current `y`, with
    permutation p-values (one shared set of permutations of the pooled sequences)."""
    n, m = len(x), len(y)
    pooled = np.concatenate([x, y])
    order = np.argsort(pooled, kind="stable")
    sorted_values = pooled[order]
    # index of the last member of each tie group, repeated for every member
    last = np.r_[np.flatnonzero(np.diff(sorted_values) != 0), len(pooled) - 1]
    tie_ends = np.repeat(last, np.diff(np.r_[-1, last]))
    labels = np.r_[np.zeros(n, bool), np.ones(m, bool)]
    all_labels = np.vstack([labels[order], _permuted_labels(n, m, permutations, seed)])
    gaps = ecdf_gaps(all_labels, tie_ends, n, m)
    ks = np.abs(gaps).max(axis=1)
    cvm = n * m / (n + m) ** 2 * (gaps**2).sum(axis=1)  # Anderson's form; equals scipy's rank formula
    return {"ks": (float(ks[0]), _p_value(ks)), "cvm": (float(cvm[0]), _p_value(cvm))}


@functools.lru_cache(maxsize=8)
def _permuted_labels(n: int, m: int, permutations: int, seed: int) -> np.ndarray:
    """Random relabelings of n baseline and m current sequences, one per row; shared by every
    metric of a comparison (read-only)."""
    labels = np.tile(np.r_[np.zeros(n, bool), np.ones(m, bool)], (permutations, 1))
    shuffled = np.random.default_rng(seed).permuted(labels, axis=1)
    shuffled.flags.writeable = False
    return shuffled


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
) -> list[TestResult]:
    """Every (metric, test) of `current` against `baseline`, Holm-corrected at family-wise
    level `alpha`; `p_value` in the results is the adjusted one."""
    raw: list[tuple[str, str, float, float, float, float, float, int, int]] = []
    for metric, x in baseline.items():
        x = _finite(x)
        y = _finite(current[metric])
        if min(len(x), len(y)) < min_sequences:
            raw += [(metric, test, float("nan"), 1.0, float("nan"), float("nan"), float("nan"), len(x), len(y))
                    for test in TESTS]
            continue
        results = ks_cvm(x, y, permutations, seed)
        effect, stability, js = normalized_wasserstein(x, y), psi(x, y), jensen_shannon(x, y)
        raw += [(metric, test, *results[test], effect, stability, js, len(x), len(y)) for test in TESTS]
    adjusted = holm([r[3] for r in raw]) if raw else []
    out = []
    for (metric, test, statistic, _, effect, stability, js, n, m), p in zip(raw, adjusted):
        if min(n, m) < min_sequences:
            verdict = "insufficient_data"
        else:
            verdict = "drift" if p <= alpha and effect >= min_effect else "no_drift"
        out.append(TestResult(metric, test, statistic, p, effect, min_effect, n, m, stability, js, verdict))
    return out


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]
