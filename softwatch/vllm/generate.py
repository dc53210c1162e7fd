"""`softwatch generate --engine vllm`: one request through vLLM with the observer, printed as
the own engine prints it. The statistics come back from the records the observer wrote in
vLLM's worker process: the dataset is the one interface between decoding and its readers."""

from __future__ import annotations

import os
import tempfile
import uuid

from ..completion import DecodingParams
from ..records import SUMMARY_FIELDS
from ..stats import FIELDS
from .params import sampling_params
from .settings import ObserverSettings

SUMMARY_KEYS = (*SUMMARY_FIELDS, "nonfinite", "overflow", "prompt_tokens", "generated_tokens", "finish_reason",
                "ttft_s", "latency_s")
REGIME_KEYS = ("model_id", "model_rev", "params_id", "temperature", "top_p", "top_k", "template_version")


def generate(prompt: str, params: DecodingParams, *, model: str, chat: bool = False, data: str | None = None,
             store_text: bool = False, dtype: str | None = None) -> dict:
    """{"text", "tokens", "summary", "regime"} of one completion, its records in `data` (a
    temporary dataset when None)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the command's output
    from . import LLM, tag, wait_for_records

    root = data or tempfile.mkdtemp(prefix="softwatch-generate-")
    settings = ObserverSettings(data=root, metrics="none", deployment="cli", replica=f"cli-{os.getpid()}",
                                store_text=store_text, flush_interval_s=0.2, template_version=params.template_version)
    overrides = {"enforce_eager": True} | ({"dtype": dtype} if dtype else {})
    llm = LLM(model, settings, **overrides)
    request_id = f"cli-{uuid.uuid4().hex[:16]}"
    sampling = tag(sampling_params(params), request_id)
    if chat:
        output = llm.chat([{"role": "user", "content": prompt}], sampling, use_tqdm=False)[0]
    else:
        output = llm.generate(prompt, sampling, use_tqdm=False)[0]
    wait_for_records(root, [request_id])
    return read_completion(root, request_id, llm.get_tokenizer(), output.outputs[0].text)


def read_completion(data: str, request_id: str, tokenizer, text: str) -> dict:
    """A recorded sequence as the own engine's `generate --json` prints it."""
    from ..store import Store

    store = Store(data)
    sequence = store.rows("SELECT * FROM sequences WHERE request_id = $1", [request_id])[0]
    rows = store.rows("SELECT * FROM tokens WHERE request_id = $1 ORDER BY position", [request_id])
    store.close()
    tokens = [{"id": r["token_id"], "text": tokenizer.decode([r["token_id"]]), **{f: r[f] for f in FIELDS}}
              for r in rows]
    return {"text": text, "tokens": tokens, "summary": {k: sequence[k] for k in SUMMARY_KEYS},
            "regime": {k: sequence[k] for k in REGIME_KEYS}}
