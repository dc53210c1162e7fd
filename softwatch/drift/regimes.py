"""Which regimes a monitor run compares: pure functions over the regime index's rows
(`RegimeIndex.regimes()`: identity, `params_source`, `sequences`, `first_us`, `last_us`).

- **The deployment's regimes.** Only regimes decoded with the deployment's own parameters
  (`params_source = "deployment"`) can be the newest or the baseline. A client's per-request
  temperature/top_p/top_k gives a regime of its own (`"request"`); those never displace the
  deployment's, and only the `override_regimes` largest are watched, each by a window
  comparison of its own (bounded, whatever the number of distinct client values).
- **Segments, not first appearance.** A regime's live segment starts when it appeared, or when
  it came back: when another regime that was active after it appeared has been silent for
  `ended_after_s` while this one went on (a rollback A→B→A: A's segment starts after B's last
  sequence). The newest segment is the one that started last, and it is compared with the
  regime live before it, so after a rollback the live A traffic is compared with B. Two
  regimes live together (a canary, a rolling update) keep their order of first appearance.
- **A pinned baseline.** With `pin`, the baseline is the regime the pin selects (the most
  recently active one it matches), and the newest segment is always compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEPLOYMENT, REQUEST = "deployment", "request"
PIN_KEYS = ("model_id", "model_rev", "params_id", "temperature", "top_p", "top_k")  # the index's regime columns
Terms = tuple[tuple[str, str], ...]  # a Filter's (key, value) terms


@dataclass(frozen=True)
class Segment:
    regime: dict
    since_us: int | None  # its live stretch: sequences after this time (None: the whole regime)


@dataclass(frozen=True)
class Plan:
    current: Segment | None  # the newest segment of the deployment's regimes
    baseline: dict | None  # what it is compared with: the regime live before it, or the pinned one
    overrides: list[dict]  # request-override regimes watched by a window comparison (largest first)


def segment_start(regime: dict, others: list[dict], ended_after_us: int) -> int:
    """When `regime`'s live segment started (µs): its first sequence, or just after the last
    sequence of another regime that was active after `regime` appeared and then fell silent for
    `ended_after_us` while `regime` went on."""
    start = regime["first_us"]
    for other in others:
        if other is regime:
            continue
        if regime["first_us"] < other["last_us"] < regime["last_us"] - ended_after_us:
            start = max(start, other["last_us"] + 1)
    return start


def segments(regimes: list[dict], ended_after_us: int) -> list[Segment]:
    """The deployment's regimes as live segments, oldest start first."""
    deployment = [r for r in regimes if r.get("params_source", DEPLOYMENT) == DEPLOYMENT]
    starts = [(segment_start(r, deployment, ended_after_us), r) for r in deployment]
    starts.sort(key=lambda pair: (pair[0], pair[1]["first_us"]))
    return [Segment(r, None if start == r["first_us"] else start - 1) for start, r in starts]


def plan(regimes: list[dict], ended_after_s: float, override_regimes: int, pin: Terms = ()) -> Plan:
    """The comparisons of one run (module docstring). Raises PinError when `pin` selects no
    regime of the deployment's."""
    ordered = segments(regimes, int(ended_after_s * 1e6))
    overrides = sorted((r for r in regimes if r.get("params_source") == REQUEST),
                       key=lambda r: (-r["sequences"], r["params_id"]))[:max(override_regimes, 0)]
    if not ordered:
        return Plan(None, None, overrides)
    current = ordered[-1]
    if pin:
        pinned = pinned_regime(regimes, pin)
        baseline = None if _same(pinned, current.regime) else pinned
    else:
        baseline = ordered[-2].regime if len(ordered) > 1 else None
    return Plan(current, baseline, overrides)


class PinError(ValueError):
    """A pin that selects no regime of the deployment's."""


def pinned_regime(regimes: list[dict], pin: Terms) -> dict:
    """The most recently active deployment regime whose columns match every term of `pin`."""
    matches = [r for r in regimes if r.get("params_source", DEPLOYMENT) == DEPLOYMENT and matches_pin(r, pin)]
    if not matches:
        text = ",".join(f"{k}={v}" for k, v in pin)
        raise PinError(f"pin {text!r} selects no regime of the deployment's in the data")
    return max(matches, key=lambda r: r["last_us"])


def matches_pin(regime: dict, pin: Terms) -> bool:
    for key, value in pin:
        have = regime.get(key)
        if key in ("temperature", "top_p"):
            if have is None or abs(float(have) - float(value)) > 1e-9:
                return False
        elif key == "top_k":
            if have is None or int(have) != int(value):
                return False
        elif str(have) != value:
            return False
    return True


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("model_id", "model_rev", "params_id", "params_source"))
