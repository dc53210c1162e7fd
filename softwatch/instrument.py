"""Library use without serving: softwatch's statistics and records for code that already
calls transformers' `generate`.

    watch = softwatch.instrument(model, tokenizer, data="softwatch-data")
    out = watch.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.7)

`watch.generate` takes and returns exactly what `model.generate` does; it asks generate for
the raw per-step logits (`output_logits`, before temperature or top-k/top-p processing),
computes every token field of DESIGN.md from them with the same one-pass statistics the
engine uses, and keeps one `Completion` per generated row in `watch.completions` (and writes
its records when a data root was given).
"""

from __future__ import annotations

import time
import uuid

import torch

from .completion import Completion, DecodingParams, prompt_key, summarize
from .models import model_rev, weights_digest
from .records import RecordContext
from .sampling import RowParams
from .stats import softmax_stats


class Watch:
    def __init__(self, model, tokenizer=None, model_id: str | None = None, data: str | None = None,
                 context: RecordContext = RecordContext(deployment="library")):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.context = context
        self.completions: list[Completion] = []
        self._rev: str | None = None
        self._sink = None
        if data:
            from .store import ParquetSink

            self._sink = ParquetSink(data)

    @property
    def model_rev(self) -> str:
        """Content hash of the weights (computed once: it reads every parameter)."""
        if self._rev is None:
            self._rev = model_rev(weights_digest(self.model), next(self.model.parameters()).dtype)
        return self._rev

    def generate(self, *args, **kwargs):
        """`model.generate(*args, **kwargs)`, instrumented. Returns what generate returns."""
        wants_dict = kwargs.get("return_dict_in_generate", False)
        kwargs.update(output_logits=True, return_dict_in_generate=True)
        created, started = time.time(), time.perf_counter()
        out = self.model.generate(*args, **kwargs)
        latency = time.perf_counter() - started
        prompt = kwargs.get("input_ids", args[0] if args else None)
        self._record(out, prompt, kwargs, created, latency)
        return out if wants_dict else out.sequences

    def _record(self, out, prompt: torch.Tensor | None, kwargs: dict, created: float, latency: float) -> None:
        config = self.model.generation_config
        sampled = kwargs.get("do_sample", config.do_sample)
        params = DecodingParams(
            temperature=float(kwargs.get("temperature", config.temperature) or 1.0) if sampled else 0.0,
            top_p=float(kwargs.get("top_p", config.top_p) or 1.0),
            top_k=int(kwargs.get("top_k", config.top_k) or 0),  # generate's default is 50: part of what was sampled
        )
        prompt_len = out.sequences.shape[1] - len(out.logits)
        tokens = out.sequences[:, prompt_len:]
        batch = tokens.shape[0]
        rows = RowParams(temperature=(params.temperature,) * batch, top_k=(params.top_k,) * batch,
                         top_p=(params.top_p,) * batch, seed=(0,) * batch, device=str(tokens.device))
        stats = torch.stack([softmax_stats(step, tokens[:, t], rows) for t, step in enumerate(out.logits)], dim=1)
        stats = stats.float().cpu()
        eos = _eos_ids(self.model, self.tokenizer)
        mask = kwargs.get("attention_mask")
        regime = params.regime(self.model_id, self.model_rev)
        prompts = len(mask) if mask is not None else len(prompt) if prompt is not None else batch
        for row in range(batch):
            source = row // (batch // prompts)  # generate repeats each prompt num_return_sequences times
            ids = tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            reason = "stop" if end < len(ids) or ids and ids[-1] in eos else "length"
            row_stats = stats[row, :end]
            summary = summarize(row_stats)
            prompt_tokens = int(mask[source].sum()) if mask is not None else prompt_len
            summary.update(prompt_tokens=prompt_tokens, generated_tokens=end, finish_reason=reason,
                           ttft_s=float("nan"), latency_s=latency)
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True) if self.tokenizer else ""
            c = Completion(request_id=f"lib-{uuid.uuid4().hex[:16]}", text=text, token_ids=ids[:end],
                           prompt_tokens=prompt_tokens, finish_reason=reason, stats=row_stats, summary=summary,
                           regime=regime, created=created, ttft_s=float("nan"), latency_s=latency,
                           prompt_key=_prompt_key(prompt, mask, source))
            self.completions.append(c)
            if self._sink is not None:
                self._sink.write_completion(c, self.context)

    def close(self) -> None:
        """Flush and close the record sink (also done at interpreter exit)."""
        if self._sink is not None:
            self._sink.close()


def _prompt_key(prompt: torch.Tensor | None, mask: torch.Tensor | None, row: int) -> str | None:
    """The prompt_key of a prompt row: its token ids but the padding the attention mask leaves
    out; None when generate was given no token ids (inputs_embeds)."""
    if prompt is None or prompt.is_floating_point():
        return None
    ids = prompt[row] if mask is None else prompt[row][mask[row].bool()]
    return prompt_key(ids.tolist())


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def instrument(model, tokenizer=None, *, model_id: str | None = None, data: str | None = None) -> Watch:
    """A `Watch` over a transformers causal LM: call `watch.generate(...)` where you called
    `model.generate(...)`."""
    return Watch(model, tokenizer, model_id=model_id, data=data)
