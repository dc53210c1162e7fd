"""softwatch inside vLLM: the observer (`softwatch.vllm.observer.SoftwatchObserver`, a V1
logits processor) computes every token field of DESIGN.md in vLLM's decode step and writes
the same records and metrics as softwatch's own engine, from the process that runs the model.

In your own code:

    import softwatch.vllm
    llm = softwatch.vllm.LLM("SmolLM2-135M-Instruct", softwatch.vllm.ObserverSettings(data="softwatch-data"))
    outputs = llm.generate(prompts, softwatch.vllm.tag(SamplingParams(max_tokens=64), "my-id"))

With the OpenAI server: `--logits-processors softwatch.vllm.observer:SoftwatchObserver` and
`--additional-config '{"softwatch": {"data": "softwatch-data"}}'` (README).
"""

from __future__ import annotations

import importlib.util
import os

from ..models import checkpoint, resolve_device, resolve_dtype
from ..store import wait_for_records  # noqa: F401 - part of this package's interface
from .requests import REQUEST_ID_KEY, TEMPLATE_KEY
from .settings import ObserverSettings

ENGINES = ("auto", "vllm", "softwatch")
OBSERVER = "softwatch.vllm.observer:SoftwatchObserver"
CPU_KV_CACHE_BYTES = 1 << 30
"""vLLM's default reserves 92% of a CPU node's memory for the KV cache, and refuses to start
when less is free; a fixed 1 GiB lets engines share a machine (override: kv_cache_memory_bytes)."""


def engine_kwargs(model: str = "SmolLM2-135M-Instruct", settings: ObserverSettings = ObserverSettings(),
                  **overrides) -> dict:
    """Keyword arguments for `vllm.LLM` or `AsyncEngineArgs`: the checkpoint softwatch would load
    for `model`, its dtype (fp32 on CPU, bf16 on CUDA, as softwatch's engine), the observer and
    its settings. `overrides` are vLLM's own arguments and win."""
    directory, model_id = checkpoint(model)
    device = resolve_device("auto")
    if not settings.model_id:
        settings = ObserverSettings(**{**settings.__dict__, "model_id": model_id})
    kwargs = {
        "model": str(directory),
        "dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "logits_processors": [OBSERVER],
        "additional_config": settings.as_additional_config(),
        "async_scheduling": False,  # the observer reads sampled tokens, not placeholders
    }
    if device.type == "cpu":
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    kwargs.update(overrides)
    return kwargs


def resolve_engine(name: str, model: str | None = None) -> str:
    """"vllm" or "softwatch" for an `engine` setting and the model it is to run: "auto" is vLLM
    where it is installed, except for models only softwatch's engine runs (tiny-random)."""
    from ..models import is_tiny_random

    if name not in ENGINES:
        raise ValueError(f"engine: must be one of {', '.join(ENGINES)}, got {name!r}")
    softwatch_only = model is not None and is_tiny_random(model)
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None and not softwatch_only else "softwatch"
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("engine: vllm is not installed here (python -m softwatch.vllm.install)")
    if name == "vllm" and softwatch_only:
        raise ValueError(f"engine: vllm cannot run {model} (a model only softwatch's engine builds)")
    return name


def use_v1_model_runner() -> None:
    """The observer is a V1 logits processor; vLLM's Model Runner V2 (the GPU default in 0.32)
    has another processor interface and refuses V1 classes. Call before the engine starts."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def LLM(model: str = "SmolLM2-135M-Instruct", settings: ObserverSettings = ObserverSettings(), **overrides):
    """A `vllm.LLM` with the observer. Create it under `if __name__ == "__main__":` (vLLM
    spawns workers that import the main module)."""
    use_v1_model_runner()
    import vllm

    return vllm.LLM(**engine_kwargs(model, settings, **overrides))


def tag(params, request_id: str, template_version: str | None = None):
    """`params` (a vllm.SamplingParams) with the record id softwatch gives its sequence (and a
    template version for its regime). Children of an `n > 1` request get `-1`, `-2`, ... appended."""
    params.extra_args = {**(params.extra_args or {}), REQUEST_ID_KEY: request_id}
    if template_version is not None:
        params.extra_args[TEMPLATE_KEY] = template_version
    return params
