"""Temperature / top-k / top-p / greedy sampling with per-row parameters and no host sync.

Tokens are drawn by the exponential race: with E_i ~ Exp(1), argmax_i pi_i / E_i is a draw
from pi, and log(pi_i / E_i) = z_i + Gumbel_i up to a per-row constant, so one argmax over
the vocabulary samples. The uniforms come from a counter-based hash of (seed, step, token),
so a request's tokens depend only on its own seed and logits: not on which other requests
share its batch, nor on the device.

The sampling set of a row is {x >= keep_min}: the top-k tokens intersected with the nucleus
(smallest prefix of tokens by probability whose mass reaches top_p) of softmax(x / T).
Ties at the boundary are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

NONFINITE_FILL = -3.0e38
"""Stands in for NaN / +-Inf logits: finite, so (x - m) * exp(x - m) is 0, never NaN."""

# On the CPU a full-vocabulary sort costs ~20% of a decode step of the default model, so the
# nucleus is searched among this many top candidates first, falling back to a sort only for
# rows whose nucleus is larger. On CUDA the sort is cheap and data-dependent branches would
# sync, so it always sorts.
CPU_NUCLEUS_CANDIDATES = 256
EXP_FLOOR = -87.0
"""Exponents are floored here: below it exp() leaves fp32's normal range, where CPU kernels
take a scalar path ~10x slower; a floored term adds at most 1.6e-38."""


@dataclass(frozen=True)
class RowParams:
    """Per-row decoding parameters of a batch.

    The host tuples are the truth; the tensors (on `device`) are derived once per batch
    composition, and the flags let a step skip work without reading the device.
    """

    temperature: tuple[float, ...]  # 0 = greedy
    top_k: tuple[int, ...]  # 0 = off
    top_p: tuple[float, ...]  # 1 = off
    seed: tuple[int, ...]
    device: str = "cpu"
    min_p: tuple[float, ...] = ()  # 0 = off; set by engines that filter by min_p (vLLM)

    @cached_property
    def temperature_t(self) -> torch.Tensor:
        return torch.tensor(self.temperature, dtype=torch.float32, device=self.device)

    @cached_property
    def top_k_t(self) -> torch.Tensor:
        return torch.tensor(self.top_k, dtype=torch.int64, device=self.device)

    @cached_property
    def top_p_t(self) -> torch.Tensor:
        return torch.tensor(self.top_p, dtype=torch.float32, device=self.device)

    @cached_property
    def seed_t(self) -> torch.Tensor:
        return torch.tensor(self.seed, dtype=torch.int64, device=self.device)

    @cached_property
    def filtered(self) -> tuple[bool, ...]:
        min_p = self.min_p or (0.0,) * len(self.temperature)
        return tuple(t > 0 and (k > 0 or p < 1.0 or mp > 0) for t, k, p, mp in zip(self.temperature, self.top_k, self.top_p, min_p))

    @property
    def any_sampled(self) -> bool:
        return any(t > 0 for t in self.temperature)

    @property
    def any_filtered(self) -> bool:
        return any(self.filtered)

    @property
    def max_top_k(self) -> int:
        """Largest top_k among filtered rows; 0 if some filtered row has top_k off."""
        ks = [k for f, k in zip(self.filtered, self.top_k) if f]
        return 0 if any(k <= 0 for k in ks) else max(ks, default=0)

    def __len__(self) -> int:
        return len(self.temperature)

    @classmethod
    def concat(cls, parts: list[RowParams]) -> RowParams:
        return cls(
            temperature=sum((p.temperature for p in parts), ()),
            top_k=sum((p.top_k for p in parts), ()),
            top_p=sum((p.top_p for p in parts), ()),
            seed=sum((p.seed for p in parts), ()),
            device=parts[0].device,
            min_p=sum((p.min_p or (0.0,) * len(p) for p in parts), ()) if any(p.min_p for p in parts) else (),
        )

    def select(self, index: list[int]) -> RowParams:
        return RowParams(
            temperature=tuple(self.temperature[i] for i in index),
            top_k=tuple(self.top_k[i] for i in index),
            top_p=tuple(self.top_p[i] for i in index),
            seed=tuple(self.seed[i] for i in index),
            device=self.device,
            min_p=tuple(self.min_p[i] for i in index) if self.min_p else (),
        )


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """fp32 copy of the logits with every non-finite value replaced by NONFINITE_FILL."""
    return torch.nan_to_num(
        logits.float(), nan=NONFINITE_FILL, posinf=NONFINITE_FILL, neginf=NONFINITE_FILL
    )


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """1 / T, with greedy rows (T = 0) given 1 so that their arithmetic stays finite."""
    return torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-30), 1.0)


def keep_min_logit(x: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Per-row smallest raw logit of the sampling set; -inf where nothing is filtered.

    `x` is sanitized fp32 logits [B, V]. Sorting x orders z = x / T the same way, so the set
    is found in raw-logit space and compared there exactly.
    """
    batch, vocab = x.shape
    no_filter = torch.full((batch,), float("-inf"), device=x.device)
    if not rows.any_filtered:
        return no_filter
    if x.is_cuda:
        candidates = vocab
    else:
        wanted = rows.max_top_k if rows.max_top_k > 0 else CPU_NUCLEUS_CANDIDATES
        candidates = min(vocab, max(wanted, 1))
    keep_min, covered = _keep_min_among(x, rows, candidates)
    if candidates < vocab and not x.is_cuda:
        # CPU only: reading `covered` costs nothing here, and the rare wide nucleus is redone exactly.
        missing = (~covered).nonzero().flatten()
        if missing.numel():
            sub = x.index_select(0, missing)
            sub_rows = rows.select(missing.tolist())
            keep_min[missing] = _keep_min_among(sub, sub_rows, vocab)[0]
    active = (rows.temperature_t > 0) & ((rows.top_k_t > 0) | (rows.top_p_t < 1.0))
    return torch.where(active, keep_min, no_filter)


def _keep_min_among(
    x: torch.Tensor, rows: RowParams, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling-set threshold from the top `candidates` logits, and whether that was enough."""
    vocab = x.shape[1]
    inv_t = inverse_temperature(rows.temperature_t)[:, None]
    top = torch.topk(x, candidates, dim=1, sorted=True).values
    m = top[:, :1]
    # Probabilities under the full distribution softmax(x / T): the normalizer covers every token.
    log_norm = torch.log(torch.exp(((x - m) * inv_t).clamp_(min=EXP_FLOOR)).sum(dim=1, keepdim=True))
    probs = torch.exp(((top - m) * inv_t - log_norm).clamp_(min=EXP_FLOOR))
    mass_before = torch.cumsum(probs, dim=1) - probs
    k = torch.where((rows.top_k_t > 0) & (rows.top_k_t < vocab), rows.top_k_t, vocab)[:, None]
    position = torch.arange(candidates, device=x.device)[None, :]
    kept = ((mass_before < rows.top_p_t[:, None]) | (rows.top_p_t[:, None] >= 1.0)) & (position < k)
    n_keep = kept.sum(dim=1, keepdim=True).clamp(min=1)
    keep_min = top.gather(1, n_keep - 1).squeeze(1)
    covered = (n_keep.squeeze(1) < candidates) | (k.squeeze(1) <= candidates) | (candidates == vocab)
    return keep_min, covered


_GOLDEN = -1640531527  # 0x9E3779B9 as int32
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as int32


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on int32 tensors (multiplication wraps)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _M2
    return h ^ ((h >> 16) & 0xFFFF)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of an int64 tensor, as int32 with two's-complement wrap."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


NOISE_BITS = 23
"""Bits per uniform: (2k + 1) / 2^24 for k < 2^23 is exact in fp32 (24-bit significand), so the
largest uniform is 1 - 2^-24, never 1.0, and every Gumbel value is finite. With 24 bits,
k / 2^24 + 2^-25 rounds to 1.0 for the top k: -log(-log 1) = +inf won the race outright."""


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms strictly inside (0, 1) in fp32, of shape [B, vocab], a pure function of
    (seed, step, token index): the odd multiples of 2^-24, from 2^-24 to 1 - 2^-24."""
    lo, hi = _to_int32(seed), _to_int32(seed >> 32)
    key = _lowbias32(_lowbias32(lo ^ _lowbias32(hi)) ^ _to_int32(step))
    index = torch.arange(vocab, dtype=torch.int32, device=seed.device)
    h = _lowbias32(key[:, None] + index[None, :] * _GOLDEN)
    k = (h >> (32 - NOISE_BITS)) & ((1 << NOISE_BITS) - 1)
    return (2 * k + 1).float() * (1.0 / (1 << (NOISE_BITS + 1)))


def sample(
    x: torch.Tensor,
    rows: RowParams,
    step: torch.Tensor,
    keep_min: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row from sanitized fp32 logits `x` [B, V]; greedy rows take the argmax.

    `step` [B] is each row's count of tokens generated so far: with the seed it keys the noise.
    `x` must come from `sanitize`: the Gumbel noise is finite, so with no NaN in `x` the race
    has none either (x / T may reach -inf at small T; -inf plus finite noise never wins).
    """
    if not rows.any_sampled:
        return x.argmax(dim=1)
    if keep_min is None:
        keep_min = keep_min_logit(x, rows)
    gumbel = -torch.log(-torch.log(uniform_noise(rows.seed_t, step, x.shape[1])))
    race = (x * inverse_temperature(rows.temperature_t)[:, None]).add_(gumbel)
    if rows.any_filtered:
        race.masked_fill_(x < keep_min[:, None], float("-inf"))
    drawn = race.argmax(dim=1)
    if all(t > 0 for t in rows.temperature):
        return drawn
    return torch.where(rows.temperature_t > 0, drawn, x.argmax(dim=1))
