"""The statistics pass as a Triton kernel: each logit is read from device memory once.

A program walks its share of a row BLOCK logits at a time, keeping one running maximum m
and, per lane and relative to m: the tail sum s of e^(x - m) over x < m, the count c of
x = m, and t = sum (x - m) e^(x - m); the same over the sampling set with exponents scaled
by 1 / T; the lane's two largest logits; and the counts. A block that raises m to m' moves
the ties into the tail and rescales once, s' = (s + c) e^(m - m'),
t' = e^(m - m') (t + (m - m')(s + c)): one exp per logit and distribution, no per-element
merge. The programs that split a row then merge pairwise in the combine kernel, with one max
term kept out of the tail sum throughout (see stats.py for the definitions).
"""

from __future__ import annotations

import functools

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
def _inverse_temperature(temperature):
    """1 / T, and 1 for greedy rows (T = 0) so that their arithmetic stays finite."""
    return tl.where(temperature > 0, 1.0 / tl.maximum(temperature, 1e-30), 1.0)


@triton.jit
def _rescale(s, c, t, shift):
    """Accumulators (tail sum s, max-tie count c, t) moved to a maximum `shift` (< 0) higher:
    the ties join the tail. A factor that underflows to 0 empties them (no 0 * inf)."""
    scale = tl.exp(shift)
    old = s + c.to(tl.float32)
    t = tl.where(scale > 0, scale * (t + shift * old), 0.0)
    return scale * old, c * 0, t


@triton.jit
def _partial_kernel(
    logits_ptr, stride_row, tokens_ptr, temperature_ptr, keep_min_ptr, part_ptr,
    vocab, chunk, bound,
    BLOCK: tl.constexpr, SAMPLING: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = _inverse_temperature(tl.load(temperature_ptr + row))
    keep_min = tl.load(keep_min_ptr + row)
    x_y = tl.load(base + tl.load(tokens_ptr + row)).to(tl.float32)
    x_y = tl.where(tl.abs(x_y) < float("inf"), x_y, float("-inf"))  # NaN compares false

    ninf = tl.full([BLOCK], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK], tl.float32)
    zeros_i = tl.zeros([BLOCK], tl.int32)
    m = tl.max(ninf, axis=0)  # the running maximum of this program's logits: one per program
    s, c, t = zero, zeros_i, zero  # per lane, relative to m: sum of e over x < m, count of x = m, t
    sz, cz, tz = zero, zeros_i, zero  # the same over the sampling set, exponents scaled by 1 / T
    max1, max2 = ninf, ninf  # each lane's two largest logits
    rank, nonfinite, overflow = zeros_i, zeros_i, zeros_i

    start = split * chunk
    stop = tl.minimum(start + chunk, vocab)
    for off in range(start, stop, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inb = idx < stop
        x = tl.load(base + idx, mask=inb, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")
        nonfinite += (~finite).to(tl.int32)
        overflow += (finite & (tl.abs(x) > bound)).to(tl.int32)
        valid = inb & finite
        xv = tl.where(valid, x, float("-inf"))
        rank += (xv > x_y).to(tl.int32)
        max2 = tl.maximum(max2, tl.minimum(max1, xv))
        max1 = tl.maximum(max1, xv)

        m_new = tl.maximum(m, tl.max(xv, axis=0))
        if (m_new > m) & (m > float("-inf")):  # a new maximum; an empty start has nothing to move
            s, c, t = _rescale(s, c, t, m - m_new)
            if SAMPLING:
                sz, cz, tz = _rescale(sz, cz, tz, (m - m_new) * inv_t)
        m = m_new

        top = valid & (xv == m)
        d = tl.where(valid, xv - m, 0.0)
        e = tl.where(valid & ~top, tl.exp(d), 0.0)
        c += top.to(tl.int32)
        s += e
        t += tl.where(e > 0, d * e, 0.0)
        if SAMPLING:  # else pi = q for every row, and the q accumulators are copied
            in_set = valid & (xv >= keep_min)
            z = d * inv_t
            ez = tl.where(in_set & ~top, tl.exp(z), 0.0)
            cz += (in_set & top).to(tl.int32)
            sz += ez
            tz += tl.where(ez > 0, z * ez, 0.0)

    # lanes -> one accumulator for this program; one max term stays out of the tail sum
    c_all = tl.sum(c, axis=0)
    s_all = tl.where(c_all > 0, tl.sum(s, axis=0) + (c_all - 1).to(tl.float32), 0.0)
    t_all = tl.sum(t, axis=0)
    second_all = tl.where(c_all > 1, m, tl.max(tl.where(max1 == m, max2, max1), axis=0))
    if SAMPLING:
        # The set is {x >= keep_min}: when this program saw any of it, its maximum is m.
        cz_all = tl.sum(cz, axis=0)
        mz = tl.where(cz_all > 0, m, float("-inf"))
        sz_all = tl.where(cz_all > 0, tl.sum(sz, axis=0) + (cz_all - 1).to(tl.float32), 0.0)
        tz_all = tl.sum(tz, axis=0)
    else:
        mz, sz_all, tz_all = m, s_all, t_all

    out = part_ptr + (row * nsplit + split) * _PARTS_C
    tl.store(out + 0, m)
    tl.store(out + 1, s_all)
    tl.store(out + 2, t_all)
    tl.store(out + 3, second_all)
    tl.store(out + 4, mz)
    tl.store(out + 5, sz_all)
    tl.store(out + 6, tz_all)
    tl.store(out + 7, tl.sum(rank, axis=0).to(tl.float32))
    tl.store(out + 8, tl.sum(nonfinite, axis=0).to(tl.float32))
    tl.store(out + 9, tl.sum(overflow, axis=0).to(tl.float32))
    tl.store(out + 10, x_y)


@triton.jit
def _merge_programs(m, s, t, i, scale):
    """One accumulator from the programs' (m, s, t), exponents scaled by `scale`: the program
    holding the maximum keeps its own tail; every other one joins it with its max term."""
    top = tl.max(m, axis=0)
    is_top = i == tl.argmax(m, axis=0)
    far = tl.where(is_top | (m == float("-inf")), 0.0, (m - top) * scale)
    a = tl.where(is_top, 1.0, tl.where(m == float("-inf"), 0.0, tl.exp(far)))
    s_all = tl.sum(tl.where(is_top, s, (s + 1.0) * a), axis=0)
    t_all = tl.sum(tl.where(is_top, t, a * (t + far * (s + 1.0))), axis=0)
    return top, s_all, t_all, is_top


@triton.jit
def _combine_kernel(part_ptr, temperature_ptr, keep_min_ptr, out_ptr, nsplit, SPLITS: tl.constexpr):
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
    temperature = tl.load(temperature_ptr + row)
    inv_t = _inverse_temperature(temperature)
    keep_min = tl.load(keep_min_ptr + row)

    top, s1, t1, is_top = _merge_programs(m, s, t, i, 1.0)
    second1 = tl.maximum(tl.max(tl.where(is_top, ninf, m), axis=0), tl.max(tl.where(is_top, second, ninf), axis=0))
    topz, sz1, tz1, _ = _merge_programs(mz, sz, tz, i, inv_t)

    log1p_s = _log1p(s1)
    log1p_sz = _log1p(sz1)
    entropy = log1p_s - t1 / (1.0 + s1)
    top_prob = 1.0 / (1.0 + s1)
    margin = (1.0 - tl.exp(second1 - top)) * top_prob
    logprob = (x_y - top) - log1p_s
    sampling_entropy = log1p_sz - tz1 / (1.0 + sz1)
    sampling_logprob = tl.where(x_y >= keep_min, (x_y - top) * inv_t - log1p_sz, ninf)
    greedy = temperature <= 0  # a point mass on the argmax
    sampling_entropy = tl.where(greedy, 0.0, sampling_entropy)
    sampling_logprob = tl.where(greedy, tl.where(rank == 0, 0.0, ninf), sampling_logprob)
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


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_softmax_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: torch.Tensor,
    keep_min: torch.Tensor,
    overflow_bound: float,
    sampling: bool = True,
    block: int = 1024,
) -> torch.Tensor:
    """[B, 10] statistics of CUDA logits (any float dtype, read as is and computed in fp32):
    two kernel launches and nothing else, so that a step's launch overhead stays small.

    `sampling=False` promises that pi = q for every row (T in {0, 1}, nothing filtered).
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    sms = _multiprocessors(logits.device) if logits.is_cuda else 8  # 8: under the interpreter
    splits = max(1, min(triton.cdiv(vocab, block), triton.cdiv(4 * sms, batch), 64))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, chunk)
    temperature = temperature.float().contiguous()
    keep_min = keep_min.float().contiguous()
    parts = torch.empty(batch, splits, _PARTS, device=logits.device, dtype=torch.float32)
    out = torch.empty(batch, 10, device=logits.device, dtype=torch.float32)
    _partial_kernel[(batch, splits)](
        logits, logits.stride(0), tokens, temperature, keep_min, parts, vocab, chunk, overflow_bound,
        BLOCK=block, SAMPLING=sampling, num_warps=8,  # 4 logits a thread: 77 registers on sm_90, no spills
    )
    _combine_kernel[(batch,)](parts, temperature, keep_min, out, splits, SPLITS=triton.next_power_of_2(splits))
    return out
