"""softwatch's `DecodingParams` as vLLM's `SamplingParams`."""

from __future__ import annotations

from ..completion import DecodingParams

UINT64 = 1 << 64


def sampling_params(params: DecodingParams, **extra):
    """The SamplingParams that decode as `params` say; `extra` are vLLM's own arguments."""
    from vllm import SamplingParams

    return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          max_tokens=params.max_tokens, seed=vllm_seed(params.seed), stop=list(params.stop),
                          ignore_eos=params.ignore_eos, **extra)


def vllm_seed(seed: int | None) -> int | None:
    """A request's int64 seed as the uint64 torch's generator reads it: the same generator for
    every seed, but -1, which vLLM takes for "no seed" (sampling unseeded), stays seeded."""
    return None if seed is None else seed % UINT64
