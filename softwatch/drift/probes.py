"""Probes: fixed prompts with fixed reference continuations, scored teacher-forced.

Each probe is one forward pass over prompt + continuation; the model's distribution at every
continuation position gives the token statistics (stats.py) of the reference tokens. There
is no sampling noise and no traffic mix: two regimes scored on the same probes differ only
because the model (weights, quantization, numerics) differs, so a paired test over the
probes finds a model change from a few dozen prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sampling import RowParams
from ..stats import COLUMN, softmax_stats
from .twosample import holm

PROBE_METRICS = ("logprob", "entropy", "top_prob")

_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Canada", "Ottawa"), ("Germany", "Berlin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"),
             ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Thailand", "Bangkok")]
_SENTENCES = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("To be or not to be,", " that is the question."),
    ("Water boils at 100 degrees", " Celsius at sea level."),
    ("The Earth orbits the", " Sun once every year."),
    ("def add(a, b):\n   ", " return a + b"),
    ("for i in range(10):\n   ", " print(i)"),
    ("SELECT name FROM users", " WHERE age > 30;"),
    ("import numpy as", " np"),
    ("Once upon a time, there", " was a little girl who lived in a village."),
    ("Thank you for your email.", " I will get back to you as soon as possible."),
    ("The mitochondria is the", " powerhouse of the cell."),
    ("In 1969, Neil Armstrong", " became the first person to walk on the Moon."),
    ("A triangle has three", " sides and three angles."),
    ("The opposite of hot is", " cold."),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday."),
    ("One, two, three, four,", " five, six, seven."),
]


@dataclass(frozen=True)
class Probe:
    probe_id: str
    prompt: str
    continuation: str


def builtin_probes() -> list[Probe]:
    """64 probes: facts, arithmetic, common phrases and code, each with its expected continuation."""
    probes = [Probe(f"capital-{c.lower()}", f"The capital of {c} is", f" {city}.") for c, city in _CAPITALS]
    probes += [Probe(f"sum-{a}-{b}", f"Question: What is {a} plus {b}?\nAnswer:", f" {a + b}")
               for a, b in [(2, 3), (7, 5), (10, 12), (9, 9), (14, 6), (21, 13), (8, 4), (30, 15),
                            (11, 11), (6, 7), (40, 2), (3, 19), (25, 25), (16, 8), (5, 50), (12, 13)]]
    probes += [Probe(f"text-{i}", p, c) for i, (p, c) in enumerate(_SENTENCES)]
    probes += [Probe(f"plural-{w}", f"The plural of {w} is", f" {p}.") for w, p in
               [("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("goose", "geese"),
                ("person", "people"), ("foot", "feet"), ("man", "men"), ("woman", "women"),
                ("cactus", "cacti"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"),
                ("box", "boxes"), ("city", "cities"), ("bus", "buses"), ("hero", "heroes")]]
    return probes


@torch.inference_mode()
def score(lm, probes: list[Probe], batch: int = 16) -> dict[str, np.ndarray]:
    """Per probe, the mean over its continuation tokens of each PROBE_METRICS field under the
    model distribution (T = 1), as arrays in probe order."""
    tok = lm.tokenizer
    pairs = [(tok(p.prompt)["input_ids"], tok(p.continuation, add_special_tokens=False)["input_ids"]) for p in probes]
    out = {name: np.empty(len(probes)) for name in PROBE_METRICS}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        length = max(len(p) + len(c) for p, c in chunk)
        # right padding: a causal model's real tokens never attend to the padded tail
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, (p, c) in enumerate(chunk):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
        for i, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=lm.device)
            x = logits[i, positions].float()
            rows = RowParams(temperature=(1.0,) * len(c), top_k=(0,) * len(c), top_p=(1.0,) * len(c),
                             seed=(0,) * len(c), device=str(lm.device))
            stats = softmax_stats(x, torch.tensor(c, device=lm.device), rows).mean(dim=0).cpu()
            for name in PROBE_METRICS:
                out[name][start + i] = float(stats[COLUMN[name]])
    return out


def score_twice(lm, probes: list[Probe]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores in two batch compositions: the second measures how far scores move by
    floating-point noise alone, which is what a paired test must beat."""
    return score(lm, probes, batch=16), score(lm, probes, batch=7)


@dataclass(frozen=True)
class PairedResult:
    metric: str
    statistic: float  # mean |current − baseline| over probes
    p_value: float  # sign-flip permutation, Holm-adjusted across metrics
    effect_size: float  # the same mean absolute difference, in the metric's units
    threshold: float  # the mean absolute difference a drift verdict needs
    n: int
    verdict: str


def paired_test(baseline: dict[str, np.ndarray], replicate: dict[str, np.ndarray], current: dict[str, np.ndarray],
                alpha: float = 0.01, min_abs: float = 1e-3, permutations: int = 9999,
                seed: int = 0) -> list[PairedResult]:
    """Per probe, |current − baseline| against |replicate − baseline| (the baseline rescored in
    another batch composition): under no change both are floating-point noise and
    exchangeable, so a sign-flip permutation test of their paired difference is exact. A
    change of any sign moves every probe's |difference| up. A drift verdict also needs the
    mean absolute difference to reach `min_abs` (nats for logprob and entropy)."""
    rng = np.random.default_rng(seed)
    rows = []
    for metric in PROBE_METRICS:
        base = np.asarray(baseline[metric])
        moved, noise = np.abs(np.asarray(current[metric]) - base), np.abs(np.asarray(replicate[metric]) - base)
        d = moved - noise
        signs = rng.choice([-1.0, 1.0], size=(permutations, len(d)))
        null = (signs * d).mean(axis=1)
        p = (1 + np.sum(null >= d.mean() - 1e-15)) / (1 + permutations)  # one-sided: change only adds
        rows.append((metric, float(moved.mean()), float(p), len(d)))
    adjusted = holm([r[2] for r in rows])
    return [PairedResult(m, s, p, s, min_abs, n, "drift" if p <= alpha and s >= min_abs else "no_drift")
            for (m, s, _, n), p in zip(rows, adjusted)]
