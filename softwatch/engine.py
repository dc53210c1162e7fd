"""Batched prefill + decode with a KV cache over a transformers causal LM, with continuous
batching: requests join and leave the running batch between steps.

Rows are left-padded to one cache length. A step is one forward pass: a prefill of the
requests admitted at that step (their first token) or a decode of every running row. After
sampling, the softmax statistics of the step are written into a device buffer; the only
host read per step is the [B] sampled tokens, which stopping (EOS, stop strings) and
streaming need anyway. A sequence's statistics cross to the host once, when it finishes.

Admission is first come, first served, within `max_batch` rows and a token budget: left
padding makes the KV cache rows x the longest row, so the budget bounds rows x the longest
(prompt + max_tokens) of the batch. A step that raises fails the requests it held (StepFailed,
their Completions with finish_reason "error"); the waiting requests stay queued.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .admission import PromptLimits
from .completion import Completion, DecodingParams, InvalidRequest, TokenLogprobs, prompt_key, summarize
from .host import keep_freed_memory
from .models import LoadedModel
from .detokenize import IncrementalText
from .sampling import NONFINITE_FILL, RowParams, keep_min_logit, sample, sanitize
from .stats import COLUMN, FIELDS, softmax_stats


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: DecodingParams
    seed: int
    created: float
    started: float  # perf_counter at submission
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    text: str | None = None  # set when a stop string cut it
    decoded: IncrementalText | None = None  # with stop strings: text_so_far, searched as it grows
    text_so_far: str = ""
    on_token: Callable[[int, TokenLogprobs | None], None] | None = None
    logprobs: list[TokenLogprobs] | None = None
    fault: str | None = None  # an injected logit fault (FAULTS), tests and drills only


class StepFailed(RuntimeError):
    """A step raised. `failed` holds a Completion (finish_reason "error") for every request the
    step held; the engine has dropped them and is empty but for the waiting requests."""

    def __init__(self, failed: list[Completion], cause: BaseException):
        super().__init__(f"decode step failed: {type(cause).__name__}: {cause}")
        self.failed = failed
        self.cause = cause


class Engine:
    """Continuous-batching decode over one model. Not thread-safe: one caller drives `step()`
    (and `submit`, `cancel`); `prepare` touches no engine state and may run on any thread."""

    def __init__(
        self,
        lm: LoadedModel,
        max_batch: int = 32,
        instrument: bool = True,
        stats_backend: str = "auto",
        max_prompt_tokens: int | None = None,
        max_batch_tokens: int | None = None,
    ):
        keep_freed_memory()
        self.lm = lm
        self.max_batch = max_batch
        self.limits = PromptLimits.of(lm, max_batch, max_prompt_tokens, max_batch_tokens)
        self.instrument = instrument
        self.stats_backend = stats_backend
        self._eos = lm.eos_token_ids
        self._waiting: list[_Sequence] = []
        self._rows: list[_Sequence] = []
        self._ids = itertools.count()
        self._cache = None
        self._mask = self._last = self._steps = self._stats = None
        self._params: RowParams | None = None
        # the LM head's weight when the engine runs the head itself (see head_logits), else None
        self._head = lm.model.get_output_embeddings().weight if type(lm.model).__name__ in PLAIN_HEAD_MODELS else None

    # ---- requests -------------------------------------------------------------------------
    def prepare(
        self,
        prompt: str | list[dict] | list[int],
        params: DecodingParams = DecodingParams(),
        chat: bool = False,
        fault: str | None = None,
    ) -> list[int]:
        """Validate a request and return its prompt's token ids; InvalidRequest names the field.
        Touches no engine state, so tokenization and templating can run off the decode thread."""
        if fault is not None and fault not in FAULTS:
            raise InvalidRequest("softwatch.inject_fault", f"must be one of {', '.join(FAULTS)}, got {fault!r}")
        return self.limits.prepare(prompt, params, chat)

    def submit(
        self,
        prompt: str | list[dict] | list[int],
        params: DecodingParams = DecodingParams(),
        chat: bool = False,
        request_id: str | None = None,
        on_token: Callable[[int, TokenLogprobs | None], None] | None = None,
        fault: str | None = None,
    ) -> str:
        """Queue a request; it joins the running batch when it fits (see `step`). Returns its id.
        `on_token(token_id, logprobs)` is called for each token as it is emitted (streaming);
        `logprobs` is None unless the request asked for them. `fault` (one of FAULTS) corrupts
        this request's logits at every step, to drill the alerting path end to end.
        A prompt already `prepare`d may be passed as its token ids (checked again, cheaply)."""
        ids = self.prepare(prompt, params, chat, fault)
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        wants_logprobs = params.logprobs or params.top_logprobs > 0
        self._waiting.append(_Sequence(rid, ids, params, seed, time.time(), time.perf_counter(), on_token=on_token,
                                       logprobs=[] if wants_logprobs else None, fault=fault))
        return rid

    def cancel(self, request_id: str, reason: str = "cancelled") -> Completion | None:
        """Stop a request between steps (its client went away, or it timed out). It retires with
        finish_reason `reason` and what it generated so far (nothing, if it was still waiting);
        None if the engine does not hold it."""
        for i, seq in enumerate(self._waiting):
            if seq.request_id == request_id:
                del self._waiting[i]
                return self._completion(seq, reason, torch.empty(0, len(FIELDS)) if self.instrument else None)
        for i, seq in enumerate(self._rows):
            if seq.request_id == request_id:
                return self._retire([(i, reason)])[0]
        return None

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def close(self) -> None:
        """Nothing outside this object to release (the vLLM engine has: its handoff)."""

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._waiting)

    def generate(
        self, prompts: list, params: DecodingParams = DecodingParams(), chat: bool = False
    ) -> list[Completion]:
        """Run prompts to completion; results in prompt order."""
        ids = [self.submit(p, params, chat) for p in prompts]
        done: dict[str, Completion] = {}
        while self.has_work():
            for c in self.step():
                done[c.request_id] = c
        return [done[i] for i in ids]

    # ---- the loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """One forward pass: prefill newly admitted requests, or decode every running row.
        Raises StepFailed (carrying their error Completions) when the step fails."""
        admitted = self._admit()
        held = self._rows + admitted
        try:
            if admitted:
                return self._prefill(admitted)
            if self._rows:
                return self._decode()
            return []
        except Exception as exc:  # noqa: BLE001 - whatever broke, the held requests must end
            raise StepFailed(self._fail(held), exc) from exc

    def _admit(self) -> list[_Sequence]:
        """Waiting requests, first come first served, that fit the free rows and the token budget."""
        admitted: list[_Sequence] = []
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
            batch = self._rows + admitted + [self._waiting[0]]
            footprint = len(batch) * max(len(s.prompt_ids) + s.params.max_tokens for s in batch)
            if footprint > self.limits.max_batch_tokens and len(batch) > 1:
                break  # it waits for rows to leave; nothing behind it jumps the queue
            admitted.append(self._waiting.pop(0))
        return admitted

    def _fail(self, held: list[_Sequence]) -> list[Completion]:
        """Error Completions of the requests a failed step held, and an empty batch. The
        statistics gathered so far are kept where the buffer can still be read, else NaN rows."""
        failed = []
        for seq in held:
            stats = None
            if self.instrument:
                stats = torch.full((len(seq.generated), len(FIELDS)), float("nan"))
                try:
                    stats = self._stats[self._rows.index(seq), : len(seq.generated)].float().cpu()
                except Exception:  # noqa: BLE001 - not merged yet, or the device is gone
                    pass
            failed.append(self._completion(seq, "error", stats))
        self._keep([])
        return failed

    def _prefill(self, seqs: list[_Sequence]) -> list[Completion]:
        device = self.lm.device
        length = max(len(s.prompt_ids) for s in seqs)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (length - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=device)
        mask = torch.tensor([[0] * (length - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs],
                            device=device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits, cache = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions)
        params = RowParams(
            temperature=tuple(float(s.params.temperature) for s in seqs),
            top_k=tuple(s.params.top_k for s in seqs),
            top_p=tuple(float(s.params.top_p) for s in seqs),
            seed=tuple(s.seed for s in seqs),
            device=str(device),
        )
        cap = max(s.params.max_tokens for s in seqs)
        stats = torch.empty(len(seqs), cap, len(FIELDS), device=device) if self.instrument else None
        steps = torch.zeros(len(seqs), dtype=torch.long, device=device)
        if self._rows:
            self._merge(seqs, cache, mask, params, steps, stats)
        else:
            self._rows, self._cache, self._mask, self._params = list(seqs), cache, mask, params
            self._steps, self._stats = steps, stats
        first = len(self._rows) - len(seqs)
        return self._advance(logits, slice(first, None))

    def _decode(self) -> list[Completion]:
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        positions = (mask.sum(dim=1, keepdim=True) - 1)
        logits, self._cache = self._forward(input_ids=self._last[:, None], attention_mask=mask,
                                            position_ids=positions, past_key_values=self._cache)
        self._mask = mask
        return self._advance(logits, slice(None))

    def _forward(self, **inputs) -> tuple[torch.Tensor, object]:
        """The [B, V] logits of each row's last position, and the KV cache."""
        if self._head is not None:
            out = self.lm.model.get_decoder()(**inputs, use_cache=True)
            return head_logits(out.last_hidden_state[:, -1], self._head), out.past_key_values
        out = self.lm.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def _advance(self, logits: torch.Tensor, rows: slice) -> list[Completion]:
        """Sample the rows' next tokens, record their statistics, emit them, and retire finished rows."""
        params = self._params if rows == slice(None) else self._params.select(range(len(self._rows))[rows])
        steps = self._steps[rows]
        seqs = self._rows[rows]
        if any(s.fault for s in seqs):
            logits = _inject_faults(logits, seqs)
        x = sanitize(logits)
        keep_min = keep_min_logit(x, params)
        tokens = sample(x, params, steps, keep_min)
        if self.instrument:
            self._record_stats(logits, tokens, params, keep_min, rows, steps)
        tokens = torch.where(x.amax(dim=1) <= NONFINITE_FILL, -1, tokens)  # all non-finite: the row cannot go on
        self._append(tokens, rows)
        top_n = max((s.params.top_logprobs for s in seqs if s.logprobs is not None), default=-1)
        logprobs = _logprobs(x, tokens, top_n) if top_n >= 0 else None
        finished = self._emit(tokens, logprobs, top_n, rows.start or 0)
        return self._retire(finished) if finished else []

    def _record_stats(self, logits: torch.Tensor, tokens: torch.Tensor, params: RowParams, keep_min: torch.Tensor,
                      rows: slice, steps: torch.Tensor) -> None:
        """The step's statistics into each row's slot of the device buffer."""
        stats = softmax_stats(logits, tokens, params, keep_min, backend=self.stats_backend)
        batch = torch.arange(self._stats.shape[0], device=stats.device)[rows]
        self._stats[batch, steps.clamp(max=self._stats.shape[1] - 1)] = stats

    def _append(self, tokens: torch.Tensor, rows: slice) -> None:
        """The step's tokens become the rows' next input; their step counts advance."""
        if rows == slice(None):
            self._last = tokens
        else:
            self._last = torch.cat([self._last[: rows.start], tokens]) if rows.start else tokens
        self._steps[rows] += 1

    def _emit(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, top_n: int, first: int) -> list[tuple[int, str]]:
        """Bring the step's tokens (and logprobs) to the host, hand each to its sequence and its
        streaming callback; the (row, finish reason) of rows that finished."""
        now = time.perf_counter()
        finished: list[tuple[int, str]] = []
        host = torch.cat([tokens[:, None].float(), logprobs], dim=1) if logprobs is not None else tokens[:, None]
        for i, row in enumerate(host.tolist(), start=first):  # the one host sync of the step
            seq, token = self._rows[i], int(row[0])
            if seq.first_token_at is None:
                seq.first_token_at = now
            reason = self._stop_reason(seq, token)
            if token >= 0:
                entry = None
                if seq.logprobs is not None:
                    n = seq.params.top_logprobs
                    entry = TokenLogprobs(row[1], [(int(t), v) for t, v in zip(row[2 + top_n:2 + top_n + n], row[2:2 + n])])
                    seq.logprobs.append(entry)
                if seq.on_token is not None:
                    seq.on_token(token, entry)
            if reason:
                finished.append((i, reason))
        return finished

    def _stop_reason(self, seq: _Sequence, token: int) -> str | None:
        if token < 0:
            return "error"
        seq.generated.append(token)
        if token in self._eos and not seq.params.ignore_eos:
            return "stop"
        if seq.params.stop and self._stop_string_ends(seq, token):
            return "stop"
        if len(seq.generated) >= seq.params.max_tokens:
            return "length"
        return None

    def _stop_string_ends(self, seq: _Sequence, token: int) -> bool:
        """Does the text now hold a stop string? Then seq.text is cut before the first one. Only
        the new text (and the end of the old that a stop string could span) is searched."""
        if seq.decoded is None:
            seq.decoded = IncrementalText(self.lm.tokenizer)
        searched = max(len(seq.text_so_far) - max(map(len, seq.params.stop)) + 1, 0)
        seq.text_so_far += seq.decoded.push(token)
        tail = seq.text_so_far[searched:]
        found = [tail.find(s) for s in seq.params.stop if s in tail]
        if found:
            seq.text = seq.text_so_far[:searched + min(found)]
        return bool(found)

    # ---- batch bookkeeping ----------------------------------------------------------------
    def _retire(self, finished: list[tuple[int, str]]) -> list[Completion]:
        """Completions of the finished rows, which leave the batch."""
        done = []
        for i, reason in finished:
            seq = self._rows[i]
            stats = None
            if self.instrument:
                taken = len(seq.generated) + (reason == "error")  # a dead row's last step was recorded, emitted nothing
                stats = self._stats[i, :taken].float().cpu()  # the one copy of this sequence
            done.append(self._completion(seq, reason, stats))
        gone = {i for i, _ in finished}
        self._keep([i for i in range(len(self._rows)) if i not in gone])
        return done

    def _completion(self, seq: _Sequence, reason: str, stats: torch.Tensor | None) -> Completion:
        """The finished sequence; `stats` are its host statistics rows (one more than its tokens
        when its last step emitted nothing: that row counts only toward nonfinite and overflow)."""
        now = time.perf_counter()
        n = len(seq.generated)
        extra = None
        if stats is not None:
            stats, extra = stats[:n], stats[n:]
        summary = summarize(
            stats,
            extra[:, COLUMN["nonfinite"]].sum() if extra is not None else 0.0,
            extra[:, COLUMN["overflow"]].sum() if extra is not None else 0.0,
        )
        text = seq.text if seq.text is not None else self.lm.tokenizer.decode(seq.generated, skip_special_tokens=True)
        ttft = (seq.first_token_at or now) - seq.started
        summary.update(prompt_tokens=len(seq.prompt_ids), generated_tokens=n, finish_reason=reason,
                       ttft_s=ttft, latency_s=now - seq.started)
        return Completion(
            request_id=seq.request_id, text=text, token_ids=list(seq.generated),
            prompt_tokens=len(seq.prompt_ids), finish_reason=reason, stats=stats, summary=summary,
            regime=seq.params.regime(self.lm.model_id, self.lm.model_rev), created=seq.created, ttft_s=ttft, latency_s=now - seq.started,
            logprobs=seq.logprobs, prompt_key=prompt_key(seq.prompt_ids),
        )

    def _keep(self, index: list[int]) -> None:
        """Shrink the running batch to the rows at `index`, dropping padding no row needs."""
        if not index:
            self._rows, self._cache, self._params = [], None, None
            self._mask = self._last = self._steps = self._stats = None
            return
        idx = torch.tensor(index, device=self._mask.device)
        self._rows = [self._rows[i] for i in index]
        self._params = self._params.select(index)
        self._last, self._steps = self._last[idx], self._steps[idx]
        if self._stats is not None:
            self._stats = self._stats[idx]
        lengths = [len(s.prompt_ids) + len(s.generated) - 1 for s in self._rows]  # cached tokens
        drop = self._mask.shape[1] - max(lengths)
        self._mask = self._mask[idx, drop:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, drop:]
            layer.values = layer.values[idx, :, drop:]

    def _merge(self, seqs, cache, mask, params, steps, stats) -> None:
        """Append prefilled rows to the running batch, left-padding both to one cache length."""
        length = max(self._mask.shape[1], mask.shape[1])
        self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        self._rows += seqs
        self._params = RowParams.concat([self._params, params])
        self._steps = torch.cat([self._steps, steps])
        if self.instrument:
            cap = max(self._stats.shape[1], stats.shape[1])
            self._stats = torch.cat([_right_pad(self._stats, cap), _right_pad(stats, cap)])


PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
"""Causal LMs whose logits are exactly a bias-free lm_head applied to the decoder's last hidden
state, so the engine can run the head itself."""


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] @ weight[V, H].T. On the CPU as (weight @ hidden.T).T: for a few rows MKL's
    GEMM reads the [V, H] weight about twice as fast in that orientation (SmolLM2's head at
    batch 8: 15 ms instead of 23.5 ms, a sixth of a decode step)."""
    if hidden.is_cuda:
        return torch.nn.functional.linear(hidden, weight)
    return torch.mm(weight, hidden.t()).t().contiguous()


FAULTS = ("nonfinite", "overflow")
FAULTY_LOGITS = 4


def _inject_faults(logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
    """A copy of the logits with FAULTY_LOGITS entries of each faulty row replaced: NaN and
    ±Inf ("nonfinite"), or a large negative finite value ("overflow", beyond the fp32 exp bound
    but never sampled). The rest of the row is untouched, so generation goes on."""
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        if seq.fault == "nonfinite":
            logits[i, :FAULTY_LOGITS] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])[:FAULTY_LOGITS]
        elif seq.fault == "overflow":
            logits[i, :FAULTY_LOGITS] = -1000.0
    return logits


def _logprobs(x: torch.Tensor, tokens: torch.Tensor, top_n: int) -> torch.Tensor:
    """[B, 1 + 2 top_n]: log q(token), then the top_n log q values, then their token ids
    (exact in fp32 below 2^24), to travel to the host with the step's tokens."""
    log_q = torch.log_softmax(x, dim=-1)
    chosen = log_q.gather(1, tokens.clamp(min=0)[:, None])
    top = log_q.topk(top_n, dim=-1) if top_n > 0 else None
    parts = [chosen] + ([top.values, top.indices.float()] if top is not None else [])
    return torch.cat(parts, dim=1)


def _left_pad(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _right_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[1]
    return t if missing == 0 else torch.cat([t, t.new_zeros(t.shape[0], missing, t.shape[2])], dim=1)
