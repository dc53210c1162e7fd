"""When the service scores the probes: a pure function of the clock and the `probes` table,
so a restarted monitor neither re-probes at once nor forgets a revision it has not scored."""

from __future__ import annotations

DEFAULT_PROBE_INTERVAL_S = 6 * 3600.0


def probe_due(now_s: float, last_probe_s: float | None, interval_s: float) -> str | None:
    """Why the served revision must be probed now, or None: `"new_revision"` when no probe run
    of it is stored, `"interval"` when its latest is `interval_s` old (a numerics change that
    kept the revision label shows only against the revision's own earlier scores)."""
    if last_probe_s is None:
        return "new_revision"
    if now_s - last_probe_s >= interval_s:
        return "interval"
    return None
