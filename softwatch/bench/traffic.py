"""The traffic of `bench drift`: every trial's sequences generated on their own.

A trial is one or two regimes of chat traffic, each a `Segment`: `sequences` completions of
`sequences / repeats` held-out prompts (heldout.py), each prompt sampled `repeats` times, as
retries and popular questions repeat prompts. Nothing is shared between trials or between the
segments of a trial: prompts are consecutive disjoint runs of the held-out order, sampling
seeds come from (trial kind, trial index, segment) through numpy's SeedSequence (never
`hash()`, which changes per process), and each trial draws its own arrival order (repeats
scattered, or in bursts as one user's retries come) and engine batch size, so batch
compositions differ too.

A generated segment is a Parquet file of `sequences` rows (records.SEQUENCES, prompt_key set
by the engine as in production, timestamps one second apart in arrival order) under
`<data>/bench-drift/traffic-<model_rev>-<max_tokens>/`; a rerun generates only the segments
that are missing, so an interrupted generation resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .heldout import VERSION, heldout_prompts

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
RELABEL = "-relabelled"  # a no-op deploy: the same model under another revision label
SEED_DOMAIN = 16_2026  # the SeedSequence entropy of every trial (issue 16)


@dataclass(frozen=True)
class Condition:
    name: str
    temperature: float = 0.7
    top_p: float = 0.9
    template_version: str = "v1"
    quantize_bits: int | None = None


BASE = Condition("base")
# fixed before any setting was tuned on the benchmark (issue 16); a new change is a new entry
CHANGES = (
    Condition("temperature_0.7_to_0.8", temperature=0.8),
    Condition("top_p_0.9_to_0.7", top_p=0.7),
    Condition("weights_int8", quantize_bits=8),
    Condition("weights_4bit", quantize_bits=4),
    Condition("template_v1_to_v2", template_version="v2"),
)
CONDITIONS = {c.name: c for c in (BASE, *CHANGES)}
ORDERS = ("scattered", "bursts")
BATCHES = (64, 96, 128)


@dataclass(frozen=True)
class Segment:
    condition: str
    sequences: int
    repeats: int  # samples per prompt
    prompt_start: int  # position of its first prompt in the held-out order
    relabel: bool = False  # served under a new revision label (the null's no-op deploy)

    @property
    def prompts(self) -> int:
        return self.sequences // self.repeats


@dataclass(frozen=True)
class Trial:
    kind: str  # "null", or the change's name
    index: int  # within its kind
    segments: tuple[Segment, ...]
    order: str  # arrival order: "scattered" or "bursts"
    max_batch: int
    seed: int = field(repr=False, default=0)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:04d}"


@dataclass(frozen=True)
class Plan:
    null_trials: int
    change_trials: int  # per change
    baseline: int  # sequences of the regime before the deploy
    null_current: int  # sequences of the null's relabelled regime (window and online need 2 windows)
    change_current: int  # sequences of the changed regime
    repeats: tuple[int, ...]  # samples per prompt, cycled over trials
    max_tokens: int
    looks_every: int  # sequences of the current regime between monitor runs
    batches: tuple[int, ...] = BATCHES
    changes: tuple[str, ...] = tuple(c.name for c in CHANGES)

    @classmethod
    def full(cls) -> Plan:
        return cls(null_trials=150, change_trials=20, baseline=100, null_current=400, change_current=100,
                   repeats=(1, 5, 10), max_tokens=16, looks_every=100)

    @classmethod
    def quick(cls) -> Plan:
        return cls(null_trials=2, change_trials=1, baseline=16, null_current=32, change_current=16,
                   repeats=(1, 2), max_tokens=4, looks_every=16, batches=(16, 32),
                   changes=("temperature_0.7_to_0.8", "weights_int8"))


def schedule(plan: Plan) -> list[Trial]:
    """Every trial in generation order: three null trials then one change trial, round after round, so a partial run has some of each. Prompt runs are
    handed out in this order, so a trial's prompts do not depend on how far generation got."""
    trials, cursor, counts = [], 0, dict.fromkeys(CONDITIONS, 0)
    changes = list(plan.changes)
    rounds = max(-(-plan.null_trials // 3), plan.change_trials * len(changes))
    for r in range(rounds):
        kinds = ["null"] * 3 + [changes[r % len(changes)]]
        for kind in kinds:
            key = "base" if kind == "null" else kind
            limit = plan.null_trials if kind == "null" else plan.change_trials
            if counts[key] >= limit:
                continue
            t = counts[key]
            counts[key] += 1
            seeds = np.random.SeedSequence([SEED_DOMAIN, list(CONDITIONS).index(key), t])
            rng = np.random.default_rng(seeds)
            repeats = plan.repeats[t % len(plan.repeats)]
            current = plan.null_current if kind == "null" else plan.change_current
            segments = []
            for condition, n, relabel in (("base", plan.baseline, False),
                                          (kind if kind != "null" else "base", current, kind == "null")):
                segments.append(Segment(condition, n, repeats, cursor, relabel))
                cursor += n // repeats
            trials.append(Trial(kind, t, tuple(segments), ORDERS[(t // len(plan.repeats)) % 2],
                                int(rng.choice(plan.batches)), int(rng.integers(2**31))))
    return trials


def arrival(segment: Segment, order: str, rng: np.random.Generator) -> np.ndarray:
    """Each arriving sequence's prompt (0..prompts-1), in arrival order."""
    prompt_of = np.repeat(np.arange(segment.prompts), segment.repeats)
    if order == "scattered":
        return rng.permutation(prompt_of)
    bursts = rng.permutation(segment.prompts)  # a prompt's repeats arrive together
    return np.repeat(bursts, segment.repeats)


def directory(data: str, lm, max_tokens: int) -> str:
    return os.path.join(data, "bench-drift", f"traffic-{VERSION}-{lm.model_rev}-{max_tokens}")


def segment_path(folder: str, trial: Trial, s: int) -> str:
    return os.path.join(folder, f"{trial.name}-{s}.parquet")


def generate(models: Callable[[int | None], object], trials: list[Trial], folder: str, max_tokens: int,
             progress: Callable[[str], None] = print) -> int:
    """Generate every missing segment of `trials` into `folder`; returns the segments made.
    `models(bits)` is the model of a weight change (None: the base model)."""
    os.makedirs(folder, exist_ok=True)
    missing = [(t, s) for t in trials for s in range(len(t.segments)) if not os.path.exists(segment_path(folder, t, s))]
    started, made, sequences = time.perf_counter(), 0, 0
    for trial, s in missing:
        table = generate_segment(models, trial, s, max_tokens)
        path = segment_path(folder, trial, s)
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        made += 1
        sequences += table.num_rows
        elapsed = time.perf_counter() - started
        progress(f"{trial.name} segment {s}: {table.num_rows} sequences ({made}/{len(missing)} segments, "
                 f"{sequences / elapsed:.2f} sequences/s, {elapsed:.0f} s)")
    return made


def generate_segment(models: Callable[[int | None], object], trial: Trial, s: int, max_tokens: int) -> pa.Table:
    """The `sequences` rows of one segment, in arrival order."""
    from ..engine import DecodingParams, Engine
    from ..prompts import chat_messages
    from ..records import SEQUENCES, RecordContext, sequence_row

    segment = trial.segments[s]
    condition = CONDITIONS[segment.condition]
    lm = models(condition.quantize_bits)
    seeds = np.random.SeedSequence([SEED_DOMAIN, list(CONDITIONS).index(trial.kind if trial.kind != "null" else "base"),
                                    trial.index, s])
    rng = np.random.default_rng(seeds)
    prompts = heldout_prompts(segment.prompt_start, segment.prompts)
    arrivals = arrival(segment, trial.order, rng)
    sampling_seeds = rng.integers(0, 2**62, size=len(arrivals))
    engine = Engine(lm, max_batch=trial.max_batch)
    for i, (p, seed) in enumerate(zip(arrivals, sampling_seeds)):
        params = DecodingParams(temperature=condition.temperature, top_p=condition.top_p, max_tokens=max_tokens,
                                seed=int(seed), template_version=condition.template_version)
        engine.submit(chat_messages(prompts[p], condition.template_version), params, chat=True, request_id=str(i))
    finished = {}
    while engine.has_work():
        for c in engine.step():
            finished[int(c.request_id)] = c
    # the segment's place in time: trials are evaluated one at a time, so only the order matters
    t0 = START + timedelta(hours=s)
    rows = []
    for i in range(len(arrivals)):
        c = finished[i]
        row = sequence_row(c, RecordContext(deployment="bench"), tokens_kept=False)
        row.update(ts=t0 + timedelta(seconds=i + 1), created=t0 + timedelta(seconds=i),
                   request_id=f"{trial.name}-{s}-{i}")
        if segment.relabel:
            row["model_rev"] += RELABEL
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SEQUENCES)
