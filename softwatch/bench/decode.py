"""`softwatch bench decode`: instrumented decode, plain decode and transformers `generate`, side
by side in one run on the same model, prompts and lengths; and the statistics pass alone."""

from __future__ import annotations

import statistics
import time

import torch

from ..engine import DecodingParams, Engine, keep_freed_memory
from ..models import LoadedModel
from ..sampling import RowParams, keep_min_logit, sanitize
from ..stats import OVERFLOW_BOUND, softmax_stats

BENCH_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "def quicksort(items):",
    "Summarize the plot of Romeo and Juliet.",
    "Write a haiku about autumn rain.",
    "What are the main differences between TCP and UDP?",
    "The three most important rules of database design are",
    "Translate to French: The weather is lovely today.",
    "A recipe for a simple tomato soup:",
]


def naive_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What a user writes today on top of `output_logits`: one PyTorch op per quantity."""
    x = logits.float()
    finite = torch.isfinite(x)
    x = x.masked_fill(~finite, float("-inf"))
    q, log_q = torch.softmax(x, -1), torch.log_softmax(x, -1)
    entropy = -(q * log_q).nansum(-1)
    top2 = q.topk(2, dim=-1).values
    y = tokens[:, None]
    rank = (x > x.gather(1, y)).sum(-1)
    nonfinite = (~finite).sum(-1)
    overflow = (finite & (x.abs() > OVERFLOW_BOUND)).sum(-1)
    z = x / max(temperature, 1e-6)
    if top_p < 1.0:
        sorted_z, order = z.sort(-1, descending=True)
        p_sorted = sorted_z.softmax(-1)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        z = z.scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))
    pi, log_pi = torch.softmax(z, -1), torch.log_softmax(z, -1)
    sampling_entropy = -(pi * log_pi).nansum(-1)
    return torch.stack([
        entropy, sampling_entropy, top2[:, 0], top2[:, 0] - top2[:, 1], log_q.gather(1, y)[:, 0],
        log_pi.gather(1, y)[:, 0], rank.float(), x.amax(-1), nonfinite.float(), overflow.float(),
    ], dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: torch.device, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def stats_pass(device: torch.device, batch: int, vocab: int, temperature: float, top_p: float) -> dict:
    """softwatch's statistics vs the naive composition vs one read of the same logits."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(batch, vocab, generator=g) * 4).to(device)
    tokens = torch.randint(0, vocab, (batch,), generator=g).to(device)
    rows = RowParams((temperature,) * batch, (0,) * batch, (top_p,) * batch, tuple(range(batch)), str(device))
    keep_min = keep_min_logit(sanitize(logits), rows)  # the sampler's output, shared with the stats
    stats_ms = _median_ms(lambda: softmax_stats(logits, tokens, rows, keep_min), device)
    naive_ms = _median_ms(lambda: naive_stats(logits, tokens, temperature, top_p), device)
    read_ms = _median_ms(lambda: logits.sum(dim=1), device)
    return {"shape": [batch, vocab], "stats_ms": stats_ms, "naive_stats_ms": naive_ms,
            "one_read_ms": read_ms, "naive_over_stats": naive_ms / stats_ms}


def _left_padded(lm: LoadedModel, prompts: list[str]) -> dict:
    tok = lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok(prompts, return_tensors="pt", padding=True).to(lm.device)


def decode(
    lm: LoadedModel,
    batch: int = 8,
    new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repeats: int = 3,
    progress=None,
) -> dict:
    """The decode figures of issue 2, each the median of `repeats` interleaved runs."""
    keep_freed_memory()
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch)]
    params = DecodingParams(temperature=temperature, top_p=top_p, max_tokens=new_tokens, seed=0, ignore_eos=True)
    instrumented, plain = Engine(lm, max_batch=batch), Engine(lm, max_batch=batch, instrument=False)
    inputs = _left_padded(lm, prompts)
    sampled = temperature > 0
    hf_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sampled,
                     pad_token_id=lm.tokenizer.pad_token_id)
    if sampled:
        hf_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)

    def run_hf_scores():
        out = lm.model.generate(**inputs, **hf_kwargs, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        for step, logits in enumerate(out.logits):
            naive_stats(logits, new[:, step], temperature, top_p)

    variants = {
        "instrumented": lambda: instrumented.generate(prompts, params),
        "plain": lambda: plain.generate(prompts, params),
        "hf_generate": lambda: lm.model.generate(**inputs, **hf_kwargs),
        "hf_scores": run_hf_scores,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up
            fn()
        for r in range(repeats):
            for name, fn in variants.items():
                _sync(lm.device)
                t = time.perf_counter()
                fn()
                _sync(lm.device)
                times[name].append(time.perf_counter() - t)
                if progress:
                    progress(f"repeat {r + 1}/{repeats}: {name} {times[name][-1]:.2f}s")
        stats_shapes = [stats_pass(lm.device, 32, lm.vocab_size, temperature or 1.0, top_p),
                        stats_pass(lm.device, 64, 128256, temperature or 1.0, top_p)]
    seconds = {name: statistics.median(v) for name, v in times.items()}
    tokens = batch * new_tokens
    tok_s = {name: tokens / s for name, s in seconds.items()}
    return {
        "model": lm.model_id,
        "device": _device_name(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "new_tokens": new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "instrumented_tok_s": tok_s["instrumented"],
        "plain_tok_s": tok_s["plain"],
        "hf_generate_tok_s": tok_s["hf_generate"],
        "hf_scores_tok_s": tok_s["hf_scores"],
        "overhead_ratio": seconds["instrumented"] / seconds["plain"],
        "vs_hf_ratio": tok_s["instrumented"] / tok_s["hf_generate"],
        "stats_ms": stats_shapes[0]["stats_ms"],
        "naive_stats_ms": stats_shapes[0]["naive_stats_ms"],
        "one_read_ms": stats_shapes[0]["one_read_ms"],
        "stats_shapes": stats_shapes,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
