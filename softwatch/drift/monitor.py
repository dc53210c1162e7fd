"""The drift monitor: reads sequences from the store, compares regimes and time windows,
runs the online detectors, writes `drift_reports` rows and sets the drift gauges.

Comparisons it makes on every run (which regimes: regimes.py):
- `regime`: the newest segment of the deployment's regimes (model × revision × decoding
  parameters; a rollback starts a new segment of the regime it returns to) against the regime
  live before it, or against the pinned baseline (`pin`), once both have `min_sequences`
  sequences;
- `window`: inside the newest segment, its most recent `window` sequences against its first
  `window` (traffic shift, or a silent numerics change under unchanged labels); the same for
  each of the `override_regimes` largest regimes of per-request parameter overrides;
- `online`: a calibrated CUSUM per metric (a Poisson CUSUM for the rare counts) over the
  newest regime, its reference being the regime's first `window` sequences (after an alarm,
  the `window` sequences after it). The detectors' state is kept in the data root between
  runs, and each run feeds them only the sequences that arrived since the last one; an alarm
  is reported once, with the sequence where it fired.

A run's cost does not grow with the history: regimes come from an index of the files
(index.py) updated from the new files only, and every sample is a LIMIT query over the few
files that can hold it.

The regime and window comparisons read each sequence's `prompt_key` and permute whole prompt
clusters (twosample.py); the online CUSUMs treat sequences as independent.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ..records import DRIFT_REPORTS, PROBES, REGIME_COLUMNS
from ..store import ParquetSink, Store
from ..store import vanished
from .index import INDEX_DIR, READ_ERRORS, RegimeIndex, dataset, rows_at, write_atomically
from .attribution import attribute_traffic
from .online import CUSUM, PoissonCUSUM
from .regimes import PIN_KEYS, Plan, Segment
from .regimes import plan as plan_comparisons
from .partial import compare_groups
from .twosample import TESTS, TestResult, compare, permutations_for

# sequence-level metric -> its SQL over the `sequences` view: the token statistics' summaries
STATISTIC_METRICS = {
    "mean_entropy": "mean_entropy",
    "log_perplexity": "ln(perplexity)",
    "mean_top_prob": "mean_top_prob",
    "p10_top_prob": "p10_top_prob",
    "mean_sampling_entropy": "mean_sampling_entropy",
    "overflow_rate": "overflow / greatest(generated_tokens, 1)",
    "nonfinite_rate": "nonfinite / greatest(generated_tokens, 1)",
}
# ... and how long a sequence is and how it ended: the other statistics' means depend on the
# length, which `max_tokens` (not part of params_id) and the finish mix set. The finish-reason
# mix is tested as two per-sequence indicators (the rest is "other"); under the cluster
# permutation KS on an indicator is the exact two-proportion test for repeated prompts.
LENGTH_METRICS = {
    "generated_length": "generated_tokens::DOUBLE",
    "finish_length": "(finish_reason = 'length')::DOUBLE",
    "finish_stop": "(finish_reason = 'stop')::DOUBLE",
    "repetition": "repetition",  # null in files written before the column: not tested there
}
METRICS = {**STATISTIC_METRICS, **LENGTH_METRICS}
ONLINE_METRICS = tuple(STATISTIC_METRICS)  # the CUSUMs watch the statistics, not the discrete length metrics
COUNT_METRICS = {"overflow_rate": "overflow", "nonfinite_rate": "nonfinite"}
REGIME_IDENTITY = ("model_id", "model_rev", "params_id")
log = logging.getLogger("softwatch.drift")
FILTER_KEYS = (*REGIME_COLUMNS, "params_source", "since", "until")


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
            elif key == "params_source":  # rows written before the column are the deployment's
                clauses.append("coalesce(params_source, 'deployment') = ?")
            else:
                clauses.append(f"{key} = ?")
            params.append(value)
        return (" AND ".join(clauses) or "TRUE"), params

    def __bool__(self) -> bool:
        return bool(self.terms)


def parse_pin(text: str | None) -> Filter:
    """A baseline pin: `key=value` terms over the regime columns of the index (PIN_KEYS).
    FilterError, naming `pin`, for anything else."""
    try:
        pin = Filter.parse(text)
    except FilterError as exc:
        raise FilterError(f"pin: {exc}") from None
    bad = [key for key, _ in pin.terms if key not in PIN_KEYS]
    if bad:
        raise FilterError(f"pin: {', '.join(bad)} cannot select a regime; use key=value with key one of "
                          f"{', '.join(PIN_KEYS)}")
    for key, value in pin.terms:
        if key in ("temperature", "top_p", "top_k"):
            try:
                float(value) if key != "top_k" else int(value)
            except ValueError:
                raise FilterError(f"pin: {key}={value!r} is not a number") from None
    return pin


@dataclass(frozen=True)
class MonitorConfig:
    alpha: float = 0.01  # family-wise false-alarm level of one comparison
    min_effect: float = 0.1  # normalized Wasserstein a significant difference must reach
    min_sequences: int = 100  # per side, before a comparison says anything
    max_sequences: int = 2000  # per side: the most recent of the baseline, the first of the current
    window: int = 200
    target_arl: float = 5000  # online detectors together: sequences between false alarms
    permutations: int = 2999  # raised where alpha needs more (twosample.permutations_for)
    ended_after_s: float = 900.0  # a regime silent this long while another goes on is over (a rollback)
    override_regimes: int = 3  # request-override regimes watched by a window comparison, largest first
    pin: str | None = None  # key=value terms selecting the baseline regime every newer one is compared with
    replica_sequences: int = 200  # per side of a replica / deployment comparison (partial.py)

    def __post_init__(self) -> None:
        permutations_for(self.alpha, len(TESTS) * len(METRICS))  # refuses an alpha no p-value can reach
        if not self.ended_after_s > 0:
            raise ValueError(f"ended_after_s must be > 0, got {self.ended_after_s!r}")
        if not (isinstance(self.override_regimes, int) and self.override_regimes >= 0):
            raise ValueError(f"override_regimes must be an integer >= 0, got {self.override_regimes!r}")
        parse_pin(self.pin)


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
        if "traffic_change" in verdicts:  # outputs moved with the prompts, not for comparable ones (attribution.py)
            return "traffic_change"
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
    prompt_tokens: np.ndarray  # NaN where unknown
    deployment: np.ndarray
    replica: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: slice | np.ndarray) -> Sample:
        return Sample(self.label, self.ts[index], {k: v[index] for k, v in self.metrics.items()}, self.tokens[index],
                      {k: v[index] for k, v in self.counts.items()}, self.keys[index], self.prompt_tokens[index],
                      self.deployment[index], self.replica[index])


class Monitor:
    def __init__(self, root: str, config: MonitorConfig | None = None, telemetry=None):
        self.root = root
        self.config = config or MonitorConfig()
        self.telemetry = telemetry
        self.store = Store(root)
        self.index = RegimeIndex(root, self.store.con)
        self._refresh = None  # the index refresh of this run
        self._online_state = None  # the online detectors' state this run leaves, saved once its report is out

    # ---- reading ------------------------------------------------------------------------------
    def sample(self, where: Filter, label: str = "", limit: int | None = None, order: str = "first") -> Sample:
        """The sequences `where` selects, in time order. With `limit`, at most that many, chosen
        in SQL: the `first` or `last` in time, or a `hash` sample (by request id: the same rows on
        every run) spread over the whole selection."""
        clause, params = where.sql()
        return _sample(self.store.query(_sample_sql("sequences", clause, limit, order), params),
                       label or _describe(where))

    def regimes(self) -> list[dict]:
        """Regimes in order of first appearance, with their sequence counts: from the regime
        index (index.py), brought up to date with the files added since the last run."""
        self._refresh_index()
        return self.index.regimes()

    def _refresh_index(self):
        if self._refresh is None:
            self._refresh = self.index.refresh()
        return self._refresh

    def regime_sample(self, regime: dict, end: str, n: int, since_us: int | None = None) -> Sample:
        """The first or last `n` sequences of a regime (of its sequences after `since_us`: a
        segment), read from the few files the index says can hold them."""
        where = _regime_filter(regime)
        for attempt in range(2):
            files, bound = self.index.files_for(regime, end, n, since_us)
            clause, params = where.sql()
            if since_us is not None:
                clause += " AND ts > make_timestamptz(?::BIGINT)"
                params.append(since_us)
            if bound is not None:
                clause += f" AND ts {'<=' if end == 'first' else '>='} make_timestamptz(?::BIGINT)"
                params.append(bound)
            try:
                return _sample(self._query_files(files, _sample_sql("part", clause, n, end), params), _describe(where))
            except READ_ERRORS as exc:  # compacted away since the refresh
                if attempt or not vanished(exc):
                    raise
                self._refresh = None
                self._refresh_index()

    def _query_files(self, files: list[str], sql: str, params: list) -> pa.Table:
        """SQL over the `sequences` rows of these files (relative paths) as the view `part`."""
        con = self.store.con
        con.register("part", dataset(files, self.index.fs, self.index.path))
        try:
            return con.sql(sql, params=params).to_arrow_table()
        finally:
            con.unregister("part")

    def _stream_files(self, files: list[str], sql: str, params: list):
        """Record batches of SQL over these files (as `_query_files`), read as they are used."""
        yield from self._stream_view(dataset(files, self.index.fs, self.index.path), sql, params)

    def _stream_view(self, part, sql: str, params: list):
        """Record batches of SQL over `part` (a dataset or table of `sequences` rows)."""
        cursor = self.store.con.cursor()
        try:
            cursor.register("part", part)
            yield from cursor.sql(sql, params=params).to_arrow_reader(65_536)
        finally:
            cursor.close()

    # ---- comparing ----------------------------------------------------------------------------
    def compare(self, baseline: Filter, current: Filter) -> Report:
        """One comparison of two selections, written to `drift_reports`."""
        report = self._new_report()
        cap = self.config.max_sequences
        self._compare_samples(report, "regime", self.sample(baseline, limit=cap, order="last"),
                              self.sample(current, limit=cap), recent_baseline=True)
        self._publish(report)
        return report

    def run(self) -> Report:
        """Every comparison the store allows now (module docstring). Its cost is bounded: the
        regimes come from the index, every sample is at most `max_sequences` (or `window`)
        sequences read with a LIMIT from the files that can hold them, and the online detectors
        read only the sequences added since the last run."""
        report = self._new_report()
        self._refresh = self._online_state = None
        plan = self.plan()
        if plan.current is not None:
            self._watch_segment(report, plan.current, plan.baseline)
            report.rows += compare_groups(self, report, plan.current.regime)
        for regime in plan.overrides:
            self._window(report, regime, None)
        self._publish(report)
        if self._online_state is not None:  # after the report: an alarm whose report failed fires again
            self._online_state.save(self.index.fs, self.index.path)
        return report

    def plan(self) -> Plan:
        """Which regimes this run compares (regimes.py); PinError when the pin selects none."""
        config = self.config
        return plan_comparisons(self.regimes(), config.ended_after_s, config.override_regimes,
                                parse_pin(config.pin).terms)

    def _watch_segment(self, report: Report, segment: Segment, baseline: dict | None) -> None:
        """The regime, window and online comparisons of the newest segment."""
        cap, w = self.config.max_sequences, self.config.window
        regime, since = segment.regime, segment.since_us
        newest = self.regime_sample(regime, "first", max(cap, 2 * w), since)
        if baseline is not None:
            before = self.regime_sample(baseline, "last", cap)
            self._compare_samples(report, "regime", before, newest, recent_baseline=True)
        self._window(report, regime, since, newest)
        sequences = regime["sequences"] if since is None else len(newest)  # at least max(cap, 2w) if that many
        self._online(report, regime, newest.take(slice(0, w)), sequences, since)

    def _window(self, report: Report, regime: dict, since_us: int | None, first: Sample | None = None) -> None:
        """A regime's (or segment's) latest `window` sequences against its first `window`."""
        w = self.config.window
        first = first if first is not None else self.regime_sample(regime, "first", 2 * w, since_us)
        if (regime["sequences"] if since_us is None else len(first)) >= 2 * w:
            last = self.regime_sample(regime, "last", w, since_us)
            self._compare_samples(report, "window", first.take(slice(0, w)), last)

    def probe(self, lm, probes: list | None = None) -> Report:
        """Score the probes on `lm` and record them (`record_probes`)."""
        from .probes import builtin_probes, score_twice

        probes = probes or builtin_probes()
        return self.record_probes(lm.model_id, lm.model_rev, probes, score_twice(lm, probes))

    def record_probes(self, model_id: str, model_rev: str, probes: list, scores: tuple,
                      against_other: bool = True) -> Report:
        """Store a revision's probe scores (`probes.score_twice`) and compare them (paired) with
        the most recent probe run of another model revision (unless `against_other` is false:
        a periodic rescoring, whose revision was compared when it was new), and with this
        revision's own previous run: a numerics change that kept the label (another kernel,
        library or device) moves the scores of the same weights."""
        from .probes import PROBE_METRICS

        report = self._new_report()
        rows = [{"ts": report.ts, "run_id": report.report_id, "probe_id": p.probe_id, "replicate": replicate,
                 **{m: float(scores[replicate][m][i]) for m in PROBE_METRICS},
                 "model_id": model_id, "model_rev": model_rev}
                for replicate in (0, 1) for i, p in enumerate(probes)]
        other = self.store.rows(
            "SELECT run_id, model_id, model_rev, ts FROM probes WHERE (model_id, model_rev) != (?, ?) "
            "ORDER BY ts DESC LIMIT 1", [model_id, model_rev])
        own = self.store.rows(
            "SELECT run_id, model_id, model_rev, ts FROM probes WHERE model_id = ? AND model_rev = ? "
            "ORDER BY ts DESC LIMIT 1", [model_id, model_rev])
        with ParquetSink(self.root, writer=f"probe-{report.report_id}", journal=None) as sink:
            sink.write("probes", pa.Table.from_pylist(rows, schema=PROBES))
        # none of either: the first revision scored, the baseline of later ones
        for before in (other if against_other else []) + own:
            self._probe_rows(report, before, probes, scores[0], f"{model_id}@{model_rev}")
        if report.rows:
            self._publish(report)
        return report

    def _probe_rows(self, report: Report, before: dict, probes: list, current: dict, label: str) -> None:
        """The paired test of `current` scores against the probe run `before` (its two replicates)."""
        from .probes import PROBE_METRICS, paired_test

        baseline = self.store.rows(f"SELECT probe_id, replicate, {', '.join(PROBE_METRICS)} FROM probes "
                                   "WHERE run_id = ?", [before["run_id"]])
        by_probe = {(r["probe_id"], r["replicate"]): r for r in baseline}
        shared = [i for i, p in enumerate(probes) if (p.probe_id, 0) in by_probe and (p.probe_id, 1) in by_probe]
        side = lambda replicate: {m: np.array([by_probe[(probes[i].probe_id, replicate)][m] for i in shared])  # noqa: E731
                                  for m in PROBE_METRICS}
        for r in paired_test(side(0), side(1), {m: current[m][shared] for m in PROBE_METRICS}):
            report.rows.append({
                "report_id": report.report_id, "ts": report.ts, "kind": "probe", "metric": r.metric,
                "test": "paired_sign_flip", "statistic": r.statistic, "p_value": r.p_value,
                "effect_size": r.effect_size, "threshold": r.threshold,
                "baseline_regime": f"{before['model_id']}@{before['model_rev']}", "current_regime": label,
                "baseline_start": before["ts"], "baseline_end": before["ts"], "current_start": report.ts,
                "current_end": report.ts, "n_baseline": r.n, "n_current": r.n, "verdict": r.verdict,
            })

    def _compare_samples(self, report: Report, kind: str, baseline: Sample, current: Sample,
                         recent_baseline: bool = False) -> None:
        cap = self.config.max_sequences
        if recent_baseline:
            baseline = baseline.take(slice(-cap, None))  # the baseline just before the change
        else:
            baseline = baseline.take(slice(0, cap))
        current = current.take(slice(0, cap))
        rows = self.compare_with(report, kind, baseline, current)
        report.rows += rows + attribute_traffic(self, report, kind, baseline, current, rows)

    def compare_with(self, report: Report, kind: str, baseline: Sample, current: Sample,
                     config: MonitorConfig | None = None) -> list[dict]:
        """The rows of one comparison of two samples, as they are, at `config`'s alpha, effect
        gate and permutations (default: the monitor's), over the metrics the samples measure."""
        config = config or self.config
        measured = _measured(baseline, current)
        results = compare({m: baseline.metrics[m] for m in measured}, {m: current.metrics[m] for m in measured},
                          alpha=config.alpha, min_effect=config.min_effect, min_sequences=config.min_sequences,
                          permutations=config.permutations, baseline_keys=baseline.keys,
                          current_keys=current.keys)
        return [self._row(report, kind, r, baseline, current) for r in results]

    def _online(self, report: Report, regime: dict, reference: Sample, sequences: int,
                since_us: int | None = None) -> None:
        """Feed the sequences of the newest regime that arrived since the last run to its
        detectors, whose state lives in the data root (online.json); one row per alarm, with
        the sequence where it fired, else one row per metric with the detector's state. A
        regime first watched in a later segment (a rollback) starts from that segment; one
        watched before goes on against its reference."""
        if sequences <= self.config.window:
            return
        label = _describe(_regime_filter(regime))
        for attempt in range(2):
            state = OnlineState.load(self.index.fs, self.index.path)
            try:
                watch, alarms = self._feed_new(state, label, regime, reference, since_us)
                break
            except READ_ERRORS as exc:  # a file compacted away since the refresh: again, from the state as saved
                if attempt or not vanished(exc):
                    raise
                self._refresh = None
                self._refresh_index()
        state.keep(label)
        self._online_state = state  # saved by `run` once the report is published
        for metric, d in watch["detectors"].items():
            mine = [a for a in alarms if a["metric"] == metric]
            for a in mine:
                report.rows.append(self._online_row(report, label, metric, d, a))
            if not mine:
                report.rows.append(self._online_row(report, label, metric, d, None))

    def _feed_new(self, state: OnlineState, label: str, regime: dict, reference: Sample,
                  since_us: int | None) -> tuple[dict, list[dict]]:
        """Feed the regime's detectors in `state` the sequences not fed yet: its watch and the alarms."""
        w = self.config.window
        files = self.index.files_of(regime)
        settings = {"window": w, "target_arl": self.config.target_arl}
        watch = state.regimes.get(label)
        if watch is None or watch.get("settings") != settings:  # first seen past its reference window, or retuned
            watch = state.regimes[label] = {"fed": {}, "watermark_us": None, "detectors": {}, "settings": settings}
            for metric in ONLINE_METRICS:
                watch["detectors"][metric] = _collecting(COUNT_METRICS.get(metric))
            self._feed(watch, reference)
            batches = self._stream(files, [], regime, offset=w, since_us=since_us)
        else:
            fed = watch["fed"]
            known = {part for parts in fed.values() for part in parts}
            full, partial, unfed = [], [], {}
            for f in files:
                if f in fed:
                    continue
                seen = self.index.seen_before(f, known)
                if seen == "none":
                    full.append(f)
                elif seen == "some" and (rows := self.index.rows_of(f)) is not None:
                    unfed[f] = [rows[p] for p in self.index.parts_of(f) if p not in known]
                elif seen == "some":
                    partial.append(f)
            batches = self._stream(full, partial, regime, after_us=watch["watermark_us"], unfed=unfed)
        alarms = []
        for batch in batches:
            alarms += self._feed(watch, _sample(batch, label), batch.column("request_id"))
        # the files fed, with the writers' part files each holds (what a later compaction names)
        watch["fed"] = {f: watch["fed"].get(f) or self.index.parts_of(f) for f in files}
        return watch, alarms

    def _stream(self, full: list[str], partial: list[str], regime: dict, offset: int = 0,
                after_us: int | None = None, since_us: int | None = None, unfed: dict | None = None):
        """Record batches, in time order, of the regime's sequences (after `since_us`) in `full`
        files (from the `offset`-th on), then of those at the `unfed` row ranges of compactions
        that merged fed and unfed files, then of those after `after_us` in `partial` ones (such
        compactions that predate the recorded row ranges)."""
        clause, params = _regime_filter(regime).sql()
        if since_us is not None:
            clause += f" AND epoch_us(ts) > {int(since_us)}"
        base = _sample_sql("part", clause, None, "first")
        if full:
            yield from self._stream_files(full, base + (f" OFFSET {int(offset)}" if offset else ""), list(params))
        if unfed:
            yield from self._stream_view(rows_at(unfed, self.index.fs, self.index.path), base, list(params))
        if partial:
            yield from self._stream_files(partial, f"SELECT * FROM ({base}) WHERE ts_us > {int(after_us or 0)} "
                                          "ORDER BY ts_us", list(params))

    def _feed(self, watch: dict, sample: Sample, request_ids=None) -> list[dict]:
        """Every detector of a regime takes the sequences of `sample`, in order: a detector
        without a reference collects one (`window` finite values, calibrated when complete);
        an alarm is recorded with its sequence, and the detector collects a new reference
        from the sequences after it."""
        w = self.config.window
        arl = self.config.target_arl * len(ONLINE_METRICS)  # the family of detectors keeps the target together
        alarms = []
        if len(sample):
            watch["watermark_us"] = max(int(sample.ts.max()), watch["watermark_us"] or 0)
            watch["sequences_fed"] = watch.get("sequences_fed", 0) + len(sample)
        for metric, d in watch["detectors"].items():
            count = COUNT_METRICS.get(metric)
            values = sample.counts[metric] if count else sample.metrics[metric]
            exposures = sample.tokens
            finite = np.isfinite(values) & np.isfinite(exposures)
            i, n = 0, len(values)
            while i < n:
                if d["detector"] is None:
                    ref = d["reference"]
                    take = np.flatnonzero(finite[i:])[: w - len(ref["values"])] + i
                    if not len(take):
                        break
                    if not ref["values"]:
                        d["reference_start_us"] = int(sample.ts[take[0]])
                    ref["values"] += values[take].tolist()
                    ref["exposures"] += exposures[take].tolist()
                    d["reference_end_us"] = int(sample.ts[take[-1]])
                    i = int(take[-1]) + 1
                    if len(ref["values"]) >= w:
                        if count:
                            detector = PoissonCUSUM.calibrated(np.array(ref["values"]), np.array(ref["exposures"]),
                                                               target_arl=arl)
                        else:
                            detector = CUSUM.calibrated(np.array(ref["values"]), target_arl=arl)
                        d.update(detector=detector.state(), reference={"values": [], "exposures": []},
                                 since=0, stream_start_us=None, reference_n=len(ref["values"]))
                    continue
                detector = (PoissonCUSUM if count else CUSUM).from_state(d["detector"])
                if d["stream_start_us"] is None:
                    d["stream_start_us"] = int(sample.ts[i])
                k = detector.update_many(values[i:], exposures[i:]) if count else detector.update_many(values[i:])
                if k is None:
                    d["since"] += n - i
                    d["detector"] = detector.state()
                    d["stream_end_us"] = int(sample.ts[-1])
                    break
                at = i + k
                d["since"] += k + 1
                alarms.append({
                    "metric": metric, "statistic": detector.statistic, "threshold": detector.threshold,
                    "since": d["since"], "ts_us": int(sample.ts[at]),
                    "request_id": None if request_ids is None else request_ids[at].as_py(),
                    "reference_start_us": d["reference_start_us"], "reference_end_us": d["reference_end_us"],
                    "reference_n": d["reference_n"], "stream_start_us": d["stream_start_us"],
                })
                d.update(_collecting(count), alarms=d.get("alarms", 0) + 1)
                i = at + 1
        return alarms

    def _online_row(self, report: Report, label: str, metric: str, d: dict, alarm: dict | None) -> dict:
        test = "poisson_cusum" if metric in COUNT_METRICS else "cusum"
        if alarm is not None:
            statistic, threshold, verdict, since = alarm["statistic"], alarm["threshold"], "drift", alarm["since"]
            ref = (alarm["reference_start_us"], alarm["reference_end_us"], alarm["reference_n"])
            current = (alarm["stream_start_us"], alarm["ts_us"])
        elif d["detector"] is not None:
            statistic = max(d["detector"].get("upper", 0.0), d["detector"].get("lower", 0.0),
                            d["detector"].get("statistic", 0.0))
            threshold, verdict, since = d["detector"]["threshold"], "no_drift", d["since"]
            ref = (d["reference_start_us"], d["reference_end_us"], d["reference_n"])
            current = (d["stream_start_us"], d.get("stream_end_us"))
        else:  # collecting a reference
            statistic, threshold, verdict, since = None, None, "insufficient_data", 0
            ref = (d.get("reference_start_us"), d.get("reference_end_us"), len(d["reference"]["values"]))
            current = (None, None)
        return {
            "report_id": report.report_id, "ts": report.ts, "kind": "online", "metric": metric, "test": test,
            "statistic": _number(statistic), "p_value": None, "effect_size": None, "threshold": _number(threshold),
            "baseline_regime": label, "current_regime": label,
            "baseline_start": _maybe_time(ref[0]), "baseline_end": _maybe_time(ref[1]),
            "current_start": _maybe_time(current[0]), "current_end": _maybe_time(current[1]),
            "n_baseline": ref[2], "n_current": since, "verdict": verdict,
            "request_id": alarm["request_id"] if alarm is not None else None,
        }

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


def _sample_sql(view: str, clause: str, limit: int | None, order: str) -> str:
    metric_sql = ", ".join(f"{sql} AS {name}" for name, sql in METRICS.items())
    select = (f"SELECT epoch_us(ts) AS ts_us, ts, request_id, generated_tokens, nonfinite, overflow, prompt_key, "
              f"prompt_tokens, deployment, replica, "
              f"{metric_sql} FROM {view} WHERE generated_tokens > 0 AND {clause}")
    if limit is None:
        return f"{select} ORDER BY ts"
    by = {"first": "ts", "last": "ts DESC", "hash": "hash(request_id), ts"}
    if order not in by:
        raise ValueError(f"order must be one of {', '.join(by)}, got {order!r}")
    return f"SELECT * EXCLUDE (ts) FROM ({select} ORDER BY {by[order]} LIMIT {int(limit)}) ORDER BY ts"


def _sample(table: pa.Table, label: str) -> Sample:
    column = lambda name: table[name].to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    return Sample(label, table["ts_us"].to_numpy(zero_copy_only=False),
                  {name: column(name) for name in METRICS}, column("generated_tokens"),
                  {name: column(count) for name, count in COUNT_METRICS.items()},
                  np.array(table["prompt_key"].to_pylist(), dtype=object), column("prompt_tokens"),
                  np.array(table["deployment"].to_pylist(), dtype=object),
                  np.array(table["replica"].to_pylist(), dtype=object))


def _measured(*samples: Sample) -> list[str]:
    """The metrics some sequence of these samples has a value of: a column that files written
    before it existed lack (null, e.g. `repetition`) is not tested rather than reported as
    insufficient data on every run."""
    return [m for m in METRICS if any(np.isfinite(s.metrics[m]).any() for s in samples)]


def _regime_filter(regime: dict) -> Filter:
    source = (("params_source", regime["params_source"]),) if regime.get("params_source") else ()
    return Filter(tuple((key, regime[key]) for key in REGIME_IDENTITY) + source)


def _describe(where: Filter) -> str:
    values = dict(where.terms)
    if all(key in values for key in REGIME_IDENTITY):
        rest = ",".join(f"{k}={v}" for k, v in where.terms
                        if k not in REGIME_IDENTITY and (k, v) != ("params_source", "deployment"))
        return f"{values['model_id']}@{values['model_rev']}/{values['params_id']}" + (f"[{rest}]" if rest else "")
    return ",".join(f"{k}={v}" for k, v in where.terms) or "all"


def _time(us: int | float) -> datetime:
    return datetime.fromtimestamp(int(us) / 1e6, timezone.utc)


def _maybe_time(us: int | None) -> datetime | None:
    return None if us is None else _time(us)


def _collecting(count: str | None) -> dict:
    """A detector's state while it collects its reference."""
    return {"test": "poisson_cusum" if count else "cusum", "detector": None,
            "reference": {"values": [], "exposures": []}, "reference_start_us": None, "reference_end_us": None,
            "reference_n": 0, "since": 0, "stream_start_us": None}


@dataclass
class OnlineState:
    """The online detectors' state between runs, per regime: the files already fed, each
    detector's statistic (or the reference it is collecting). `_monitor/online.json` in the data
    root, replaced atomically after each run."""

    regimes: dict = field(default_factory=dict)
    NAME = "online.json"
    KEEP = 8  # regimes whose state is kept (the newest, and those watched before it)

    @classmethod
    def load(cls, fs, path: str) -> OnlineState:
        try:
            with fs.open_input_stream(f"{path}/{INDEX_DIR}/{cls.NAME}") as f:
                data = json.loads(f.read())
            if data.get("version") != 1:
                raise ValueError("another version")
            return cls(data["regimes"])
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError) as exc:
            log.warning("softwatch: online detector state unreadable, starting over (%s)", exc)
            return cls()

    def keep(self, newest: str) -> None:
        """`newest` last (most recently watched); only the KEEP most recent kept."""
        self.regimes[newest] = self.regimes.pop(newest)
        for label in list(self.regimes)[:-self.KEEP]:
            del self.regimes[label]

    def save(self, fs, path: str) -> None:
        data = json.dumps({"version": 1, "regimes": self.regimes}).encode()
        write_atomically(fs, f"{path}/{INDEX_DIR}/{self.NAME}", lambda sink: sink.write(data))


def _number(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
