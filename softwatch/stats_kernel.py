"""The statistics pass as a Triton kernel: each logit is read from device memory once.

Every lane of a program keeps online accumulators over the logits it sees: its max m, the
tail sum s = sum exp(x - m) without its max term, t = sum (x - m) exp(x - m), its second
largest value, and the counts; the same (m, s, t) over the sampling set, with exponents
scaled by 1 / T. When a larger value arrives the old max joins the tail:
s' = (s + 1) e^(m - m'), t' = e^(m - m') (t + (m - m')(s + 1)). Lanes, then the programs
that split a row's vocabulary, merge with the same rule. See stats.py for the definitions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PARTS = 11  # m, s, t, second, mz, sz, tz, rank, nonfinite, overflow, x_y
_PARTS_C: tl.constexpr = tl.constexpr(_PARTS)


@triton.jit
def _log1p(s):
    """log(1 + s) to ~1 ulp for small s (Goldberg), where log(1.0 + s) loses all of s's digits."""
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * s / (u - 1.0))


@triton.jit
def _merge(m_a, s_a, t_a, m_b, s_b, t_b, scale):
    """Merge accumulator b into a; both describe disjoint sets; exponents scaled by `scale`."""
    up = m_b > m_a
    hi = tl.where(up, m_b, m_a)
    lo = tl.where(up, m_a, m_b)
    s_lo = tl.where(up, s_a, s_b)
    t_lo = tl.where(up, t_a, t_b)
    s_hi = tl.where(up, s_b, s_a)
    t_hi = tl.where(up, t_b, t_a)
    empty = lo == float("-inf")
    delta = tl.where(empty, 0.0, (lo - hi) * scale)
    a = tl.where(empty, 0.0, tl.exp(delta))
    s = s_hi + (s_lo + 1.0) * a
    t = t_hi + a * (t_lo + delta * (s_lo + 1.0))
    return hi, s, t


@triton.jit
def _partial_kernel(
    logits_ptr, stride_row, tokens_ptr, inv_t_ptr, keep_min_ptr, part_ptr,
    vocab, chunk, bound,
    BLOCK: tl.constexpr, SAMPLING: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = tl.load(inv_t_ptr + row)
    keep_min = tl.load(keep_min_ptr + row)
    x_y = tl.load(base + tl.load(tokens_ptr + row)).to(tl.float32)
    x_y = tl.where((x_y == x_y) & (tl.abs(x_y) < float("inf")), x_y, float("-inf"))

    ninf = tl.full([BLOCK], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK], tl.float32)
    m, s, t, second = ninf, zero, zero, ninf
    mz, sz, tz = ninf, zero, zero
    rank = tl.zeros([BLOCK], tl.int32)
    nonfinite = tl.zeros([BLOCK], tl.int32)
    overflow = tl.zeros([BLOCK], tl.int32)

    start = split * chunk
    stop = tl.minimum(start + chunk, vocab)
    for off in range(start, stop, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inb = idx < stop
        x = tl.load(base + idx, mask=inb, other=0.0).to(tl.float32)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        nonfinite += (inb & ~finite).to(tl.int32)
        overflow += (inb & finite & (tl.abs(x) > bound)).to(tl.int32)
        valid = inb & finite
        xv = tl.where(valid, x, float("-inf"))
        rank += (xv > x_y).to(tl.int32)
        second = tl.where(xv > m, m, tl.maximum(second, xv))
        one = tl.zeros([BLOCK], tl.float32)  # a single element: m = x, s = 0, t = 0
        m, s, t = _merge(m, s, t, xv, one, one, 1.0)
        if SAMPLING:  # else pi = q for every row, and the q accumulators are copied
            xz = tl.where(xv >= keep_min, xv, float("-inf"))
            mz, sz, tz = _merge(mz, sz, tz, xz, one, one, inv_t)
        else:
            mz, sz, tz = m, s, t

    # lanes -> one accumulator for this program
    top = tl.max(m, axis=0)
    lane = tl.argmax(m, axis=0)
    lanes = tl.arange(0, BLOCK)
    is_top = lanes == lane
    far = tl.where(is_top | (m == float("-inf")), 0.0, m - top)
    a = tl.where(is_top, 1.0, tl.where(m == float("-inf"), 0.0, tl.exp(far)))
    s_all = tl.sum(tl.where(is_top, s, (s + 1.0) * a), axis=0)
    t_all = tl.sum(tl.where(is_top, t, a * (t + far * (s + 1.0))), axis=0)
    second_all = tl.maximum(tl.max(tl.where(is_top, float("-inf"), m), axis=0),
                            tl.max(tl.where(is_top, second, float("-inf")), axis=0))
    topz = tl.max(mz, axis=0)
    lanez = tl.argmax(mz, axis=0)
    is_topz = lanes == lanez
    farz = tl.where(is_topz | (mz == float("-inf")), 0.0, (mz - topz) * inv_t)
    az = tl.where(is_topz, 1.0, tl.where(mz == float("-inf"), 0.0, tl.exp(farz)))
    sz_all = tl.sum(tl.where(is_topz, sz, (sz + 1.0) * az), axis=0)
    tz_all = tl.sum(tl.where(is_topz, tz, az * (tz + farz * (sz + 1.0))), axis=0)

    out = part_ptr + (row * nsplit + split) * _PARTS_C
    tl.store(out + 0, top)
    tl.store(out + 1, s_all)
    tl.store(out + 2, t_all)
    tl.store(out + 3, second_all)
    tl.store(out + 4, topz)
    tl.store(out + 5, sz_all)
    tl.store(out + 6, tz_all)
    tl.store(out + 7, tl.sum(rank, axis=0).to(tl.float32))
    tl.store(out + 8, tl.sum(nonfinite, axis=0).to(tl.float32))
    tl.store(out + 9, tl.sum(overflow, axis=0).to(tl.float32))
    tl.store(out + 10, x_y)


@triton.jit
def _combine_kernel(part_ptr, inv_t_ptr, keep_min_ptr, out_ptr, nsplit, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, SPLITS)
    ok = i < nsplit
    p = part_ptr + (row * nsplit + i) * _PARTS_C
    ninf = float("-inf")
    m = tl.load(p + 0, mask=ok, other=ninf)
    s = tl.load(p + 1, mask=ok, other=0.0)
    t = tl.load(p + 2, mask=ok, other=0.0)
    second = tl.load(p + 3, mask=ok, other=ninf)
    mz = tl.load(p + 4, mask=ok, other=ninf)
    sz = tl.load(p + 5, mask=ok, other=0.0)
    tz = tl.load(p + 6, mask=ok, other=0.0)
    rank = tl.sum(tl.load(p + 7, mask=ok, other=0.0), axis=0)
    nonfinite = tl.sum(tl.load(p + 8, mask=ok, other=0.0), axis=0)
    overflow = tl.sum(tl.load(p + 9, mask=ok, other=0.0), axis=0)
    x_y = tl.load(part_ptr + row * nsplit * _PARTS_C + 10)
    inv_t = tl.load(inv_t_ptr + row)
    keep_min = tl.load(keep_min_ptr + row)

    top = tl.max(m, axis=0)
    k = tl.argmax(m, axis=0)
    is_top = i == k
    far = tl.where(is_top | (m == ninf), 0.0, m - top)
    a = tl.where(is_top, 1.0, tl.where(m == ninf, 0.0, tl.exp(far)))
    s1 = tl.sum(tl.where(is_top, s, (s + 1.0) * a), axis=0)
    t1 = tl.sum(tl.where(is_top, t, a * (t + far * (s + 1.0))), axis=0)
    second1 = tl.maximum(tl.max(tl.where(is_top, ninf, m), axis=0), tl.max(tl.where(is_top, second, ninf), axis=0))
    topz = tl.max(mz, axis=0)
    kz = tl.argmax(mz, axis=0)
    is_topz = i == kz
    farz = tl.where(is_topz | (mz == ninf), 0.0, (mz - topz) * inv_t)
    az = tl.where(is_topz, 1.0, tl.where(mz == ninf, 0.0, tl.exp(farz)))
    sz1 = tl.sum(tl.where(is_topz, sz, (sz + 1.0) * az), axis=0)
    tz1 = tl.sum(tl.where(is_topz, tz, az * (tz + farz * (sz + 1.0))), axis=0)

    log1p_s = _log1p(s1)
    log1p_sz = _log1p(sz1)
    entropy = log1p_s - t1 / (1.0 + s1)
    top_prob = 1.0 / (1.0 + s1)
    margin = (1.0 - tl.exp(second1 - top)) * top_prob
    logprob = (x_y - top) - log1p_s
    sampling_entropy = log1p_sz - tz1 / (1.0 + sz1)
    sampling_logprob = tl.where(x_y >= keep_min, (x_y - top) * inv_t - log1p_sz, ninf)
    dead = top == ninf
    nan = float("nan")
    o = out_ptr + row * 10
    tl.store(o + 0, tl.where(dead, nan, entropy))
    tl.store(o + 1, tl.where(dead, nan, sampling_entropy))
    tl.store(o + 2, tl.where(dead, nan, top_prob))
    tl.store(o + 3, tl.where(dead, nan, margin))
    tl.store(o + 4, tl.where(dead, nan, logprob))
    tl.store(o + 5, tl.where(dead, nan, sampling_logprob))
    tl.store(o + 6, tl.where(dead, nan, rank))
    tl.store(o + 7, tl.where(dead, nan, top))
    tl.store(o + 8, nonfinite)
    tl.store(o + 9, overflow)


def triton_softmax_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: torch.Tensor,
    keep_min: torch.Tensor,
    overflow_bound: float,
    sampling: bool = True,
    block: int = 1024,
) -> torch.Tensor:
    """[B, 10] statistics of CUDA logits (any float dtype, read as is and computed in fp32).

    `sampling=False` promises that pi = q for every row (T in {0, 1}, nothing filtered).
    """
    from .sampling import inverse_temperature

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
    splits = max(1, min(triton.cdiv(vocab, block), triton.cdiv(4 * sms, batch), 64))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, chunk)
    inv_t = inverse_temperature(temperature.float())
    keep_min = keep_min.float().contiguous()
    parts = torch.empty(batch, splits, _PARTS, device=logits.device, dtype=torch.float32)
    out = torch.empty(batch, 10, device=logits.device, dtype=torch.float32)
    _partial_kernel[(batch, splits)](
        logits, logits.stride(0), tokens, inv_t, keep_min, parts, vocab, chunk, overflow_bound,
        BLOCK=block, SAMPLING=sampling, num_warps=4,
    )
    _combine_kernel[(batch,)](parts, inv_t, keep_min, out, splits, SPLITS=triton.next_power_of_2(splits))
    greedy = temperature <= 0
    out[:, 1] = torch.where(greedy, 0.0, out[:, 1])
    out[:, 5] = torch.where(greedy, torch.where(out[:, 6] == 0, 0.0, float("-inf")), out[:, 5])
    return out
