"""Online change detectors with one small surface: `update(...)`, then read `drift_detected`
(`update_many(...)`: the same over an array, vectorized, returning the index of the first
alarm). `state()` / `from_state()` carry a detector between monitor runs.

Thresholds are calibrated, not guessed, and for the reference actually in use. The live
CUSUM standardizes with its reference's mean and std, which are estimates: a threshold right
on average over references leaves some references alarming far sooner than promised. So
`calibrated(reference, target_arl)` first finds the threshold whose average run length
(sequences until a false alarm) is the target when the truth is the reference's own
distribution (resampled streams: skew, heavy tails and the point mass at zero of overflow
counts kept, where a normal-theory threshold would be wrong), then raises it by what
`guarantee` (0.9) of the plausible truths need: bootstrap resamples of the reference, seen
through the reference's fixed mean and std, each one's threshold from Siegmund's ARL
approximation (only differences of it are used, which cancel most of its error). With
probability about `guarantee`, the ARL for the reference in use reaches the target (Gandy &
Kvaløy's guaranteed conditional performance, by a cheaper route). The Poisson CUSUM's
reference rate is the `guarantee` upper bound of the rate its reference allows (Jeffreys
posterior), so a reference without events does not claim a zero rate.
"""

from __future__ import annotations

import math

import numpy as np

GUARANTEE = 0.9  # share of the plausible true distributions whose ARL reaches the target


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
                   seed: int = 0, guarantee: float | None = GUARANTEE, truths: int = 400) -> CUSUM:
        """The detector standardized with the mean and std of `reference` (the reference in use),
        with the threshold whose ARL is `target_arl`: under the reference's own distribution
        (simulated), raised by what the plausible true distributions need, in `guarantee` of
        them (module docstring). `guarantee=None`: no raise."""
        reference = np.asarray(reference, np.float64)
        reference = reference[np.isfinite(reference)]
        mean, std = float(reference.mean()), float(reference.std()) or 1.0
        rng = np.random.default_rng(seed)
        z = (reference - mean) / std  # as the live detector will see the reference's distribution
        steps = z[rng.integers(0, len(z), (streams, path_length(target_arl)))]
        paths = np.maximum(lindley(steps - k), lindley(-steps - k))
        threshold = threshold_for_arl(paths, target_arl)
        if guarantee is not None and len(z) > 1:
            plausible = z[rng.integers(0, len(z), (truths, len(z)))]  # bootstrap: the truth, seen through (mean, std)
            needed = _siegmund_threshold(np.vstack([z, plausible]), k, target_arl)
            raise_by = float(np.quantile(needed[1:] - needed[0], guarantee))
            threshold += min(max(raise_by, 0.0), 3 * threshold)
        return cls(mean, std, threshold, k)


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
                   streams: int = 400, seed: int = 0, min_rate: float = 1e-6,
                   guarantee: float | None = GUARANTEE) -> PoissonCUSUM:
        """The reference rate is the `guarantee` upper bound of the rate the reference allows
        (Jeffreys posterior: Gamma(events + ½, exposure)), so a clean reference (no events) does
        not claim a rate of zero; the threshold gives `target_arl` when that is the true rate,
        simulated from the reference's own sequences (their exposures, and the clustering of
        their events) plus Poisson events at the rest of the rate."""
        counts, exposures = np.asarray(counts, np.float64), np.asarray(exposures, np.float64)
        finite = np.isfinite(counts) & np.isfinite(exposures)
        counts, exposures = counts[finite], exposures[finite]
        events, exposure = float(counts.sum()), max(float(exposures.sum()), 1.0)
        observed = events / exposure
        if guarantee is None:
            rate = max(observed, min_rate)
        else:
            from scipy.stats import gamma

            rate = max(float(gamma.ppf(guarantee, events + 0.5)) / exposure, observed, min_rate)
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(counts), (streams, path_length(target_arl)))
        simulated = counts[pick] + rng.poisson((rate - observed) * exposures[pick]) if rate > observed else counts[pick]
        increments = simulated * math.log(ratio) - exposures[pick] * rate * (ratio - 1)
        paths = lindley(increments)
        threshold = threshold_for_arl(paths, target_arl) if paths.max() > 0 else math.log(ratio) / 2
        return cls(rate, threshold, ratio, min_rate)


def lindley(increments: np.ndarray, start: float = 0.0) -> np.ndarray:
    """S_t = max(0, S_{t-1} + x_t) from S_0 = `start` >= 0 along the last axis, without a loop
    over t: S_t = C_t − min(−start, min_{s<=t} C_s), with C the cumulative sum. float32 for the
    simulated paths of calibration (start 0); float64 for a live detector's state."""
    c = np.cumsum(increments, axis=-1, dtype=np.float64)
    s = c - np.minimum(np.minimum.accumulate(c, axis=-1), -start)
    return s.astype(np.float32) if start == 0 and s.ndim > 1 else s


def _siegmund_threshold(truths: np.ndarray, k: float, target_arl: float) -> np.ndarray:
    """Per row of standardized values (a true distribution, as the detector standardizes it),
    the two-sided CUSUM threshold with ARL `target_arl` by Siegmund's approximation: one side
    with increments Y of mean μ < 0 has ARL(h) ≈ (e^{θb} − θb − 1) / (θ|μ|), b = h + 1.166·sd(Y),
    θ > 0 the root of E e^{θY} = 1; the sides together 1 / (1/ARL⁺ + 1/ARL⁻). Used for the
    differences between rows, which cancel most of the approximation's error."""
    sides = []
    for y in (truths - k, -truths - k):
        mu, sd = y.mean(axis=1), y.std(axis=1)
        lo, hi = np.full(len(y), 1e-6), np.full(len(y), 50.0)
        for _ in range(60):  # E e^{θY} = 1, in logs: convex in θ, zero at 0, negative just after
            mid = (lo + hi) / 2
            m = y.max(axis=1)
            value = np.log(np.mean(np.exp(mid[:, None] * (y - m[:, None])), axis=1)) + mid * m
            below = value < 0
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        sides.append((hi, np.maximum(-mu, 1e-9), 1.166 * sd))

    def arl(h):
        inverse = 0.0
        for theta, drift, rho in sides:
            b = np.minimum(theta * (h + rho), 700)
            inverse = inverse + theta * drift / np.maximum(np.expm1(b) - b, 1e-300)
        return 1 / inverse

    lo, hi = np.zeros(len(truths)), np.full(len(truths), 1e4)
    for _ in range(80):
        mid = (lo + hi) / 2
        short = arl(mid) < target_arl
        lo, hi = np.where(short, mid, lo), np.where(short, hi, mid)
    return hi


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
