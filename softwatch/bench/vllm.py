"""`softwatch bench vllm`: plain vLLM, vLLM with the softwatch observer, vLLM returning its own
logprobs=1, and softwatch's own engine, decoding the same prompts in one process. Every repeat
runs each variant once, in a rotated order, so slow drift of the machine hits all of them. On a
noisy VM whole runs cannot resolve a few percent: read `per_repeat` and the median beside the
sum-based `overhead_ratio`. (Stepping the engines in lockstep in one process would, but vLLM's
CPU backend binds threads per engine, and three in-process engines decoded ten times slower.)"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

from ..prompts import prompt_set

VARIANTS = ("plain", "observed", "logprobs", "softwatch")


def bench_vllm(model: str, batch: int = 8, new_tokens: int = 64, repeats: int = 3,
               progress: Callable[[str], None] = lambda _: None) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the result
    import vllm
    from vllm import SamplingParams

    from ..completion import DecodingParams
    from ..engine import Engine
    from ..models import load_model
    from ..vllm import engine_kwargs, use_v1_model_runner
    from ..vllm.settings import ObserverSettings

    use_v1_model_runner()
    prompts = prompt_set()[:batch]
    settings = ObserverSettings(data=tempfile.mkdtemp(prefix="softwatch-bench-vllm-"), metrics="none")
    observed_kwargs = engine_kwargs(model, settings, enforce_eager=True, max_model_len=2048)
    plain_kwargs = {k: v for k, v in observed_kwargs.items() if k not in ("logits_processors", "additional_config")}
    progress("starting plain vLLM")
    plain = vllm.LLM(**plain_kwargs)
    progress("starting vLLM with the observer")
    observed = vllm.LLM(**observed_kwargs)
    lm = load_model(model)  # the device and dtype engine_kwargs chose for vLLM
    engine = Engine(lm, max_batch=batch)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=1)
    own = DecodingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run(variant: str) -> list[list[int]]:
        if variant == "softwatch":
            return [c.token_ids for c in engine.generate(prompts, own)]
        llm, params = {"plain": (plain, greedy), "observed": (observed, greedy), "logprobs": (plain, with_logprobs)}[variant]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    for variant in VARIANTS:  # warm-up: first calls allocate and fault in pages
        run(variant)
    seconds = dict.fromkeys(VARIANTS, 0.0)
    per_repeat = []
    same_tokens = True
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        times, tokens = {}, {}
        for variant in order:
            start = time.perf_counter()
            tokens[variant] = run(variant)
            times[variant] = time.perf_counter() - start
            seconds[variant] += times[variant]
        same_tokens &= tokens["observed"] == tokens["plain"]
        per_repeat.append({"overhead_ratio": times["observed"] / times["plain"],
                           "vllm_logprobs_ratio": times["logprobs"] / times["plain"]})
        progress(f"repeat {r + 1}/{repeats}: observer {per_repeat[-1]['overhead_ratio']:.3f}x plain")
    generated = batch * new_tokens * repeats
    return {
        "model": lm.model_id, "device": str(lm.device), "dtype": observed_kwargs["dtype"], "batch": batch, "new_tokens": new_tokens,
        "repeats": repeats, "vllm_version": vllm.__version__, "torch_threads": _threads(),
        **{f"{v}_tok_s": generated / seconds[v] for v in VARIANTS},
        "overhead_ratio": seconds["observed"] / seconds["plain"],
        "vllm_logprobs_ratio": seconds["logprobs"] / seconds["plain"],
        "vllm_vs_softwatch": seconds["softwatch"] / seconds["plain"],
        "same_tokens": same_tokens,
        "median_overhead_ratio": statistics.median(r["overhead_ratio"] for r in per_repeat),
        "per_repeat": per_repeat,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()
