"""GPU figures for the README: the statistics kernel at [64, 128256] against the naive PyTorch
composition and one read of the same logits, its achieved bandwidth, and its share of a decode
step of a SmolLM2-architecture model with a 128256-token vocabulary (random weights: the
embedded checkpoint does not travel to GPU machines, and a step's cost does not depend on them).

    python benchmarks/gpu_stats.py            # prints one JSON object
"""

import json
import time

import torch
import triton.testing
from transformers import LlamaConfig, LlamaForCausalLM

from softwatch.bench.decode import naive_stats
from softwatch.engine import DecodingParams, Engine
from softwatch.models import LoadedModel, byte_tokenizer, model_rev, weights_digest
from softwatch.sampling import RowParams, keep_min_logit, sample, sanitize
from softwatch.stats import softmax_stats


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def stats_figures(batch, vocab, dtype, temperature, top_p):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 4).to(dtype)
    rows = RowParams((temperature,) * batch, (0,) * batch, (top_p,) * batch, tuple(range(batch)), "cuda")
    x = sanitize(logits)
    keep_min = keep_min_logit(x, rows)
    tokens = sample(x, rows, torch.zeros(batch, dtype=torch.long, device="cuda"), keep_min)
    kernel = ms(lambda: softmax_stats(logits, tokens, rows, keep_min, backend="triton"))
    torch_path = ms(lambda: softmax_stats(logits, tokens, rows, keep_min, backend="torch"))
    naive = ms(lambda: naive_stats(logits, tokens, temperature, top_p))
    one_read = ms(lambda: logits.sum(dim=1))
    sampler = ms(lambda: sample(sanitize(logits), rows, torch.zeros(batch, dtype=torch.long, device="cuda"),
                                keep_min_logit(sanitize(logits), rows)))
    # Replayed from a CUDA graph: the GPU time alone, without the host's launch overhead, which
    # at this size (16 MB in bf16, ~5 us of HBM time) is most of a call's wall time.
    kernel_graph = graph_ms(lambda: softmax_stats(logits, tokens, rows, keep_min, backend="triton"))
    one_read_graph = graph_ms(lambda: logits.sum(dim=1))
    nbytes = logits.numel() * logits.element_size()
    return {"shape": [batch, vocab], "dtype": str(dtype).removeprefix("torch."), "temperature": temperature,
            "top_p": top_p, "stats_ms": kernel, "torch_stats_ms": torch_path, "naive_stats_ms": naive,
            "one_read_ms": one_read, "sampler_ms": sampler, "naive_over_stats": naive / kernel,
            "stats_bandwidth_gb_s": nbytes / kernel / 1e6, "one_read_bandwidth_gb_s": nbytes / one_read / 1e6,
            "stats_graph_ms": kernel_graph, "one_read_graph_ms": one_read_graph,
            "stats_graph_bandwidth_gb_s": nbytes / kernel_graph / 1e6,
            "one_read_graph_bandwidth_gb_s": nbytes / one_read_graph / 1e6}


def decode_step_share(batch=64, vocab=128256, new_tokens=32):
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    lm = LoadedModel(model, tok, "random-smollm2-arch-v128256", model_rev(weights_digest(model), torch.bfloat16),
                     torch.device("cuda"), torch.bfloat16)
    prompts = [f"prompt number {i}: tell me something" for i in range(batch)]
    params = DecodingParams(temperature=0.7, top_p=0.9, max_tokens=new_tokens, seed=0, ignore_eos=True)
    out = {}
    for name, instrument in [("plain", False), ("instrumented", True), ("plain_again", False), ("instrumented_again", True)]:
        engine = Engine(lm, max_batch=batch, instrument=instrument)
        engine.generate(prompts, params)  # warm-up at the measured batch: allocator and kernels
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t) / new_tokens * 1e3
    step_ms = min(out["plain"], out["plain_again"])
    inst_ms = min(out["instrumented"], out["instrumented_again"])
    return {"batch": batch, "vocab": vocab, "plain_step_ms": step_ms, "instrumented_step_ms": inst_ms,
            "overhead_ratio": inst_ms / step_ms, "runs_ms": out}


if __name__ == "__main__":
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result["stats"] = [stats_figures(64, 128256, torch.bfloat16, 0.7, 0.9),
                       stats_figures(64, 128256, torch.float32, 0.7, 0.9),
                       stats_figures(64, 128256, torch.bfloat16, 1.0, 1.0),
                       stats_figures(32, 49152, torch.bfloat16, 0.7, 0.9)]
    step = decode_step_share()
    result["decode"] = step
    k = result["stats"][0]["stats_ms"]
    result["stats_share_of_step"] = k / step["plain_step_ms"]
    print(json.dumps(result, indent=2))
