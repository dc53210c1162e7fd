"""Traffic attribution: did the outputs change, or the prompts they answer?

Output statistics depend on the prompt: longer prompts, or another mix of tasks, move the
entropy and perplexity of the answers with no change to the model. When a deploy coincides
with a traffic shift, a regime comparison alone blames the deploy. Beside every regime and
window comparison the prompt side is tested too (`<kind>_traffic` rows: `prompt_tokens`,
with the same cluster-aware tests and Holm correction as the outputs; verdict
`traffic_change` where it moved). When it moved and an output metric says `drift`, the
output comparison is run again on comparable prompts only: the sequences whose prompt key
appears on both sides (`<kind>_comparable` rows). An output row whose metric does not drift
on comparable prompts gets the verdict `traffic_change` (its outputs moved with the traffic,
not for the same prompts) only where the comparable sample could have seen the change: their
effect is under their effect gate, and that gate is at most half the pooled effect. Where the comparable prompts drift too, are too few to say, or see an
effect the gate cannot rule out, the output row keeps `drift`: the change cannot be put on
the traffic, and an alarm is better than a hidden change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .twosample import compare

if TYPE_CHECKING:
    from .monitor import Monitor, Report, Sample

TRAFFIC_CHANGE = "traffic_change"


def attribute_traffic(monitor: Monitor, report: Report, kind: str, baseline: Sample, current: Sample,
                      rows: list[dict]) -> list[dict]:
    """The `<kind>_traffic` rows of the comparison whose output rows are `rows`, and its
    `<kind>_comparable` rows where traffic changed and outputs drifted; output rows explained
    by the traffic get the verdict `traffic_change` (in place)."""
    traffic = _traffic_rows(monitor, report, kind, baseline, current)
    if not any(r["verdict"] == TRAFFIC_CHANGE for r in traffic) or not any(r["verdict"] == "drift" for r in rows):
        return traffic
    shared = _shared_keys(baseline.keys, current.keys)
    comparable = monitor.compare_with(report, f"{kind}_comparable", baseline.take(_among(baseline.keys, shared)),
                                      current.take(_among(current.keys, shared)))
    on_comparable = {(r["metric"], r["test"]): r for r in comparable}
    for row in rows:
        if row["verdict"] == "drift" and _explained(row, on_comparable.get((row["metric"], row["test"]))):
            row["verdict"] = TRAFFIC_CHANGE
    return traffic + comparable


def _explained(row: dict, on_comparable: dict | None) -> bool:
    """Whether the comparable prompts show the output change of `row` is the traffic's: they
    say `no_drift`, their own effect is under their effect gate (what their size shows by
    chance), and that gate is at most half the pooled effect, so they could have seen half
    of it. A comparable sample too small for that proves nothing, and the row keeps `drift`."""
    if on_comparable is None or on_comparable["verdict"] != "no_drift":
        return False
    effect, seen = row["effect_size"], on_comparable["effect_size"]
    return (effect is not None and seen is not None and on_comparable["threshold"] is not None
            and seen < on_comparable["threshold"] <= effect / 2)


def _traffic_rows(monitor: Monitor, report: Report, kind: str, baseline: Sample, current: Sample) -> list[dict]:
    config = monitor.config
    results = compare({"prompt_tokens": baseline.prompt_tokens}, {"prompt_tokens": current.prompt_tokens},
                      alpha=config.alpha, min_effect=config.min_effect, min_sequences=config.min_sequences,
                      permutations=config.permutations, baseline_keys=baseline.keys, current_keys=current.keys)
    rows = [monitor._row(report, f"{kind}_traffic", r, baseline, current) for r in results]
    for row in rows:
        if row["verdict"] == "drift":
            row["verdict"] = TRAFFIC_CHANGE
    return rows


def _shared_keys(baseline_keys: np.ndarray, current_keys: np.ndarray) -> set[str]:
    """Prompt keys present on both sides (sequences without a key are never comparable)."""
    known = lambda keys: {k for k in keys.tolist() if k is not None}  # noqa: E731
    return known(baseline_keys) & known(current_keys)


def _among(keys: np.ndarray, shared: set[str]) -> np.ndarray:
    return np.fromiter((k in shared for k in keys.tolist()), bool, len(keys))
