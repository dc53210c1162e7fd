"""`softwatch bench decode`: instrumented decode, plain decode and transformers `generate`, side
by side in one run on the same model, prompts and lengths; and the statistics pass alone."""

from __future__ import annotations

import statistics
import time

import torch
from transformers.generation.streamers import BaseStreamer

from ..engine import DecodingParams, Engine
from ..host import keep_freed_memory
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


class _EngineRun:
    """One engine generating the benchmark prompts, driven a step at a time and timed per step."""

    def __init__(self, engine: Engine, prompts: list[str], params: DecodingParams):
        self.engine, self.prompts, self.params = engine, prompts, params
        self.seconds = 0.0
        self.ids: list[str] = []
        self.tokens: dict[str, list[int]] = {}  # request id -> generated token ids

    def start(self) -> None:
        self.ids = [self.engine.submit(p, self.params) for p in self.prompts]

    def step(self) -> None:
        if self.engine.has_work():
            _sync(self.engine.lm.device)
            t = time.perf_counter()
            done = self.engine.step()
            _sync(self.engine.lm.device)
            self.seconds += time.perf_counter() - t
            self.tokens.update((c.request_id, c.token_ids) for c in done)

    def token_ids(self) -> list[list[int]]:
        return [self.tokens[i] for i in self.ids]

    def finish(self) -> None:
        while self.engine.has_work():
            self.step()


class _Lockstep(BaseStreamer):
    """Steps the engine runs each time `generate` emits a token (transformers calls a streamer
    once per decode step), so all variants run interleaved a step apart, under the same machine
    conditions: this VM's speed drifts by 10-15% over seconds, which swamps a 3% difference
    between runs made one after another. `seconds` is the time spent here, not in generate."""

    def __init__(self, runs: list[_EngineRun]):
        self.runs = runs
        self.seconds = 0.0

    def put(self, value) -> None:
        t = time.perf_counter()
        for run in self.runs:
            run.step()
        self.runs.reverse()  # the step right after generate's runs slower; take turns at it
        self.seconds += time.perf_counter() - t

    def end(self) -> None:
        t = time.perf_counter()
        for run in self.runs:
            run.finish()
        self.seconds += time.perf_counter() - t


def decode(
    lm: LoadedModel,
    batch: int = 8,
    new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repeats: int = 3,
    progress=None,
) -> dict:
    """The decode figures of issue 2. Each repeat runs transformers `generate` twice (plain, then
    with `output_logits` and the statistics computed afterwards), and during each of them the
    instrumented and the plain engine decode the same prompts a step at a time in lockstep.
    Engine tok/s and `overhead_ratio` are over all rounds; the ratios to transformers pair each
    generate with the instrumented engine's steps that ran alongside it."""
    keep_freed_memory()
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch)]
    params = DecodingParams(temperature=temperature, top_p=top_p, max_tokens=new_tokens, seed=0, ignore_eos=True)
    engines = {"instrumented": Engine(lm, max_batch=batch), "plain": Engine(lm, max_batch=batch, instrument=False)}
    inputs = _left_padded(lm, prompts)
    sampled = temperature > 0
    hf_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sampled,
                     pad_token_id=lm.tokenizer.pad_token_id)
    if sampled:
        hf_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)

    def hf_generate(streamer):
        return lm.model.generate(**inputs, **hf_kwargs, streamer=streamer)

    def hf_scores(streamer):
        out = lm.model.generate(**inputs, **hf_kwargs, streamer=streamer, output_logits=True,
                                return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        for step, logits in enumerate(out.logits):
            naive_stats(logits, new[:, step], temperature, top_p)
        return out.sequences

    # rounds[i][hf_name]: seconds of that generate and of each engine decoding alongside it
    rounds: list[dict[str, dict[str, float]]] = []
    same_tokens = True
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first is a warm-up
            this = {}
            for hf_name, hf_run in (("hf_generate", hf_generate), ("hf_scores", hf_scores)):
                runs = {name: _EngineRun(engine, prompts, params) for name, engine in engines.items()}
                lockstep = _Lockstep(list(runs.values()))
                for run in runs.values():
                    run.start()
                _sync(lm.device)
                t = time.perf_counter()
                sequences = hf_run(lockstep)
                _sync(lm.device)
                mine, plain = (runs[name].token_ids() for name in engines)
                same_tokens = same_tokens and mine == plain
                if not sampled:  # transformers draws other samples than softwatch's sampler
                    theirs = sequences[:, inputs["input_ids"].shape[1]:].tolist()
                    same_tokens = same_tokens and _agree_until_eos(mine, theirs, lm.eos_token_ids)
                this[hf_name] = {"hf": time.perf_counter() - t - lockstep.seconds,
                                 **{name: run.seconds for name, run in runs.items()}}
            if r == 0:
                continue
            rounds.append(this)
            if progress:
                progress(f"repeat {r}/{repeats}: " + "; ".join(
                    f"{hf_name} {v['hf']:.2f}s alongside instrumented {v['instrumented']:.2f}s, plain {v['plain']:.2f}s"
                    for hf_name, v in this.items()))
        stats_shapes = [stats_pass(lm.device, 32, lm.vocab_size, temperature or 1.0, top_p),
                        stats_pass(lm.device, 64, 128256, temperature or 1.0, top_p)]

    def total(hf_name: str, variant: str) -> float:
        return sum(r[hf_name][variant] for r in rounds)

    tokens = batch * new_tokens * repeats  # per variant beside one generate
    engine_s = {name: total("hf_generate", name) + total("hf_scores", name) for name in engines}  # beside both
    return {
        "model": lm.model_id,
        "device": _device_name(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "new_tokens": new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "repeats": repeats,
        "same_tokens": same_tokens,  # every round: the engines agree (and, greedy, transformers until an EOS)
        "instrumented_tok_s": 2 * tokens / engine_s["instrumented"],
        "plain_tok_s": 2 * tokens / engine_s["plain"],
        "hf_generate_tok_s": tokens / total("hf_generate", "hf"),
        "hf_scores_tok_s": tokens / total("hf_scores", "hf"),
        "overhead_ratio": engine_s["instrumented"] / engine_s["plain"],
        # paired with the instrumented steps that ran alongside each generate
        "vs_hf_ratio": total("hf_generate", "hf") / total("hf_generate", "instrumented"),
        "vs_hf_scores_ratio": total("hf_scores", "hf") / total("hf_scores", "instrumented"),
        "overhead_ratio_per_repeat": [sum(v["instrumented"] for v in r.values()) / sum(v["plain"] for v in r.values())
                                      for r in rounds],
        "vs_hf_ratio_per_repeat": [r["hf_generate"]["hf"] / r["hf_generate"]["instrumented"] for r in rounds],
        "stats_ms": stats_shapes[0]["stats_ms"],
        "naive_stats_ms": stats_shapes[0]["naive_stats_ms"],
        "one_read_ms": stats_shapes[0]["one_read_ms"],
        "stats_shapes": stats_shapes,
    }


def _agree_until_eos(mine: list[list[int]], theirs: list[list[int]], eos: frozenset[int]) -> bool:
    """Do the rows agree up to the first end-of-sequence token softwatch emitted? From there
    they part: `ignore_eos` emits it and goes on, `min_new_tokens` makes generate pick another."""
    for a, b in zip(mine, theirs):
        end = next((i for i, t in enumerate(a) if t in eos), len(a))
        if a[:end] != b[:end]:
            return False
    return True


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
