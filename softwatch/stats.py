"""The softmax statistics of a [batch, vocab] logits tensor (DESIGN.md, Definitions).

For each row, with q = softmax(x) and pi the sampling distribution (softmax(x / T) on the
sampling set {x >= keep_min}, renormalized; a point mass on the argmax when T = 0):

    entropy = H(q)            top_prob = max q         margin = q(1st) - q(2nd)
    sampling_entropy = H(pi)  logprob = log q(y)       sampling_logprob = log pi(y)
    rank = #{i: x_i > x_y}    logit_max = max finite x
    nonfinite = #{NaN, +-Inf} overflow = #{finite x: |x| > overflow_bound}

Everything comes from one reduction per distribution: with m = max x, the tail sum
s = sum_{i != argmax} exp(x_i - m) and t = sum_i (x_i - m) exp(x_i - m),

    log Z = m + log1p(s),   H = log1p(s) - t / (1 + s),   top_prob = 1 / (1 + s).

Keeping the argmax term (exactly 1) out of s keeps H, top_prob and logprob accurate to the
last bits even when the distribution is nearly a point mass. Non-finite logits count in
`nonfinite` and are otherwise left out (probability 0); a row whose logits are all
non-finite gets NaN statistics. Nothing here reads the device back to the host, except
`greedy_stats`, a CPU path for greedy decoding.
"""

from __future__ import annotations

import math

import torch

from .sampling import (
    EXP_FLOOR,
    NONFINITE_FILL,
    RowParams,
    inverse_temperature,
    keep_min_logit,
    sanitize,
)

FIELDS = (
    "entropy",
    "sampling_entropy",
    "top_prob",
    "margin",
    "logprob",
    "sampling_logprob",
    "rank",
    "logit_max",
    "nonfinite",
    "overflow",
)
COLUMN = {name: i for i, name in enumerate(FIELDS)}
OVERFLOW_BOUND = 88.72
"""|x| above which exp(x) overflows fp32."""
LN_2 = math.log(2.0)
LOG2_E = 1.0 / LN_2


def softmax_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rows: RowParams,
    keep_min: torch.Tensor | None = None,
    overflow_bound: float = OVERFLOW_BOUND,
    backend: str = "auto",
) -> torch.Tensor:
    """Every token field for every row: a float32 [B, len(FIELDS)] tensor, columns in FIELDS order.

    `tokens` [B] are the emitted tokens; `keep_min` [B] the sampling-set threshold from
    `sampling.keep_min_logit` (computed here when not given). Integer fields are exact in
    float32 up to 2**24. `backend` is "auto" (Triton on CUDA when available), "torch" or "triton".
    """
    if logits.dim() != 2 or tokens.shape != logits.shape[:1] or len(rows) != logits.shape[0]:
        raise ValueError(
            f"expected logits [B, V], tokens [B] and B row parameters; got {tuple(logits.shape)}, "
            f"{tuple(tokens.shape)} and {len(rows)}"
        )
    if keep_min is None:
        keep_min = keep_min_logit(sanitize(logits), rows)
    if backend == "auto":
        backend = "triton" if logits.is_cuda and triton_available() else "torch"
    if backend == "triton":
        from .stats_kernel import triton_softmax_stats

        return triton_softmax_stats(logits, tokens, rows.temperature_t, keep_min, overflow_bound, _pi_differs(rows))
    return torch_softmax_stats(logits, tokens, rows, keep_min, overflow_bound)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pi_differs(rows: RowParams) -> bool:
    """Host-side: does some row sample from a distribution other than q (or a point mass)?"""
    return rows.any_filtered or any(t not in (0.0, 1.0) for t in rows.temperature)


def _clean(raw: torch.Tensor, m: torch.Tensor, overflow_bound: float) -> bool:
    """CPU only: are all logits finite and within the overflow bound? `m` is the row maxima,
    NaN or +Inf wherever a row holds one (amax propagates NaN); -Inf shows in the minimum."""
    return bool(m.max() <= overflow_bound and raw.amin() >= -overflow_bound)


def _count_above(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many x exceed threshold [B, 1], as float32. The comparison is written as
    0/1 floats: a float sum is several times faster than a bool reduction on the CPU."""
    return torch.gt(x, threshold, out=torch.empty_like(x)).sum(dim=1)


def _tail(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From e = exp(x - max x): the sum without one argmax term, and the second-largest e.

    The argmax terms are exactly 1 and the only ones whose fractional part is 0 (every e is
    positive): frac(e) keeps every other term exactly. The number of ones is the difference
    of the two sums, an integer up to rounding far below 0.5 (the sums are below the vocabulary
    size, in fp32 with 24 bits).
    """
    rest = torch.frac(e)
    rest_sum = rest.sum(dim=1)
    extra_ties = torch.round(e.sum(dim=1) - rest_sum) - 1.0
    second = torch.where(extra_ties > 0, 1.0, rest.amax(dim=1))
    return rest_sum + extra_ties, second


def torch_softmax_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rows: RowParams,
    keep_min: torch.Tensor,
    overflow_bound: float = OVERFLOW_BOUND,
) -> torch.Tensor:
    """The PyTorch path: a dozen memory-bound passes over [B, V], fewer for a clean CPU batch."""
    raw = logits.float()
    m = raw.amax(dim=1, keepdim=True)
    clean = not raw.is_cuda and _clean(raw, m, overflow_bound)
    if clean:
        x = raw
        nonfinite = overflow = raw.new_zeros(raw.shape[0])
    else:
        x = sanitize(raw)
        m = x.amax(dim=1, keepdim=True)
        nonfinite = torch.nan_to_num_(raw - raw, nan=1.0).sum(dim=1)
        # |x| > bound also holds for the fill value of every non-finite entry.
        overflow = _count_above(x.abs(), x.new_full((1, 1), overflow_bound)) - nonfinite

    x_y = x.gather(1, tokens.long()[:, None])
    if clean and bool((x_y >= m).all()):  # every token is its row's argmax, as in greedy decoding
        rank = x.new_zeros(x.shape[0])
    else:
        rank = _count_above(x, x_y)
    d_y = torch.where(x_y > NONFINITE_FILL, x_y - m, float("-inf")).squeeze(1)  # a non-finite y: log 0
    shifted = x - m
    d2 = torch.mul(shifted, LOG2_E).clamp_(min=EXP_FLOOR * LOG2_E)  # exp(d) = exp2(d / ln 2), several times faster
    e = torch.exp2(d2)
    s, second = _tail(e)
    log1p_s = torch.log1p(s)
    entropy = log1p_s - d2.mul_(e).sum(dim=1) * (LN_2 / (1.0 + s))  # d2 is spent
    top_prob = 1.0 / (1.0 + s)
    margin = (1.0 - second) * top_prob
    logprob = d_y - log1p_s

    temperature = rows.temperature_t
    if _pi_differs(rows):
        # The sampling distribution: the same reduction on z = (x - m) / T over the sampling set.
        # z scales the unclamped differences: a floor applied before dividing by T > 1 would
        # lift far-off tokens above EXP_FLOOR.
        inv_t = inverse_temperature(temperature)
        z2 = shifted.mul_((inv_t * LOG2_E)[:, None])
        if rows.any_filtered:  # push tokens outside the set to the floor; arithmetic beats masked_fill
            z2.add_(torch.lt(x, keep_min[:, None], out=d2), alpha=-1e30)
        z2.clamp_(min=EXP_FLOOR * LOG2_E)
        ez = torch.exp2(z2)
        sz = _tail(ez)[0]
        log1p_sz = torch.log1p(sz)
        sampling_entropy = log1p_sz - z2.mul_(ez).sum(dim=1) * (LN_2 / (1.0 + sz))
        in_set = x_y.squeeze(1) >= keep_min
        sampling_logprob = torch.where(in_set, d_y * inv_t - log1p_sz, float("-inf"))
    else:  # every sampled row has pi = q
        sampling_entropy, sampling_logprob = entropy, logprob
    if any(t <= 0 for t in rows.temperature):
        greedy = temperature <= 0
        sampling_entropy = torch.where(greedy, 0.0, sampling_entropy)
        sampling_logprob = torch.where(greedy, torch.where(d_y == 0, 0.0, float("-inf")), sampling_logprob)

    out = torch.stack(
        [entropy, sampling_entropy, top_prob, margin, logprob, sampling_logprob, rank,
         m.squeeze(1), nonfinite, overflow],
        dim=1,
    )
    if clean:
        return out
    dead = m <= NONFINITE_FILL  # every logit non-finite: no distribution to describe
    described = torch.arange(len(FIELDS), device=out.device) < COLUMN["nonfinite"]  # the counts come last
    return torch.where(dead & described, float("nan"), out)


def greedy_stats(logits: torch.Tensor, overflow_bound: float = OVERFLOW_BOUND) -> torch.Tensor | None:
    """CPU: every field for rows that each emit one of their argmax tokens at temperature 0
    (greedy decoding of these very logits: no field depends on which), as softmax_stats gives
    them; None when some logit is non-finite or beyond the overflow bound, where an argmax may
    be a NaN or an infinity and the emitted tokens are needed.

    The same reduction as the torch path in as few passes as it takes, with exp2 on log2-scaled
    differences (several times faster than exp on the CPU), the per-row results finished in
    Python floats: in a decode step the forward pass has just evicted the caches, and every
    further kind of operation costs its cache misses.
    """
    x = logits.float()
    bound = float(torch.tensor(overflow_bound, dtype=torch.float32))  # compared in fp32, as softmax_stats does
    m = x.amax(dim=1, keepdim=True)
    d2 = torch.sub(x, m).mul_(LOG2_E)  # (x - m) / ln 2
    e = torch.exp2(d2)
    total = e.sum(dim=1)
    rest = e.frac_()  # every term but the ones (see _tail)
    per_row = torch.stack([m.squeeze(1), x.amin(dim=1), total, rest.sum(dim=1), rest.amax(dim=1),
                           d2.mul_(rest).sum(dim=1)], dim=1).tolist()
    out = []
    for maximum, minimum, total, rest_sum, second, t2 in per_row:
        if not (maximum <= bound and minimum >= -bound):  # NaN fails too
            return None
        extra_ties = round(total - rest_sum) - 1
        s = rest_sum + extra_ties
        log1p_s = math.log1p(s)
        top_prob = 1.0 / (1.0 + s)
        fields = dict.fromkeys(FIELDS, 0.0)  # greedy: pi is a point mass on the token, rank 0, no bad logits
        fields.update(entropy=log1p_s - t2 * LN_2 * top_prob, top_prob=top_prob, logprob=-log1p_s,
                      margin=0.0 if extra_ties > 0 else (1.0 - second) * top_prob, logit_max=maximum)
        out.append(list(fields.values()))
    return torch.tensor(out, dtype=torch.float32).reshape(len(out), len(FIELDS))
