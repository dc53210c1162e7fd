"""Online change detectors with one small surface: `update(...)`, then read `drift_detected`.

Thresholds are calibrated, not guessed: `calibrated(reference, target_arl)` resamples the
reference sequences into many no-change streams and picks the threshold whose average run
length (sequences until a false alarm) is the target. Resampling keeps the reference's real
shape (skew, heavy tails, the point mass at zero of overflow counts), where a normal-theory
threshold would alarm far more often than it promises.
"""

from __future__ import annotations

import math

import numpy as np


class CUSUM:
    """Standardized two-sided CUSUM of a sequence-level statistic.

    z = (x − mean) / std; S⁺ = max(0, S⁺ + z − k), S⁻ = max(0, S⁻ − z − k); drift when either
    exceeds `threshold`. `k` is half the shift (in standard deviations) it is tuned to find."""

    def __init__(self, mean: float, std: float, threshold: float, k: float = 0.25):
        self.mean, self.std, self.threshold, self.k = mean, std if std > 0 else 1.0, threshold, k
        self.upper = self.lower = 0.0
        self.n = 0
        self.drift_detected = False

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        z = (x - self.mean) / self.std
        self.upper = max(0.0, self.upper + z - self.k)
        self.lower = max(0.0, self.lower - z - self.k)
        self.n += 1
        self.drift_detected = max(self.upper, self.lower) > self.threshold

    @property
    def statistic(self) -> float:
        return max(self.upper, self.lower)

    def reset(self) -> None:
        self.upper = self.lower = 0.0
        self.drift_detected = False

    def update_many(self, xs: np.ndarray) -> int | None:
        """`update` over each of `xs` in order, vectorized; stops at the first alarm and returns
        its index in `xs` (None: no alarm, all of `xs` fed). Non-finite values are skipped."""
        xs = np.asarray(xs, np.float64)
        finite = np.isfinite(xs)
        z = (xs[finite] - self.mean) / self.std
        if not len(z):
            return None
        upper = lindley(z - self.k, self.upper)
        lower = lindley(-z - self.k, self.lower)
        over = np.flatnonzero(np.maximum(upper, lower) > self.threshold)
        stop = int(over[0]) if len(over) else len(z) - 1
        self.upper, self.lower = float(upper[stop]), float(lower[stop])
        self.n += stop + 1
        self.drift_detected = bool(len(over))
        return int(np.flatnonzero(finite)[stop]) if len(over) else None

    def state(self) -> dict:
        return {"mean": float(self.mean), "std": float(self.std), "threshold": float(self.threshold),
                "k": float(self.k), "upper": float(self.upper), "lower": float(self.lower), "n": int(self.n)}

    @classmethod
    def from_state(cls, state: dict) -> CUSUM:
        detector = cls(state["mean"], state["std"], state["threshold"], state["k"])
        detector.upper, detector.lower, detector.n = state["upper"], state["lower"], state["n"]
        return detector

    @classmethod
    def calibrated(cls, reference: np.ndarray, target_arl: float = 500, k: float = 0.25, streams: int = 400,
                   seed: int = 0) -> CUSUM:
        reference = np.asarray(reference, np.float64)
        reference = reference[np.isfinite(reference)]
        mean, std = float(reference.mean()), float(reference.std()) or 1.0
        rng = np.random.default_rng(seed)
        # Each simulated stream standardizes with the mean and std of its own bootstrap copy of
        # the reference: the live detector's mean and std are estimates too, and a small
        # reference's estimation error would otherwise bring false alarms far sooner than promised.
        boot = reference[rng.integers(0, len(reference), (streams, len(reference)))]
        stream_mean, stream_std = boot.mean(axis=1), boot.std(axis=1)
        stream_std[stream_std == 0] = 1.0
        length = path_length(target_arl)
        steps = (reference[rng.integers(0, len(reference), (streams, length))] - stream_mean[:, None]) / stream_std[:, None]
        paths = np.maximum(lindley(steps - k), lindley(-steps - k))
        return cls(mean, std, threshold_for_arl(paths, target_arl), k)


class PoissonCUSUM:
    """One-sided CUSUM for a rise in the rate of rare counts (non-finite or overflowing logits
    per generated token), with each sequence's token count as its exposure.

    The log-likelihood ratio of rate `ratio`·λ₀ against λ₀ per sequence with c events in n
    tokens is c·log(ratio) − n·λ₀·(ratio − 1). λ₀ is floored (a clean reference has λ₀ = 0,
    and then any event is evidence of change)."""

    def __init__(self, rate: float, threshold: float, ratio: float = 2.0, min_rate: float = 1e-6):
        self.rate, self.threshold, self.ratio, self.min_rate = max(rate, min_rate), threshold, ratio, min_rate
        self.statistic = 0.0
        self.n = 0
        self.drift_detected = False

    def update(self, count: float, exposure: float = 1.0) -> None:
        if not (math.isfinite(count) and math.isfinite(exposure)):
            return
        self.statistic = max(0.0, self.statistic + count * math.log(self.ratio) - exposure * self.rate * (self.ratio - 1))
        self.n += 1
        self.drift_detected = self.statistic > self.threshold

    def reset(self) -> None:
        self.statistic = 0.0
        self.drift_detected = False

    def update_many(self, counts: np.ndarray, exposures: np.ndarray) -> int | None:
        """`update` over each (count, exposure) in order, vectorized; stops at the first alarm and
        returns its index (None: no alarm). Pairs with a non-finite member are skipped."""
        counts, exposures = np.asarray(counts, np.float64), np.asarray(exposures, np.float64)
        finite = np.isfinite(counts) & np.isfinite(exposures)
        steps = counts[finite] * math.log(self.ratio) - exposures[finite] * self.rate * (self.ratio - 1)
        if not len(steps):
            return None
        path = lindley(steps, self.statistic)
        over = np.flatnonzero(path > self.threshold)
        stop = int(over[0]) if len(over) else len(steps) - 1
        self.statistic = float(path[stop])
        self.n += stop + 1
        self.drift_detected = bool(len(over))
        return int(np.flatnonzero(finite)[stop]) if len(over) else None

    def state(self) -> dict:
        return {"rate": float(self.rate), "threshold": float(self.threshold), "ratio": float(self.ratio),
                "min_rate": float(self.min_rate), "statistic": float(self.statistic), "n": int(self.n)}

    @classmethod
    def from_state(cls, state: dict) -> PoissonCUSUM:
        detector = cls(state["rate"], state["threshold"], state["ratio"], state["min_rate"])
        detector.statistic, detector.n = state["statistic"], state["n"]
        return detector

    @classmethod
    def calibrated(cls, counts: np.ndarray, exposures: np.ndarray, target_arl: float = 500, ratio: float = 2.0,
                   streams: int = 400, seed: int = 0, min_rate: float = 1e-6) -> PoissonCUSUM:
        counts, exposures = np.asarray(counts, np.float64), np.asarray(exposures, np.float64)
        rate = max(float(counts.sum() / max(exposures.sum(), 1.0)), min_rate)
        increments = counts * math.log(ratio) - exposures * rate * (ratio - 1)
        rng = np.random.default_rng(seed)
        paths = lindley(increments[rng.integers(0, len(increments), (streams, path_length(target_arl)))])
        # a clean reference never moves the statistic off zero: the smallest threshold that one
        # event crosses is the right one (any event is news)
        threshold = threshold_for_arl(paths, target_arl) if paths.max() > 0 else math.log(ratio) / 2
        return cls(rate, threshold, ratio, min_rate)


def lindley(increments: np.ndarray, start: float = 0.0) -> np.ndarray:
    """S_t = max(0, S_{t-1} + x_t) from S_0 = `start` >= 0 along the last axis, without a loop
    over t: S_t = C_t − min(−start, min_{s<=t} C_s), with C the cumulative sum. float32 for the
    simulated paths of calibration (start 0); float64 for a live detector's state."""
    c = np.cumsum(increments, axis=-1, dtype=np.float64)
    s = c - np.minimum(np.minimum.accumulate(c, axis=-1), -start)
    return s.astype(np.float32) if start == 0 and s.ndim > 1 else s


def threshold_for_arl(paths: np.ndarray, target_arl: float) -> float:
    """The threshold h whose mean first-passage time over the simulated no-change `paths`
    ([streams, length] statistic values) is `target_arl`. Run lengths are close to
    exponential, so streams that never cross are censored observations: the estimate is
    the exponential MLE (time observed / crossings), which lets paths be shorter than the
    target."""
    running_max = np.maximum.accumulate(paths, axis=1)
    length = paths.shape[1]

    def arl(h: float) -> float:
        crossed = running_max > h
        ever = crossed[:, -1]
        first = np.where(ever, crossed.argmax(axis=1) + 1, length)
        return float(first.sum() / max(ever.sum(), 0.5))

    low, high = 0.0, float(running_max[:, -1].max())
    for _ in range(40):
        mid = (low + high) / 2
        if arl(mid) < target_arl:
            low = mid
        else:
            high = mid
    return high


def path_length(target_arl: float) -> int:
    """Simulated stream length: a few run lengths where that is cheap, enough crossings for
    the censored estimate where it is not."""
    return int(min(3 * target_arl, 20_000))
