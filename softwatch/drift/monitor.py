"""The drift monitor: reads sequences from the store, compares regimes and time windows,
runs the online detectors, writes `drift_reports` rows and sets the drift gauges.

Comparisons it makes on every run:
- `regime`: the newest regime (model × revision × decoding parameters, by first appearance)
  against the one before it, once both have `min_sequences` sequences;
- `window`: inside the newest regime, its most recent `window` sequences against its first
  `window` (traffic shift, or a silent numerics change under unchanged labels);
- `online`: a calibrated CUSUM per metric (a Poisson CUSUM for the rare counts) over the
  newest regime, its reference being the regime's first `window` sequences.

The regime and window comparisons read each sequence's `prompt_key` and permute whole prompt
clusters (twosample.py); the online CUSUMs treat sequences as independent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ..records import DRIFT_REPORTS, PROBES, REGIME_COLUMNS
from ..store import ParquetSink, Store
from .online import CUSUM, PoissonCUSUM
from .twosample import TESTS, TestResult, compare, permutations_for

# sequence-level metric -> its SQL over the `sequences` view
METRICS = {
    "mean_entropy": "mean_entropy",
    "log_perplexity": "ln(perplexity)",
    "mean_top_prob": "mean_top_prob",
    "p10_top_prob": "p10_top_prob",
    "mean_sampling_entropy": "mean_sampling_entropy",
    "overflow_rate": "overflow / greatest(generated_tokens, 1)",
    "nonfinite_rate": "nonfinite / greatest(generated_tokens, 1)",
}
COUNT_METRICS = {"overflow_rate": "overflow", "nonfinite_rate": "nonfinite"}
REGIME_IDENTITY = ("model_id", "model_rev", "params_id")
FILTER_KEYS = (*REGIME_COLUMNS, "since", "until")


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    """A selection of sequences: `column=value` pairs over the regime columns, plus `since` /
    `until` (ISO timestamps). Values always travel as query parameters, never as SQL."""

    terms: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Filter:
        terms = []
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in FILTER_KEYS:
                raise FilterError(f"bad filter term {part!r}: use key=value with key one of {', '.join(FILTER_KEYS)}")
            if key in ("since", "until"):
                try:
                    datetime.fromisoformat(value.strip())
                except ValueError:
                    raise FilterError(f"{key}={value!r} is not an ISO timestamp") from None
            terms.append((key, value.strip()))
        return cls(tuple(terms))

    def sql(self) -> tuple[str, list]:
        clauses, params = [], []
        for key, value in self.terms:
            if key == "since":
                clauses.append("ts >= ?::TIMESTAMPTZ")
            elif key == "until":
                clauses.append("ts < ?::TIMESTAMPTZ")
            elif key in ("temperature", "top_p"):
                clauses.append(f"{key} = ?::DOUBLE")
            elif key == "top_k":
                clauses.append(f"{key} = ?::INTEGER")
            else:
                clauses.append(f"{key} = ?")
            params.append(value)
        return (" AND ".join(clauses) or "TRUE"), params

    def __bool__(self) -> bool:
        return bool(self.terms)


@dataclass(frozen=True)
class MonitorConfig:
    alpha: float = 0.01  # family-wise false-alarm level of one comparison
    min_effect: float = 0.1  # normalized Wasserstein a significant difference must reach
    min_sequences: int = 100  # per side, before a comparison says anything
    max_sequences: int = 2000  # per side: the most recent of the baseline, the first of the current
    window: int = 200
    target_arl: float = 5000  # online detectors together: sequences between false alarms
    permutations: int = 2999  # raised where alpha needs more (twosample.permutations_for)

    def __post_init__(self) -> None:
        permutations_for(self.alpha, len(TESTS) * len(METRICS))  # refuses an alpha no p-value can reach


@dataclass
class Report:
    report_id: str
    ts: datetime
    rows: list[dict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = {r["verdict"] for r in self.rows}
        if "drift" in verdicts:
            return "drift"
        return "no_drift" if "no_drift" in verdicts else "insufficient_data"

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=DRIFT_REPORTS)


@dataclass
class Sample:
    """Sequences of one side of a comparison: metric columns plus ts and token counts."""

    label: str
    ts: np.ndarray
    metrics: dict[str, np.ndarray]
    tokens: np.ndarray
    counts: dict[str, np.ndarray]
    keys: np.ndarray  # prompt_key of each sequence (None where the producer set none)

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: slice | np.ndarray) -> Sample:
        return Sample(self.label, self.ts[index], {k: v[index] for k, v in self.metrics.items()}, self.tokens[index],
                      {k: v[index] for k, v in self.counts.items()}, self.keys[index])


class Monitor:
    def __init__(self, root: str, config: MonitorConfig | None = None, telemetry=None):
        self.root = root
        self.config = config or MonitorConfig()
        self.telemetry = telemetry
        self.store = Store(root)

    # ---- reading ------------------------------------------------------------------------------
    def sample(self, where: Filter, label: str = "") -> Sample:
        clause, params = where.sql()
        metric_sql = ", ".join(f"{sql} AS {name}" for name, sql in METRICS.items())
        table = self.store.query(
            f"SELECT epoch_us(ts) AS ts_us, generated_tokens, nonfinite, overflow, prompt_key, {metric_sql} "
            f"FROM sequences "
            f"WHERE generated_tokens > 0 AND {clause} ORDER BY ts", params)
        column = lambda name: table[name].to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
        return Sample(label or _describe(where), table["ts_us"].to_numpy(zero_copy_only=False),
                      {name: column(name) for name in METRICS}, column("generated_tokens"),
                      {name: column(count) for name, count in COUNT_METRICS.items()},
                      np.array(table["prompt_key"].to_pylist(), dtype=object))

    def regimes(self) -> list[dict]:
        """Regimes in order of first appearance, with their sequence counts."""
        keys = ", ".join(REGIME_IDENTITY)
        return self.store.rows(
            f"SELECT {keys}, any_value(temperature) AS temperature, any_value(top_p) AS top_p, "
            f"any_value(top_k) AS top_k, count(*) AS sequences, min(ts) AS first_ts, max(ts) AS last_ts "
            f"FROM sequences WHERE generated_tokens > 0 GROUP BY {keys} ORDER BY first_ts")

    # ---- comparing ----------------------------------------------------------------------------
    def compare(self, baseline: Filter, current: Filter) -> Report:
        """One comparison of two selections, written to `drift_reports`."""
        report = self._new_report()
        self._compare_samples(report, "regime", self.sample(baseline), self.sample(current), recent_baseline=True)
        self._publish(report)
        return report

    def run(self) -> Report:
        """Every comparison the store allows now (module docstring)."""
        report = self._new_report()
        regimes = self.regimes()
        if regimes:
            newest = self.sample(_regime_filter(regimes[-1]))
            if len(regimes) > 1:
                before = self.sample(_regime_filter(regimes[-2]))
                self._compare_samples(report, "regime", before, newest, recent_baseline=True)
            w = self.config.window
            if len(newest) >= 2 * w:
                self._compare_samples(report, "window", newest.take(slice(0, w)), newest.take(slice(-w, None)))
            if len(newest) > w:
                self._online(report, newest)
        self._publish(report)
        return report

    def probe(self, lm, probes: list | None = None) -> Report:
        """Score the probes on `lm`, store the scores, and compare them (paired) with the most
        recent probe run of another model revision."""
        from .probes import PROBE_METRICS, builtin_probes, paired_test, score_twice

        probes = probes or builtin_probes()
        report = self._new_report()
        scores = score_twice(lm, probes)
        rows = [{"ts": report.ts, "run_id": report.report_id, "probe_id": p.probe_id, "replicate": replicate,
                 **{m: float(scores[replicate][m][i]) for m in PROBE_METRICS},
                 "model_id": lm.model_id, "model_rev": lm.model_rev}
                for replicate in (0, 1) for i, p in enumerate(probes)]
        previous = self.store.rows(
            "SELECT run_id, model_id, model_rev FROM probes WHERE (model_id, model_rev) != (?, ?) "
            "ORDER BY ts DESC LIMIT 1", [lm.model_id, lm.model_rev])
        with ParquetSink(self.root, writer=f"probe-{report.report_id}", journal=None) as sink:
            sink.write("probes", pa.Table.from_pylist(rows, schema=PROBES))
        if not previous:
            return report  # the first model scored: the baseline of later runs
        before = previous[0]
        baseline = self.store.rows(f"SELECT probe_id, replicate, {', '.join(PROBE_METRICS)} FROM probes "
                                   "WHERE run_id = ?", [before["run_id"]])
        by_probe = {(r["probe_id"], r["replicate"]): r for r in baseline}
        shared = [i for i, p in enumerate(probes) if (p.probe_id, 0) in by_probe and (p.probe_id, 1) in by_probe]
        side = lambda replicate: {m: np.array([by_probe[(probes[i].probe_id, replicate)][m] for i in shared])  # noqa: E731
                                  for m in PROBE_METRICS}
        current = {m: scores[0][m][shared] for m in PROBE_METRICS}
        label = lambda r: f"{r['model_id']}@{r['model_rev']}"  # noqa: E731
        for r in paired_test(side(0), side(1), current):
            report.rows.append({
                "report_id": report.report_id, "ts": report.ts, "kind": "probe", "metric": r.metric,
                "test": "paired_sign_flip", "statistic": r.statistic, "p_value": r.p_value,
                "effect_size": r.effect_size, "threshold": r.threshold, "baseline_regime": label(before),
                "current_regime": label({"model_id": lm.model_id, "model_rev": lm.model_rev}),
                "baseline_start": None, "baseline_end": None, "current_start": report.ts, "current_end": report.ts,
                "n_baseline": r.n, "n_current": r.n, "verdict": r.verdict,
            })
        self._publish(report)
        return report

    def _compare_samples(self, report: Report, kind: str, baseline: Sample, current: Sample,
                         recent_baseline: bool = False) -> None:
        cap = self.config.max_sequences
        if recent_baseline:
            baseline = baseline.take(slice(-cap, None))  # the baseline just before the change
        else:
            baseline = baseline.take(slice(0, cap))
        current = current.take(slice(0, cap))
        results = compare(baseline.metrics, current.metrics, alpha=self.config.alpha,
                          min_effect=self.config.min_effect, min_sequences=self.config.min_sequences,
                          permutations=self.config.permutations, baseline_keys=baseline.keys,
                          current_keys=current.keys)
        report.rows += [self._row(report, kind, r, baseline, current) for r in results]

    def _online(self, report: Report, regime: Sample) -> None:
        w = self.config.window
        arl = self.config.target_arl * len(METRICS)  # the family of detectors keeps the target together
        reference, stream = regime.take(slice(0, w)), regime.take(slice(w, None))
        for metric, values in reference.metrics.items():
            if metric in COUNT_METRICS:
                detector = PoissonCUSUM.calibrated(reference.counts[metric], reference.tokens, target_arl=arl)
                feed = zip(stream.counts[metric], stream.tokens)
                test = "poisson_cusum"
            else:
                finite = values[np.isfinite(values)]
                if len(finite) < self.config.min_sequences:
                    continue
                detector = CUSUM.calibrated(finite, target_arl=arl)
                feed = ((x,) for x in stream.metrics[metric])
                test = "cusum"
            alarm_at = None
            for i, args in enumerate(feed):
                detector.update(*args)
                if detector.drift_detected:
                    alarm_at = i
                    break
            end = alarm_at if alarm_at is not None else len(stream) - 1
            report.rows.append({
                "report_id": report.report_id, "ts": report.ts, "kind": "online", "metric": metric, "test": test,
                "statistic": float(detector.statistic), "p_value": None, "effect_size": None,
                "threshold": float(detector.threshold), "baseline_regime": regime.label,
                "current_regime": regime.label, "baseline_start": _time(reference.ts[0]),
                "baseline_end": _time(reference.ts[-1]), "current_start": _time(stream.ts[0]),
                "current_end": _time(stream.ts[end]), "n_baseline": len(reference), "n_current": end + 1,
                "verdict": "drift" if alarm_at is not None else "no_drift",
            })

    def _row(self, report: Report, kind: str, r: TestResult, baseline: Sample, current: Sample) -> dict:
        return {
            "report_id": report.report_id, "ts": report.ts, "kind": kind, "metric": r.metric, "test": r.test,
            "statistic": _number(r.statistic), "p_value": _number(r.p_value), "effect_size": _number(r.effect_size),
            "threshold": r.threshold, "baseline_regime": baseline.label, "current_regime": current.label,
            "baseline_start": _time(baseline.ts[0]) if len(baseline) else None,
            "baseline_end": _time(baseline.ts[-1]) if len(baseline) else None,
            "current_start": _time(current.ts[0]) if len(current) else None,
            "current_end": _time(current.ts[-1]) if len(current) else None,
            "n_baseline": r.n_baseline, "n_current": r.n_current, "verdict": r.verdict, "unit": r.unit,
            "clusters_baseline": r.clusters_baseline, "clusters_current": r.clusters_current,
        }

    def _new_report(self) -> Report:
        return Report(uuid.uuid4().hex[:16], datetime.now(timezone.utc))

    # ---- publishing ---------------------------------------------------------------------------
    def _publish(self, report: Report) -> None:
        if report.rows:
            with ParquetSink(self.root, writer=f"monitor-{report.report_id}", journal=None) as sink:
                sink.write("drift_reports", report.table())
        if self.telemetry is not None:
            for (kind, regime), rows in _by_comparison(report.rows).items():
                effects = [r["effect_size"] for r in rows if r["effect_size"] is not None]
                score = max(effects) if effects else 0.0
                alarm = any(r["verdict"] == "drift" for r in rows)
                self.telemetry.set_drift(score, alarm, {"kind": kind, "current_regime": regime, **_regime_labels(regime)})

    def close(self) -> None:
        self.store.close()


def _by_comparison(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["current_regime"]), []).append(r)
    return groups


def _regime_labels(label: str) -> dict:
    """Model and params_id of a regime label `model@rev/params` (for dashboards and alert labels)."""
    model, sep, rest = label.partition("@")
    if not sep or "/" not in rest:
        return {}
    return {"gen_ai.request.model": model, "params_id": rest.split("/", 1)[1].split("[")[0]}


def _regime_filter(regime: dict) -> Filter:
    return Filter(tuple((key, regime[key]) for key in REGIME_IDENTITY))


def _describe(where: Filter) -> str:
    values = dict(where.terms)
    if all(key in values for key in REGIME_IDENTITY):
        rest = ",".join(f"{k}={v}" for k, v in where.terms if k not in REGIME_IDENTITY)
        return f"{values['model_id']}@{values['model_rev']}/{values['params_id']}" + (f"[{rest}]" if rest else "")
    return ",".join(f"{k}={v}" for k, v in where.terms) or "all"


def _time(us: int | float) -> datetime:
    return datetime.fromtimestamp(int(us) / 1e6, timezone.utc)


def _number(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
