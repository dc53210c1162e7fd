"""`softwatch bench drift`: the drift monitor, and Evidently, on independently generated traffic.

Every trial is its own traffic (traffic.py): held-out prompts no other trial uses, repeated
prompts (k prompts x m samples, m cycling over 1, 5, 10), its own sampling seeds, arrival
order and batch size. Nothing is shared between trials, so their outcomes are independent
and the Clopper–Pearson intervals hold as stated.

Each trial is written into a fresh data root with the store's own writer and checked by the
product: `Monitor(root, MonitorConfig()).run()`, the monitor's own settings, after every
`looks_every` new sequences of the current regime, as the service reruns it while traffic
arrives (so the regime comparison is looked at repeatedly, and the online detectors are fed
incrementally from their persisted state). A null trial is a no-op deploy: the baseline regime,
then the same model under a new revision label, long enough (2 windows) for the window and
online comparisons. A change trial is the baseline regime then the changed one (CHANGES).

A check is one comparison kind over one trial: it is a false alarm when any look says drift.
Evidently 0.7's DataDriftPreset runs on the same sequences (baseline regime vs the whole
current regime; the five sequence metrics that vary, so no constant column counts against its
half-of-the-columns rule) at its defaults, and with per-column alerting (drift when any
column's KS p-value is below t) at t matched to the monitor's regime false-alarm rate on the
null trials: a setting tuned on the reported nulls, which favours Evidently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..drift.monitor import Monitor, MonitorConfig
from . import print_progress
from .heldout import VERSION
from .traffic import Plan, Trial, directory, generate, schedule, segment_path

KINDS = ("regime", "window", "online")
EVIDENTLY_COLUMNS = ("mean_entropy", "log_perplexity", "mean_top_prob", "p10_top_prob", "mean_sampling_entropy")


def quick_config() -> MonitorConfig:
    """The monitor's settings scaled to `--quick`'s few sequences (CI: the mechanics, not the figures)."""
    return MonitorConfig(min_sequences=8, window=16, target_arl=500)


# ---- running the product on one trial -------------------------------------------------------------
def monitor_looks(tables: list[pa.Table], config: MonitorConfig, looks_every: int) -> list[dict[str, str]]:
    """Write the baseline regime, then the current one `looks_every` sequences at a time, into a
    fresh data root, running the monitor after each: each run's verdict per comparison kind."""
    from ..store import ParquetSink

    baseline, current = tables
    looks = []
    with tempfile.TemporaryDirectory(prefix="softwatch-bench-drift-") as root:
        _write(ParquetSink, root, baseline)
        for end in range(looks_every, current.num_rows + 1, looks_every):
            _write(ParquetSink, root, current.slice(end - looks_every, looks_every))
            monitor = Monitor(root, config)
            try:
                report = monitor.run()
            finally:
                monitor.close()
            looks.append({kind: _verdict([r for r in report.rows if r["kind"] == kind]) for kind in KINDS})
    return looks


def _write(sink_class, root: str, table: pa.Table) -> None:
    with sink_class(root, writer="bench", journal=None) as sink:
        sink.write("sequences", table)


def _verdict(rows: list[dict]) -> str:
    verdicts = {r["verdict"] for r in rows}
    return "drift" if "drift" in verdicts else "no_drift" if "no_drift" in verdicts else "insufficient_data"


def outcome(looks: list[dict[str, str]]) -> dict[str, str]:
    """Per kind, the trial's verdict over all its looks: drift if any look said so, no_drift if
    some look decided, else insufficient_data (the check never ran)."""
    return {kind: _verdict([{"verdict": look[kind]} for look in looks]) for kind in KINDS}


# ---- Evidently ------------------------------------------------------------------------------------
def evidently_pvalues(baseline: pa.Table, current: pa.Table) -> dict:
    """Evidently's DataDriftPreset at its defaults on the sequence metrics that vary: its
    dataset verdict and each column's p-value."""
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    frames = [pd.DataFrame({m: np.nan_to_num(_metric(t, m)) for m in EVIDENTLY_COLUMNS}) for t in (baseline, current)]
    varying = [c for c in EVIDENTLY_COLUMNS if pd.concat([f[c] for f in frames]).nunique() > 1]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()]).run(current_data=frames[1][varying], reference_data=frames[0][varying])
    share, pvalues = None, {}
    for metric in snapshot.dict()["metrics"]:
        name = str(metric.get("metric_name", ""))
        if name.startswith("DriftedColumnsCount"):
            share = metric["value"]["share"]
        elif name.startswith("ValueDrift(") and "p_value" in name:
            pvalues[metric["config"]["column"]] = float(metric["value"])
    if share is None:
        raise RuntimeError("Evidently's report has no DriftedColumnsCount metric")
    return {"dataset_drift": share >= 0.5, "pvalues": pvalues}


def _metric(table: pa.Table, metric: str) -> np.ndarray:
    if metric == "log_perplexity":
        return np.log(table["perplexity"].to_numpy(zero_copy_only=False).astype(float))
    return table[metric].to_numpy(zero_copy_only=False).astype(float)


# ---- rates ----------------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial rate."""
    from scipy.stats import beta

    if n == 0:
        return (0.0, 1.0)
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return (low, high)


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided exact upper bound (0 of 149 gives 0.0199: the ≤ 2% target)."""
    from scipy.stats import beta

    if n == 0 or k == n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def rate(alarms: list[bool]) -> dict:
    k, n = int(sum(alarms)), len(alarms)
    return {"alarms": k, "checks": n, "rate": k / n if n else None, "ci95": list(clopper_pearson(k, n)),
            "upper95": upper_bound(k, n)}


def matched_threshold(null_min_pvalues: list[float], allowed: int) -> float:
    """The per-column p-value threshold at which at most `allowed` of the null trials alarm
    (alarm: some column's p-value below it)."""
    ordered = sorted(null_min_pvalues)
    return ordered[allowed] if allowed < len(ordered) else 1.0


# ---- the benchmark --------------------------------------------------------------------------------
def run(model: str = "SmolLM2-135M-Instruct", data: str | None = None, quick: bool = False, device: str = "auto",
        generate_missing: bool = True) -> dict:
    """Generate what is missing of the plan's traffic (unless `generate_missing` is false:
    then only the trials already generated are evaluated, and the result says `partial`),
    then run every trial through the monitor and Evidently."""
    from ..models import load_model
    from ..store import default_root

    plan = Plan.quick() if quick else Plan.full()
    config = quick_config() if quick else MonitorConfig()
    lm = load_model(model, device=device)
    model_for = _models(lm)
    folder = directory(data or default_root(), lm, plan.max_tokens)
    trials = schedule(plan)
    if generate_missing:
        generate(model_for, trials, folder, plan.max_tokens, progress=print_progress)
    ready = [t for t in trials if all(os.path.exists(segment_path(folder, t, s)) for s in range(len(t.segments)))]
    result = evaluate(ready, folder, config, plan)
    result.update(model=lm.model_id, model_rev=lm.model_rev, prompts=VERSION, traffic=folder,
                  plan=asdict(plan), monitor=asdict(config), partial=len(ready) < len(trials),
                  trials_planned={"null": plan.null_trials, **{c: plan.change_trials for c in plan.changes}})
    if not quick:  # the probes have their own tests; quick checks the trial mechanics
        result["probes"] = probe_rates(lm, model_for(8), trials=50)
    return result


def generate_traffic(model: str = "SmolLM2-135M-Instruct", data: str | None = None, quick: bool = False,
                     device: str = "auto") -> int:
    """Generate the plan's missing traffic (resumable); the segments made."""
    from ..models import load_model
    from ..store import default_root

    plan = Plan.quick() if quick else Plan.full()
    lm = load_model(model, device=device)
    return generate(_models(lm), schedule(plan), directory(data or default_root(), lm, plan.max_tokens),
                    plan.max_tokens, progress=print_progress)


def _models(lm):
    """`bits -> model`: the base model (None) or its weights rounded to `bits`, made once."""
    from ..models import quantize_weights

    models = {None: lm}

    def model_for(bits: int | None):
        if bits not in models:
            models[bits] = quantize_weights(lm, bits)
        return models[bits]

    return model_for


def evaluate(trials: list[Trial], folder: str, config: MonitorConfig, plan: Plan) -> dict:
    """Rates over `trials` (their traffic already in `folder`)."""
    null_checks = {kind: [] for kind in KINDS}
    first_look, by_repeats, evidently_null = [], {}, []
    hits = {name: {"softwatch": [], "evidently": []} for name in plan.changes}
    change_pvalues = {name: [] for name in plan.changes}
    record = []
    outcomes = _outcomes_dir(folder, config, plan)
    for done, trial in enumerate(trials, 1):
        looks, ev = trial_outcome(trial, folder, config, plan, outcomes)
        verdicts = outcome(looks)
        record.append({"trial": trial.name, "repeats": trial.segments[0].repeats, "order": trial.order,
                       "max_batch": trial.max_batch, "looks": looks, "verdicts": verdicts,
                       "evidently": ev})
        if trial.kind == "null":
            for kind in KINDS:
                if verdicts[kind] != "insufficient_data":
                    null_checks[kind].append(verdicts[kind] == "drift")
            decided = [look["regime"] for look in looks if look["regime"] != "insufficient_data"]
            if decided:
                first_look.append(decided[0] == "drift")
            m = trial.segments[0].repeats
            by_repeats.setdefault(str(m), {kind: [] for kind in KINDS})
            for kind in KINDS:
                if verdicts[kind] != "insufficient_data":
                    by_repeats[str(m)][kind].append(verdicts[kind] == "drift")
            evidently_null.append(ev)
        else:
            hits[trial.kind]["softwatch"].append(verdicts["regime"] == "drift")
            hits[trial.kind]["evidently"].append(ev["dataset_drift"])
            change_pvalues[trial.kind].append(min(ev["pvalues"].values(), default=1.0))
        print_progress(f"evaluated {trial.name} ({done}/{len(trials)}): {verdicts}")
    regime_alarms = sum(null_checks["regime"])
    threshold = matched_threshold([min(e["pvalues"].values(), default=1.0) for e in evidently_null], regime_alarms)
    matched_null = [min(e["pvalues"].values(), default=1.0) < threshold for e in evidently_null]
    return {
        "false_alarm_rate": {kind: rate(null_checks[kind]) for kind in KINDS},
        "regime_first_look": rate(first_look),
        "false_alarm_rate_by_repeats": {m: {kind: rate(v) for kind, v in kinds.items()} for m, kinds in by_repeats.items()},
        "detection_rate": {name: rate(h["softwatch"]) for name, h in hits.items()},
        "evidently": {
            "default": {"false_alarm_rate": rate([e["dataset_drift"] for e in evidently_null]),
                        "detection_rate": {name: rate(h["evidently"]) for name, h in hits.items()}},
            "per_column_matched": {"threshold": threshold, "false_alarm_rate": rate(matched_null),
                                   "detection_rate": {name: rate([p < threshold for p in ps])
                                                      for name, ps in change_pvalues.items()}},
        },
        "trials_evaluated": {"null": len(evidently_null), **{name: len(h["softwatch"]) for name, h in hits.items()}},
        "trials": record,
    }


def trial_outcome(trial: Trial, folder: str, config: MonitorConfig, plan: Plan, outcomes: str) -> tuple[list, dict]:
    """The monitor's verdicts at each look and Evidently's p-values for one trial, cached in
    `outcomes` (evaluation resumes as generation does)."""
    path = os.path.join(outcomes, f"{trial.name}.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        return cached["looks"], cached["evidently"]
    tables = [pq.read_table(segment_path(folder, trial, s)) for s in range(len(trial.segments))]
    looks, ev = monitor_looks(tables, config, plan.looks_every), evidently_pvalues(*tables)
    os.makedirs(outcomes, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"looks": looks, "evidently": ev}, f)
    os.replace(path + ".tmp", path)
    return looks, ev


def _outcomes_dir(folder: str, config: MonitorConfig, plan: Plan) -> str:
    """Where outcomes are cached: one folder per monitor config, look spacing and Evidently version."""
    from importlib.metadata import version

    settings = json.dumps([asdict(config), plan.looks_every, version("evidently")], sort_keys=True).encode()
    return os.path.join(folder, f"outcomes-{hashlib.blake2b(settings, digest_size=4).hexdigest()}")


def probe_rates(lm, quantized, trials: int) -> dict:
    """The weight change seen through teacher-forced scoring of 48 of the probes (paired test)."""
    from ..drift.probes import builtin_probes, paired_test, score, score_twice

    probes = builtin_probes()
    baseline, replicate = score_twice(lm, probes)
    rescored = score(lm, probes, batch=5)  # no change: the same model in a third batch composition
    changed = score(quantized, probes)
    rng = np.random.default_rng(np.random.SeedSequence([16_2026, 99]))
    null, hits = [], []
    size = min(48, len(probes))
    for trial in range(trials):
        index = rng.permutation(len(probes))[:size]
        sub = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        null.append(any(r.verdict == "drift" for r in paired_test(sub(baseline), sub(replicate), sub(rescored),
                                                                  seed=trial)))
        hits.append(any(r.verdict == "drift" for r in paired_test(sub(baseline), sub(replicate), sub(changed),
                                                                  seed=trial)))
    return {"prompts": size, "false_alarm_rate": rate(null), "detection_rate": {"weights_int8": rate(hits)},
            "note": "probe subsets overlap (64 probes): trials are not independent"}


def format_rate(r: dict) -> str:
    if not r["checks"]:
        return "— (0 checks)"
    return (f"{r['alarms']}/{r['checks']} = {r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], "
            f"upper {r['upper95']:.3f}")
