"""Partial faults: each replica, and each deployment, of the newest regime against the others.

A fault on one replica of five (a bad GPU, a corrupted weight shard, a different kernel) keeps
the regime's labels, and in the regime's pooled sequences it is diluted to a fifth: the
regime and window comparisons miss it. Here the regime's most recent `max_sequences`
sequences (one LIMIT query over the files that hold them) are grouped by replica
(`deployment`/`replica`) and by deployment; each group's most recent `replica_sequences`
are compared with as many of the other groups' sequences, an equal share from each, from the
same time span or nearest to it (so a group that started late is not compared with an
earlier, different traffic, and one faulty group is a share of every other group's
baseline), with the cluster-aware tests of twosample.py.

Error control: `compare` keeps Holm's family-wise level over the metrics × tests of one
comparison; the groups compared in one run are a family of m comparisons, each run at
alpha / m (Bonferroni). P(any false `drift` verdict among all replicas, deployments,
metrics and tests of a run) <= alpha. Holm over all m × metrics × tests pooled would reject
a little more once one group has drifted, but the calibrated effect gate needs one level
per comparison, and the smallest p-value either method must reach is the same
(alpha / (m × tests)), so both need the same permutations.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from .twosample import TESTS, permutations_for

if TYPE_CHECKING:
    from .monitor import Monitor, Report, Sample

log = logging.getLogger("softwatch.drift")


def compare_groups(monitor: Monitor, report: Report, regime: dict) -> list[dict]:
    """`replica` and `deployment` rows for the newest regime: one comparison per group with
    enough sequences, each at alpha / (number of groups compared)."""
    from .monitor import METRICS, _describe, _regime_filter

    config = monitor.config
    sample = monitor.regime_sample(regime, "last", config.max_sequences)
    label = _describe(_regime_filter(regime))
    pairs = [pair for kind, column in (("replica", _replica_of(sample)), ("deployment", sample.deployment))
             for pair in _group_pairs(kind, column, sample, config.replica_sequences, config.min_sequences)]
    if not pairs:
        return []
    alpha = config.alpha / len(pairs)
    try:
        permutations = permutations_for(alpha, len(TESTS) * len(METRICS), config.permutations)
    except ValueError as exc:
        log.warning("softwatch: %d replica/deployment comparisons are too many for alpha=%s (%s); skipped",
                    len(pairs), config.alpha, exc)
        return []
    group_config = dataclasses.replace(config, alpha=alpha, permutations=permutations)
    rows = []
    for kind, name, mine, others in pairs:
        deployment, _, replica = name.partition("/") if kind == "replica" else (name, "", None)
        where = f"deployment={deployment}" + (f",replica={replica}" if kind == "replica" else "")
        mine = dataclasses.replace(mine, label=f"{label}[{where}]")
        others = dataclasses.replace(others, label=f"{label}[other {kind}s]")
        for row in monitor.compare_with(report, kind, others, mine, group_config):
            rows.append({**row, "deployment": deployment, "replica": replica})
    return rows


def _replica_of(sample: Sample) -> np.ndarray:
    """`deployment/replica` of each sequence (replica names are only unique within a
    deployment); None where the producer named no replica."""
    return np.array([None if r is None else f"{d}/{r}" for d, r in zip(sample.deployment, sample.replica)],
                    dtype=object)


def _group_pairs(kind: str, column: np.ndarray, sample: Sample, per_side: int,
                 min_sequences: int) -> list[tuple[str, str, Sample, Sample]]:
    """(kind, group, its most recent `per_side` sequences, as many of the others') for each
    group of `column` with `min_sequences` on both sides; none when there is one group only.
    The others' side takes an equal share from each other group, from the group's time span
    or nearest to it, so that one faulty group is a share of every other group's baseline
    and not the bulk of it."""
    names = [n for n in dict.fromkeys(column.tolist()) if n is not None]
    if len(names) < 2:
        return []
    pairs = []
    for name in names:
        mine = sample.take(np.flatnonzero(column == name)[-per_side:])
        if len(mine) < min_sequences:
            continue
        share = -(-per_side // (len(names) - 1))
        others = np.sort(np.concatenate([_nearest_in_time(np.flatnonzero(column == other), sample.ts, mine.ts[0],
                                                          mine.ts[-1], share)
                                         for other in names if other != name]))[:per_side]
        if len(others) >= min_sequences:
            pairs.append((kind, name, mine, sample.take(others)))
    return pairs


def _nearest_in_time(others: np.ndarray, ts: np.ndarray, start: int, end: int, n: int) -> np.ndarray:
    """Up to n of the `others` (indices into ts, in time order): spread evenly over those
    inside [start, end] when they are more than n (the same rows on every run), else the n
    nearest to the span (a group's sequences can all finish within one decoding step)."""
    distance = np.maximum(0, np.maximum(start - ts[others], ts[others] - end))
    inside = others[distance == 0]
    if len(inside) >= n:
        return inside[np.linspace(0, len(inside) - 1, n).round().astype(int)]
    return np.sort(others[np.argsort(distance, kind="stable")[:n]])
