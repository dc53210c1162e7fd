"""The softwatch observer: a vLLM V1 logits processor that computes every token field of
DESIGN.md inside vLLM's decode step and records each request when it leaves the batch.

vLLM calls, per step: `update_state` (batch changes; the tokens sampled by the previous step
are in each request's live output list by then), the forward pass, then `apply(logits)` with
the [num_reqs, V] fp32 logits before sampling. `apply` keeps a copy of the logits and returns
them untouched; the next `update_state` reads the tokens that were drawn from them and
computes the statistics of the whole step in one `softmax_stats` call, which stay on the
device until the request finishes. vLLM runs one more step after the last request finishes
to clear it from the batch, so the final token and aborted requests are recorded too.

Which distribution: the observer runs after vLLM's request-level constraints (allowed token
ids, bad words, min_tokens, logit_bias) and before penalties, temperature, min_p, top-k and
top-p. Without those constraints q is the model's distribution exactly. pi is
softmax(x / T) on vLLM's sampling set (min_p, top-k, then top-p renormalized; see
`sampling_set`); for requests with repetition, frequency or presence penalties, which vLLM
applies after every logits processor, the sampling fields are NaN: the observer cannot see
the distribution that was sampled.
"""

from __future__ import annotations

import logging
import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..host import keep_freed_memory
from ..records import RecordContext
from ..recorder import Recorder
from ..sampling import RowParams, sanitize
from ..stats import COLUMN, softmax_stats
from .requests import RequestIds, TrackedRequest
from .sampling_set import keep_min_logit
from .settings import ObserverSettings

log = logging.getLogger("softwatch.vllm")

SAMPLING_COLUMNS = [COLUMN["sampling_entropy"], COLUMN["sampling_logprob"]]


class _Step:
    """The logits of one `apply` and the requests of its rows, until their tokens are known."""

    def __init__(self, logits: torch.Tensor, rows: list[TrackedRequest | None]):
        self.logits = logits
        self.rows = rows
        self.positions = [len(r.output) if r is not None else -1 for r in rows]
        self.at = time.perf_counter()


class SoftwatchObserver(LogitsProcessor):
    """Observes every row of every step; changes no logit."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from .served import served_model

        keep_freed_memory()
        self.settings = ObserverSettings.from_additional_config(vllm_config.additional_config)
        self.model = served_model(vllm_config, self.settings)
        context = RecordContext(deployment=self.settings.deployment, replica=self.settings.replica_id,
                                store_text=self.settings.store_text)
        self.recorder = _recorder(self.settings, context)
        self._rows: dict[int, TrackedRequest] = {}
        self._step: _Step | None = None
        self._buffer = torch.empty(0, device=device)
        self._ids = RequestIds()

    def is_argmax_invariant(self) -> bool:
        return False  # vLLM skips argmax-invariant processors on greedy batches

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rows:
            self._step = _Step(self._copy(logits), [self._rows.get(i) for i in range(logits.shape[0])])
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._resolve()
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._finish(self._rows.pop(index, None))
        for index, params, prompt, output in batch_update.added:
            self._finish(self._rows.pop(index, None))  # an added request may take a finished one's slot
            self._rows[index] = TrackedRequest(self._ids.next(params), params, prompt, output, self.model)
        for a, b, direction in batch_update.moved:
            moving, there = self._rows.pop(a, None), self._rows.pop(b, None)
            if moving is not None:
                self._rows[b] = moving
            if direction == MoveDirectionality.SWAP:
                if there is not None:
                    self._rows[a] = there
            else:  # a one-way move lands on the slot of a request that left
                self._finish(there)

    # ---- the statistics of a step ------------------------------------------------------------
    def _copy(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits in a buffer of ours: vLLM scales and masks its own tensor in place."""
        if self._buffer.numel() < logits.numel():
            self._buffer = torch.empty(logits.numel(), dtype=logits.dtype, device=logits.device)
        return self._buffer[: logits.numel()].view(logits.shape).copy_(logits)

    def _resolve(self) -> None:
        """Statistics of the last observed step, now that its tokens are in the output lists."""
        step, self._step = self._step, None
        if step is None:
            return
        index, tokens, owners = [], [], []
        for i, (request, position) in enumerate(zip(step.rows, step.positions)):
            # a row whose request is still in a chunked prefill samples nothing; -1 is a placeholder
            if request is not None and len(request.output) > position and request.output[position] >= 0:
                index.append(i)
                tokens.append(request.output[position])
                owners.append(request)
        if not owners:
            return
        logits = step.logits if len(index) == len(step.rows) else step.logits[index]
        stats = _step_stats(logits, tokens, owners)
        for request, row in zip(owners, stats.unbind(0)):
            request.observe(row, step.at)

    # ---- finished requests --------------------------------------------------------------------
    def _finish(self, request: TrackedRequest | None) -> None:
        if request is None:
            return
        try:
            completion, prompt = request.completion(self.settings)
            self.recorder.record(completion, prompt)
        except Exception:  # noqa: BLE001 - observing must never break vLLM's step
            log.exception("softwatch: recording request %s failed", request.request_id)

    def __del__(self):
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.close()


def _step_stats(logits: torch.Tensor, tokens: list[int], owners: list[TrackedRequest]) -> torch.Tensor:
    """[len(owners), F] statistics of the rows, against vLLM's sampling set."""
    params = [r.params for r in owners]
    rows = RowParams(
        temperature=tuple(r.temperature for r in owners),
        top_k=tuple(max(p.top_k, 0) for p in params),
        top_p=tuple(p.top_p for p in params),
        seed=(0,) * len(params),
        device=str(logits.device),
        min_p=tuple(p.min_p for p in params),
    )
    if rows.any_filtered:
        keep_min = keep_min_logit(sanitize(logits), rows)
    else:
        keep_min = torch.full((len(owners),), float("-inf"), device=logits.device)
    token_ids = torch.tensor(tokens, device=logits.device)
    stats = softmax_stats(logits, token_ids, rows, keep_min)
    penalized = [r.penalized for r in owners]
    if any(penalized):
        mask = torch.tensor(penalized, device=stats.device)[:, None]
        stats[:, SAMPLING_COLUMNS] = torch.where(mask, float("nan"), stats[:, SAMPLING_COLUMNS])
    return stats


def _recorder(settings: ObserverSettings, context: RecordContext) -> Recorder:
    from ..store import ParquetSink
    from ..telemetry import Telemetry

    root = settings.data_root
    sink = ParquetSink(root, token_sample_rate=settings.token_sample_rate, flush_interval_s=settings.flush_interval_s)
    telemetry = Telemetry(settings.metrics, instance_id=context.replica, data_root=root, host=settings.metrics_host,
                          port=settings.metrics_port)
    return Recorder(context, sink, telemetry)
