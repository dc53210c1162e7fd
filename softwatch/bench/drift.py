"""`softwatch bench drift`: softwatch's detectors and Evidently's default drift preset on the
same generated data.

Generating text is the expensive part, so each condition's pool of sequences is generated
once (in chunks, saved after each, so an interrupted run resumes) and cached under the data
directory; trials draw samples from the pools. Within a trial the two sides never share a
sequence; across trials they do (a pool is finite), so trial outcomes are not independent
and the confidence intervals are optimistic.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..drift.monitor import COUNT_METRICS
from ..drift.monitor import STATISTIC_METRICS as METRICS  # the pools hold the token statistics only
from ..drift.online import CUSUM, PoissonCUSUM
from ..drift.twosample import compare
from . import print_progress

TOKEN_FIELDS = ("entropy", "top_prob", "logprob", "sampling_entropy")
# Online detectors get a family average run length of 20 sample sizes: about 5% of no-change
# streams of one sample size alarm (an ARL is a rate, not a per-check level).
ONLINE_ARL_PER_SIDE = 20


@dataclass(frozen=True)
class Condition:
    name: str
    temperature: float = 0.7
    top_p: float = 0.9
    template_version: str = "v1"
    quantize_bits: int | None = None


BASE = Condition("base")
CHANGES = [
    Condition("temperature_0.7_to_0.8", temperature=0.8),
    Condition("top_p_0.9_to_0.7", top_p=0.7),
    Condition("weights_int8", quantize_bits=8),
    Condition("template_v1_to_v2", template_version="v2"),
]


@dataclass(frozen=True)
class Plan:
    base_pool: int
    change_pool: int
    sizes: tuple[int, ...]  # sequences per side
    null_trials: int
    change_trials: int
    max_tokens: int
    probe_trials: int
    delay_step: int

    @classmethod
    def full(cls) -> Plan:
        return cls(base_pool=2000, change_pool=500, sizes=(100, 300), null_trials=200, change_trials=40,
                   max_tokens=32, probe_trials=50, delay_step=50)

    @classmethod
    def quick(cls) -> Plan:
        return cls(base_pool=96, change_pool=48, sizes=(24,), null_trials=6, change_trials=3,
                   max_tokens=8, probe_trials=3, delay_step=12)


# ---- pools ----------------------------------------------------------------------------------------
def pool(lm, condition: Condition, n: int, max_tokens: int, directory: str, batch: int = 64) -> dict[str, np.ndarray]:
    """`n` sequences of `condition`: sequence metrics (METRICS), generated_tokens, counts, and
    the token-level fields with each token's sequence index. Cached in `directory`."""
    from ..engine import DecodingParams, Engine
    from ..prompts import chat_messages, prompt_set

    path = os.path.join(directory, f"pool-{condition.name}-{lm.model_rev}-{max_tokens}.npz")
    done = dict(np.load(path)) if os.path.exists(path) else None
    have = len(done["generated_tokens"]) if done else 0
    if have >= n:
        return _head(done, n)
    prompts = prompt_set()
    order = np.random.default_rng(0).permutation(10**6) % len(prompts)  # the same prompt stream for every condition
    engine = Engine(lm, max_batch=batch)
    started = time.perf_counter()
    while have < n:
        chunk = range(have, min(have + batch, n))
        for i in chunk:
            params = DecodingParams(temperature=condition.temperature, top_p=condition.top_p, max_tokens=max_tokens,
                                    seed=hash((condition.name, i)) & (2**62 - 1),
                                    template_version=condition.template_version)
            engine.submit(chat_messages(prompts[order[i]], condition.template_version), params, chat=True,
                          request_id=str(i))
        finished = {}
        while engine.has_work():
            for c in engine.step():
                finished[int(c.request_id)] = c
        done = _append(done, [finished[i] for i in chunk], have)
        have = len(done["generated_tokens"])
        os.makedirs(directory, exist_ok=True)
        np.savez(path + ".tmp.npz", **done)
        os.replace(path + ".tmp.npz", path)
        progress(f"generating pool {condition.name}", have, n, started)
    return _head(done, n)


def _append(done: dict | None, completions: list, offset: int) -> dict[str, np.ndarray]:
    from ..stats import COLUMN

    rows = {name: [] for name in (*METRICS, "generated_tokens", *COUNT_METRICS.values())}
    tokens = {name: [] for name in (*TOKEN_FIELDS, "sequence")}
    for j, c in enumerate(completions):
        s, n = c.summary, len(c.token_ids)
        values = {
            "mean_entropy": s["mean_entropy"], "log_perplexity": math.log(s["perplexity"]),
            "mean_top_prob": s["mean_top_prob"], "p10_top_prob": s["p10_top_prob"],
            "mean_sampling_entropy": s["mean_sampling_entropy"], "overflow_rate": s["overflow"] / max(n, 1),
            "nonfinite_rate": s["nonfinite"] / max(n, 1), "generated_tokens": n,
            "overflow": s["overflow"], "nonfinite": s["nonfinite"],
        }
        for name in rows:
            rows[name].append(values[name])
        stats = np.asarray(c.stats)
        for name in TOKEN_FIELDS:
            tokens[name].append(stats[:, COLUMN[name]])
        tokens["sequence"].append(np.full(n, offset + j))
    new = {**{k: np.asarray(v, np.float64) for k, v in rows.items()},
           **{f"token_{k}": np.concatenate(v) for k, v in tokens.items()}}
    if done is None:
        return new
    return {k: np.concatenate([done[k], new[k]]) for k in new}


def _head(p: dict, n: int) -> dict[str, np.ndarray]:
    keep = p["token_sequence"] < n
    return {k: (v[keep] if k.startswith("token_") else v[:n]) for k, v in p.items()}


@dataclass
class Side:
    """A sample of sequences drawn from a pool."""

    metrics: dict[str, np.ndarray]
    tokens: np.ndarray
    counts: dict[str, np.ndarray]
    token_rows: dict[str, np.ndarray]


def draw(p: dict, index: np.ndarray) -> Side:
    token_mask = np.isin(p["token_sequence"], index)
    return Side({m: p[m][index] for m in METRICS}, p["generated_tokens"][index],
                {m: p[c][index] for m, c in COUNT_METRICS.items()},
                {f: p[f"token_{f}"][token_mask] for f in TOKEN_FIELDS})


# ---- detectors ------------------------------------------------------------------------------------
def softwatch_alarm(a: Side, b: Side) -> bool:
    return any(r.verdict == "drift" for r in compare(a.metrics, b.metrics, min_sequences=min(20, len(a.tokens))))


def online_delay(reference: Side, stream: Side, target_arl: float, seed: int) -> int | None:
    """Sequences of `stream` until the first detector alarms (None: no alarm), after
    calibrating on `reference`."""
    first = None
    per_metric_arl = target_arl * len(METRICS)
    for metric in METRICS:
        if metric in COUNT_METRICS:
            d = PoissonCUSUM.calibrated(reference.counts[metric], reference.tokens, per_metric_arl, streams=200,
                                        seed=seed)
            feed = zip(stream.counts[metric], stream.tokens)
        else:
            d = CUSUM.calibrated(reference.metrics[metric], per_metric_arl, streams=200, seed=seed)
            feed = ((x,) for x in stream.metrics[metric])
        for i, args in enumerate(feed):
            if first is not None and i >= first:
                break
            d.update(*args)
            if d.drift_detected:
                first = i + 1
                break
    return first


def evidently_alarm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Evidently's DataDriftPreset with its defaults: dataset drift when at least half the
    columns drift (per column: KS p < 0.05 up to 1000 rows, normalized Wasserstein > 0.1 above)."""
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    with warnings.catch_warnings(), np.errstate(all="ignore"):  # it correlates constant columns
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()]).run(current_data=pd.DataFrame(b), reference_data=pd.DataFrame(a))
    for metric in snapshot.dict()["metrics"]:
        if str(metric.get("metric_name", "")).startswith("DriftedColumnsCount"):
            share = metric["value"]["share"]
            return share >= 0.5
    raise RuntimeError("Evidently's report has no DriftedColumnsCount metric")


def _sequence_frame(side: Side) -> dict[str, np.ndarray]:
    # Evidently gets the same sequence metrics softwatch tests (NaN-free: it would drop rows)
    return {m: np.nan_to_num(v) for m, v in side.metrics.items()}


# ---- rates ----------------------------------------------------------------------------------------
_last_report = [0.0]


def progress(label: str, done: int, total: int, started: float) -> None:
    """A progress line every few seconds and at the end, with an estimate of the time left."""
    now = time.perf_counter()
    if done < total and now - _last_report[0] < 3:
        return
    _last_report[0] = now
    elapsed = now - started
    left = elapsed / done * (total - done) if done else float("nan")
    print_progress(f"{label}: {done}/{total} ({elapsed:.0f} s elapsed, ~{left:.0f} s left)")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(alarms: list[bool]) -> dict:
    k, n = sum(alarms), len(alarms)
    low, high = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "ci95": [low, high], "trials": n}


# ---- the benchmark --------------------------------------------------------------------------------
def run(model: str = "SmolLM2-135M-Instruct", data: str | None = None, quick: bool = False, device: str = "auto",
        seed: int = 0) -> dict:
    from ..drift.probes import builtin_probes, paired_test, score, score_twice
    from ..models import load_model, quantize_weights
    from ..store import default_root

    plan = Plan.quick() if quick else Plan.full()
    directory = os.path.join(data or default_root(), "bench-drift")
    lm = load_model(model, device=device)
    models = {None: lm}
    pools = {BASE.name: pool(lm, BASE, plan.base_pool, plan.max_tokens, directory)}
    for change in CHANGES:
        if change.quantize_bits not in models:
            models[change.quantize_bits] = quantize_weights(lm, change.quantize_bits)
        pools[change.name] = pool(models[change.quantize_bits], change, plan.change_pool, plan.max_tokens, directory)

    rng = np.random.default_rng(seed)
    base = pools[BASE.name]
    result = {"model": lm.model_id, "plan": plan.__dict__, "sizes": {}}
    started = time.perf_counter()
    total = len(plan.sizes) * (plan.null_trials + len(CHANGES) * plan.change_trials)
    done = 0
    for n in plan.sizes:
        out = {"softwatch": {}, "evidently_sequences": {}, "evidently_tokens": {}, "always_alarm": {}}
        nulls = {"softwatch": [], "evidently_sequences": [], "evidently_tokens": []}
        online_false = []
        for trial in range(plan.null_trials):
            index = rng.permutation(len(base["generated_tokens"]))[: 2 * n]
            a, b = draw(base, index[:n]), draw(base, index[n:])
            nulls["softwatch"].append(softwatch_alarm(a, b))
            nulls["evidently_sequences"].append(evidently_alarm(_sequence_frame(a), _sequence_frame(b)))
            nulls["evidently_tokens"].append(evidently_alarm(a.token_rows, b.token_rows))
            if n == max(plan.sizes):  # the online detectors' calibration is the costly part: one size
                online_false.append(online_delay(a, b, target_arl=ONLINE_ARL_PER_SIDE * n, seed=trial) is not None)
            done += 1
            progress("trials", done, total, started)
        for key, alarms in nulls.items():
            out[key]["false_alarm_rate"] = rate(alarms)
        if online_false:
            out["softwatch_online"] = {"false_alarm_rate": rate(online_false), "detection_rate": {},
                                       "median_delay_sequences": {}}
        out["always_alarm"] = {"false_alarm_rate": rate([True] * plan.null_trials)}
        for key in out:
            out[key].setdefault("detection_rate", {})
            out[key].setdefault("median_delay_sequences", {})
        for change in CHANGES:
            changed = pools[change.name]
            hits = {"softwatch": [], "evidently_sequences": [], "evidently_tokens": []}
            delays, online = [], []
            for trial in range(plan.change_trials):
                ia = rng.permutation(len(base["generated_tokens"]))[:n]
                ib = rng.permutation(len(changed["generated_tokens"]))[:n]
                a, b = draw(base, ia), draw(changed, ib)
                hits["softwatch"].append(softwatch_alarm(a, b))
                hits["evidently_sequences"].append(evidently_alarm(_sequence_frame(a), _sequence_frame(b)))
                hits["evidently_tokens"].append(evidently_alarm(a.token_rows, b.token_rows))
                delays.append(_announced_delay(a, changed, ib, plan.delay_step))
                if n == max(plan.sizes):
                    online.append(online_delay(a, b, target_arl=ONLINE_ARL_PER_SIDE * n, seed=trial))
                done += 1
                progress("trials", done, total, started)
            for key, alarms in hits.items():
                out[key]["detection_rate"][change.name] = rate(alarms)
            out["softwatch"]["median_delay_sequences"][change.name] = _median(delays)
            if online:
                out["softwatch_online"]["detection_rate"][change.name] = rate([d is not None for d in online])
                out["softwatch_online"]["median_delay_sequences"][change.name] = _median(online)
            out["always_alarm"]["detection_rate"][change.name] = rate([True] * plan.change_trials)
        result["sizes"][str(n)] = out

    # probes: the model change seen through teacher-forced scoring of <= 64 probes
    probes = builtin_probes()
    baseline, replicate = score_twice(lm, probes)
    rescored = score(lm, probes, batch=5)  # no change: the same model in a third batch composition
    quantized = score(models[8], probes)
    probe_null, probe_hits = [], []
    for trial in range(plan.probe_trials):
        index = rng.permutation(len(probes))[: min(48, len(probes))]
        sub = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        probe_null.append(any(r.verdict == "drift" for r in paired_test(sub(baseline), sub(replicate), sub(rescored),
                                                                        seed=trial)))
        probe_hits.append(any(r.verdict == "drift" for r in paired_test(sub(baseline), sub(replicate), sub(quantized),
                                                                        seed=trial)))
    result["probes"] = {"prompts": min(48, len(probes)), "false_alarm_rate": rate(probe_null),
                        "detection_rate": {"weights_int8": rate(probe_hits)}}
    main = result["sizes"][str(max(plan.sizes))]
    result.update({
        "false_alarm_rate": main["softwatch"]["false_alarm_rate"]["rate"],
        "detection_rate": {k: v["rate"] for k, v in main["softwatch"]["detection_rate"].items()},
        "median_delay_sequences": main["softwatch"]["median_delay_sequences"],
        "evidently": {
            level: {"false_alarm_rate": main[key]["false_alarm_rate"]["rate"],
                    "detection_rate": {k: v["rate"] for k, v in main[key]["detection_rate"].items()}}
            for level, key in (("sequences", "evidently_sequences"), ("tokens", "evidently_tokens"))
        },
    })
    return result


def _announced_delay(a: Side, changed: dict, order: np.ndarray, step: int) -> int | None:
    """Sequences of the new regime until the regime comparison first says drift, checking
    every `step` sequences as they arrive (None: not within the pool drawn)."""
    for m in range(step, len(order) + 1, step):
        if softwatch_alarm(a, draw(changed, order[:m])):
            return m
    return None


def _median(values: list[int | None]) -> float | None:
    """Median delay, counting misses as infinitely late (None when most trials missed)."""
    ordered = sorted(math.inf if v is None else v for v in values)
    if not ordered:
        return None
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    return None if math.isinf(middle) else float(middle)
