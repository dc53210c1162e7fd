"""`softwatch bench vllm`: plain vLLM, vLLM with the softwatch observer, vLLM returning its own
logprobs=1, and softwatch's own engine, decoding the same prompts.

This VM's speed drifts by 10-15% over seconds, more than the 3% being measured: whole runs made
one after another cannot resolve it (measured: per-repeat ratios from 0.98 to 1.12). So each
vLLM variant is an engine in a process of its own, with its engine core in that process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so one `step()` is one decode step), and the engines are
stepped in lockstep: one step each, in a rotating order, never two at once. A variant's time
is the sum of its step times, so every variant sees the same drift. softwatch's own engine
decodes the same prompts between repeats.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from ..prompts import prompt_set

VLLM_VARIANTS = ("plain", "observed", "logprobs")


def bench_vllm(model: str, batch: int = 8, new_tokens: int = 64, repeats: int = 3, temperature: float = 0.0,
               top_p: float = 1.0, progress: Callable[[str], None] = lambda _: None) -> dict:
    from ..completion import DecodingParams
    from ..engine import Engine
    from ..models import load_model

    prompts = prompt_set()[:batch]
    data = tempfile.mkdtemp(prefix="softwatch-bench-vllm-")
    context = multiprocessing.get_context("spawn")
    engines = {}
    try:
        for variant in VLLM_VARIANTS:
            progress(f"starting vLLM ({variant})")
            engines[variant] = _EngineProcess(context, model, variant, data, temperature, top_p)
        info = {variant: engine.call("ready") for variant, engine in engines.items()}
        lm = load_model(model)
        own_engine = Engine(lm, max_batch=batch)
        own = DecodingParams(temperature=temperature, top_p=top_p, max_tokens=new_tokens, ignore_eos=True, seed=0)

        lockstep(engines, prompts, new_tokens, rotation=0)  # warm-up: first steps allocate
        own_engine.generate(prompts, own)
        seconds = dict.fromkeys((*VLLM_VARIANTS, "softwatch"), 0.0)
        per_repeat, same_tokens = [], True
        for r in range(repeats):
            times, tokens = lockstep(engines, prompts, new_tokens, rotation=r)
            start = time.perf_counter()
            own_tokens = [c.token_ids for c in own_engine.generate(prompts, own)]
            times["softwatch"] = time.perf_counter() - start
            for variant, t in times.items():
                seconds[variant] += t
            same_tokens &= tokens["observed"] == tokens["plain"]
            per_repeat.append({"overhead_ratio": times["observed"] / times["plain"],
                               "vllm_logprobs_ratio": times["logprobs"] / times["plain"]})
            if temperature == 0:
                per_repeat[-1]["softwatch_same_tokens"] = own_tokens == tokens["plain"]
            progress(f"repeat {r + 1}/{repeats}: observer {per_repeat[-1]['overhead_ratio']:.3f}x plain")
    finally:
        for engine in engines.values():
            engine.close()
        shutil.rmtree(data, ignore_errors=True)
    generated = batch * new_tokens * repeats
    return {
        "model": lm.model_id, "device": info["plain"]["device"], "dtype": info["plain"]["dtype"], "batch": batch,
        "temperature": temperature, "top_p": top_p,
        "new_tokens": new_tokens, "repeats": repeats, "vllm_version": info["plain"]["vllm_version"],
        **{f"{v}_tok_s": generated / t for v, t in seconds.items()},
        "overhead_ratio": seconds["observed"] / seconds["plain"],
        "median_overhead_ratio": statistics.median(r["overhead_ratio"] for r in per_repeat),
        "vllm_logprobs_ratio": seconds["logprobs"] / seconds["plain"],
        "vllm_vs_softwatch": seconds["softwatch"] / seconds["plain"],
        "same_tokens": same_tokens,
        "engine_cores": {v: i["cores"] for v, i in info.items()},
        "engine_torch_threads": {v: i["torch_threads"] for v, i in info.items()},
        "per_repeat": per_repeat,
    }


def lockstep(engines: dict, prompts: list[str], new_tokens: int, rotation: int) -> tuple[dict, dict]:
    """Decode `prompts` on every engine, one step each in turn; seconds and tokens per variant."""
    names = list(engines)
    for engine in engines.values():
        engine.call("add", prompts, new_tokens)
    seconds = dict.fromkeys(names, 0.0)
    running = set(names)
    step = 0
    while running:
        shift = (step + rotation) % len(names)
        for name in names[shift:] + names[:shift]:
            if name in running:
                elapsed, busy = engines[name].call("step")
                seconds[name] += elapsed
                if not busy:
                    running.discard(name)
        step += 1
    return seconds, {name: engine.call("tokens") for name, engine in engines.items()}


class _EngineProcess:
    """One vLLM engine in a child process, driven step by step over a pipe."""

    def __init__(self, context, model: str, variant: str, data: str, temperature: float, top_p: float):
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve_engine, args=(child, model, variant, data, temperature, top_p),
                                        daemon=True)
        self._process.start()
        child.close()  # so that a child that dies closes the pipe, and recv() fails instead of hanging

    def call(self, *command, timeout_s: float = 900.0):
        self._pipe.send(command)
        if not self._pipe.poll(timeout_s):
            raise TimeoutError(f"the vLLM engine process did not answer {command[0]!r} within {timeout_s:.0f} s")
        reply = self._pipe.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        try:
            self._pipe.send(("stop",))
        except OSError:
            pass
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()


def _serve_engine(pipe, model: str, variant: str, data: str, temperature: float, top_p: float) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import vllm
    from vllm import SamplingParams

    from ..host import keep_freed_memory
    from ..vllm import engine_kwargs, use_v1_model_runner
    from ..vllm.settings import ObserverSettings

    keep_freed_memory()  # the observer does this in its process: every variant runs with the same allocator
    use_v1_model_runner()
    kwargs = engine_kwargs(model, ObserverSettings(data=data, metrics="none"), enforce_eager=True, max_model_len=2048)
    if variant != "observed":
        del kwargs["logits_processors"], kwargs["additional_config"]
    try:
        engine = vllm.LLM(**kwargs).llm_engine
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        pipe.send(exc)
        return
    outputs: dict[int, list[int]] = {}
    added = 0
    while True:
        command = pipe.recv()
        try:
            if command[0] == "stop":
                return
            if command[0] == "ready":
                import torch

                pipe.send({"device": "cpu" if "kv_cache_memory_bytes" in kwargs else "cuda", "dtype": kwargs["dtype"],
                           "vllm_version": vllm.__version__, "cores": sorted(os.sched_getaffinity(0)),
                           "torch_threads": torch.get_num_threads()})
            elif command[0] == "add":
                prompts, new_tokens = command[1:]
                outputs.clear()
                for i, prompt in enumerate(prompts):  # seeded per prompt: every variant draws the same tokens
                    params = SamplingParams(temperature=temperature, top_p=top_p, seed=i, max_tokens=new_tokens,
                                            ignore_eos=True, logprobs=1 if variant == "logprobs" else None)
                    engine.add_request(f"{added}-{i}", prompt, params)
                added += 1
                pipe.send(None)
            elif command[0] == "step":
                start = time.perf_counter()
                finished = [o for o in engine.step() if o.finished]
                busy = engine.has_unfinished_requests()
                if not busy:
                    engine.step()  # the step that clears finished requests (the observer records there)
                elapsed = time.perf_counter() - start
                for o in finished:
                    outputs[int(o.request_id.rsplit("-", 1)[1])] = list(o.outputs[0].token_ids)
                pipe.send((elapsed, busy))
            elif command[0] == "tokens":
                pipe.send([outputs[i] for i in sorted(outputs)])
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            pipe.send(exc)
