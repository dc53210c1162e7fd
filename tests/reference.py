"""A float64 reference of every token field, written straight from DESIGN.md's definitions."""

import torch

from softwatch.stats import FIELDS, OVERFLOW_BOUND


def reference_stats(logits, tokens, temperature, top_k, top_p, bound=OVERFLOW_BOUND):
    out = []
    for row, y, t, k, p in zip(logits.double(), tokens.tolist(), temperature, top_k, top_p):
        out.append(_row(row, y, t, k, p, bound))
    return torch.tensor(out, dtype=torch.float64)


def _row(x, y, t, k, p, bound):
    finite = torch.isfinite(x)
    nonfinite = float((~finite).sum())
    overflow = float((finite & (x.abs() > bound)).sum())
    if not finite.any():
        return [float("nan")] * (len(FIELDS) - 2) + [nonfinite, overflow]
    xs = torch.where(finite, x, torch.tensor(float("-inf"), dtype=x.dtype))
    log_q = torch.log_softmax(xs, 0)
    q = log_q.exp()
    entropy = float(-(q * torch.where(q > 0, log_q, 0.0)).sum())
    top = torch.sort(q, descending=True).values
    rank = float((xs > xs[y]).sum())
    if t == 0:
        sampling_entropy, sampling_logprob = 0.0, (0.0 if xs[y] == xs.max() else float("-inf"))
    else:
        order = torch.sort(xs, descending=True).values
        probs = torch.softmax(order / t, 0)
        before = torch.cumsum(probs, 0) - probs
        k_eff = k if 0 < k < len(xs) else len(xs)
        kept = ((before < p) | (p >= 1.0)) & (torch.arange(len(xs)) < k_eff)
        keep_min = order[max(int(kept.sum()), 1) - 1]
        z = torch.where(xs >= keep_min, xs / t, torch.tensor(float("-inf"), dtype=x.dtype))
        log_pi = torch.log_softmax(z, 0)
        pi = log_pi.exp()
        sampling_entropy = float(-(pi * torch.where(pi > 0, log_pi, 0.0)).sum())
        sampling_logprob = float(log_pi[y])
    return [entropy, sampling_entropy, float(top[0]), float(top[0] - top[1]), float(log_q[y]),
            sampling_logprob, rank, float(xs.max()), nonfinite, overflow]


def reference_vllm_stats(logits, tokens, temperature, top_k, top_p, min_p=None, bound=OVERFLOW_BOUND):
    """The same fields with vLLM's sampling set: min_p, then top-k, then top-p over the
    distribution renormalized to what is left (DESIGN.md, the vLLM observer)."""
    min_p = min_p or [0.0] * len(temperature)
    out = []
    for row, y, t, k, p, mp in zip(logits.double(), tokens.tolist(), temperature, top_k, top_p, min_p):
        values = _row(row, y, 0.0, 0, 1.0, bound)  # every field but the sampling ones
        if t > 0 and torch.isfinite(row).any():
            xs = torch.where(torch.isfinite(row), row, torch.tensor(float("-inf"), dtype=row.dtype))
            z = xs / t
            allowed = torch.ones_like(xs, dtype=torch.bool)
            if mp > 0:
                allowed &= torch.softmax(z, 0) >= mp * torch.softmax(z, 0).max()
            if 0 < k < len(xs):
                allowed &= xs >= torch.sort(xs, descending=True).values[k - 1]
            if p < 1.0:
                order = torch.sort(torch.where(allowed, z, float("-inf")), descending=True).values
                probs = torch.softmax(order, 0)
                before = torch.cumsum(probs, 0) - probs
                kept = int(((before < p) & torch.isfinite(order)).sum())
                allowed &= z >= order[max(kept, 1) - 1]
            log_pi = torch.log_softmax(torch.where(allowed, z, float("-inf")), 0)
            pi = log_pi.exp()
            values[1] = float(-(pi * torch.where(pi > 0, log_pi, 0.0)).sum())
            values[5] = float(log_pi[y])
        out.append(values)
    return torch.tensor(out, dtype=torch.float64)
