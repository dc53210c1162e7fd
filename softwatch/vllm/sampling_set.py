"""The sampling set of vLLM's sampler, as a per-row threshold on the raw logits.

vLLM samples from softmax(x / T) after, in this order: min_p (tokens with probability below
min_p times the top probability go), top-k (ties at the k-th logit stay), and top-p over the
distribution renormalized to what is left (a token stays while the mass of the tokens ranked
above it is below p). Each keeps a prefix of the tokens ordered by logit, so the set is
{x >= keep_min}; `softwatch.stats` takes it as that threshold.
"""

from __future__ import annotations

import torch

from ..sampling import CPU_NUCLEUS_CANDIDATES, EXP_FLOOR, RowParams, inverse_temperature


def keep_min_logit(x: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Per row, the smallest raw logit vLLM may sample; -inf where nothing is filtered.
    `x` is sanitized fp32 logits [B, V]; `rows.min_p` is set (one value per row)."""
    batch, vocab = x.shape
    no_filter = torch.full((batch,), float("-inf"), device=x.device)
    if not rows.any_filtered:
        return no_filter
    prefix = _prefix_threshold(x, rows)
    if all(p >= 1.0 for p in rows.top_p):
        keep_min = prefix
    else:
        keep_min = _nucleus_threshold(x, rows, prefix)
    filtered = torch.tensor(rows.filtered, device=x.device)
    return torch.where(filtered, keep_min, no_filter)


def _prefix_threshold(x: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """max(k-th largest logit, the min_p bound): the prefix left before the nucleus."""
    batch, vocab = x.shape
    threshold = torch.full((batch,), float("-inf"), device=x.device)
    ks = [k if 0 < k < vocab else 0 for k in rows.top_k]
    if any(ks):
        top = torch.topk(x, max(ks), dim=1, sorted=True).values
        kth = top.gather(1, (torch.tensor(ks, device=x.device).clamp(min=1) - 1)[:, None]).squeeze(1)
        threshold = torch.where(torch.tensor(ks, device=x.device) > 0, kth, threshold)
    if any(p > 0 for p in rows.min_p):
        # p_i >= min_p * p_max  <=>  (x_i - m) / T >= log(min_p)
        min_p = torch.tensor(rows.min_p, dtype=torch.float32, device=x.device)
        bound = x.amax(dim=1) + rows.temperature_t * torch.log(min_p)
        threshold = torch.where(min_p > 0, torch.maximum(threshold, bound), threshold)
    return threshold


def _nucleus_threshold(x: torch.Tensor, rows: RowParams, prefix: torch.Tensor) -> torch.Tensor:
    batch, vocab = x.shape
    candidates = vocab if x.is_cuda else min(vocab, max(CPU_NUCLEUS_CANDIDATES, *rows.top_k))
    keep_min, covered = _nucleus_among(x, rows, prefix, candidates)
    if candidates < vocab:
        # CPU only: reading `covered` costs nothing here; the rare wide nucleus is redone exactly.
        missing = (~covered).nonzero().flatten()
        if missing.numel():
            keep_min[missing] = _nucleus_among(x[missing], rows.select(missing.tolist()), prefix[missing], vocab)[0]
    return keep_min


def _nucleus_among(x: torch.Tensor, rows: RowParams, prefix: torch.Tensor, candidates: int):
    """The nucleus threshold found among the top `candidates` logits, and whether that was enough."""
    vocab = x.shape[1]
    inv_t = inverse_temperature(rows.temperature_t)[:, None]
    m = x.amax(dim=1, keepdim=True)
    allowed = x >= prefix[:, None]
    z = torch.where(allowed, ((x - m) * inv_t).clamp_(min=EXP_FLOOR), float("-inf"))
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)  # renormalized over the prefix, as vLLM does
    top = torch.topk(x, candidates, dim=1, sorted=True).values
    in_prefix = top >= prefix[:, None]
    probs = torch.where(in_prefix, torch.exp(((top - m) * inv_t).clamp_(min=EXP_FLOOR) - log_norm), 0.0)
    mass_before = torch.cumsum(probs, dim=1) - probs
    top_p = rows.top_p_t[:, None]
    kept = in_prefix & ((mass_before < top_p) | (top_p >= 1.0))
    n_keep = kept.sum(dim=1, keepdim=True).clamp(min=1)
    keep_min = top.gather(1, n_keep - 1).squeeze(1)
    covered = (n_keep.squeeze(1) < candidates) | ~in_prefix[:, -1] | (candidates == vocab)
    return keep_min, covered
