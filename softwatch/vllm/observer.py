"""The softwatch observer: a vLLM V1 logits processor that computes every token field of
DESIGN.md inside vLLM's decode step and records each request when it is done.

vLLM calls, per step: `update_state` (batch changes; the tokens sampled by the previous step
are in each request's live output list by then), the forward pass, then `apply(logits)` with
the [num_reqs, V] fp32 logits before sampling. `apply` keeps a copy of the logits and returns
them untouched; the next `update_state` reads the tokens that were drawn from them and
computes the statistics of the whole step in one `softmax_stats` call, which stay on the
device until the request is recorded. A greedy batch on the CPU whose logits are finite and
within the overflow bound needs no token (vLLM takes an argmax of exactly these logits, and no
field depends on which): `apply` computes its statistics at once with `greedy_stats`.

A request leaves the persistent batch when it finishes or is aborted, but also while it is
preempted or not scheduled in a step; then it comes back with the same output list. vLLM's
model runner drops its own state of a request (and so its reference to the output list) before
it updates the batch when the request is done, and keeps it otherwise. A request that left is
recorded when nothing but the observer holds its output list, or when its tokens show that it
is done (a stop token, its length, a stop string: vLLM may still hold the list a step longer);
otherwise it is parked until it comes back or is released (checked at every step, and every
PARKED_CHECK_S by a thread of the observer's: an engine with nothing left to run calls no hook
once it let go of an aborted request). A recorded request whose list comes
back (a stop string the API process has not aborted yet) is not followed again. vLLM
runs one more step after requests finish to clear them from the batch, so the last token and
aborted requests are seen; requests still followed when the process exits are recorded as
cancelled.

Which distribution: the observer runs after vLLM's request-level constraints (allowed token
ids, bad words, min_tokens, logit_bias, a structured-output grammar) and before penalties,
temperature, min_p, top-k and top-p. Without those constraints q is the model's distribution
exactly. pi is softmax(x / T) on vLLM's sampling set (min_p, top-k, then top-p renormalized;
see `sampling_set`); for requests with repetition, frequency or presence penalties, which vLLM
applies after every logits processor, the sampling fields are NaN.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import sys
import threading
import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..host import keep_freed_memory
from ..records import RecordContext
from ..recorder import Recorder
from ..sampling import RowParams, sanitize
from ..stats import COLUMN, greedy_stats, softmax_stats
from .handoff import Handoff, registered
from .requests import RequestIds, TrackedRequest
from .sampling_set import keep_min_logit
from .settings import ObserverSettings

log = logging.getLogger("softwatch.vllm")

SAMPLING_COLUMNS = [COLUMN["sampling_entropy"], COLUMN["sampling_logprob"]]
PARKED_STEPS = 100_000
"""A backstop: steps a request that left the batch may stay parked while something else still
holds its output list."""
OUR_REFERENCES = 2  # TrackedRequest.output and sys.getrefcount's own argument
PARKED_CHECK_S = 0.5


class _Step:
    """One `apply`: the requests of its rows and either a copy of the logits, kept until the
    tokens drawn from them are known, or (greedy batches on the CPU) the statistics already
    computed for the argmax tokens vLLM is about to take."""

    def __init__(self, rows: list[TrackedRequest | None], logits: torch.Tensor | None = None,
                 stats: torch.Tensor | None = None):
        self.rows = rows
        self.logits, self.stats = logits, stats
        self.positions = [len(r.output) if r is not None else -1 for r in rows]
        self.at = time.perf_counter()


class SoftwatchObserver(LogitsProcessor):
    """Observes every row of every step; changes no logit."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from .served import served_model

        _refuse_unsupported(vllm_config)
        keep_freed_memory()
        self.settings = ObserverSettings.from_additional_config(vllm_config.additional_config)
        self.model = served_model(vllm_config, self.settings)
        context = RecordContext(deployment=self.settings.deployment, replica=self.settings.replica_id,
                                store_text=self.settings.store_text)
        self.recorder = _recorder(self.settings, context)
        self._rows: dict[int, TrackedRequest] = {}
        self._parked: dict[int, tuple[TrackedRequest, int]] = {}  # id(output list) -> (request, update count)
        self._recorded: dict[int, list[int]] = {}  # output lists recorded while vLLM still held them
        self._updates = 0
        self._step: _Step | None = None
        self._buffer = torch.empty(0, device=device)
        self._ids = RequestIds()
        self._row_params: tuple[list[TrackedRequest], RowParams] | None = None  # per batch composition
        # vLLM takes the argmax of exactly the logits the observer sees only if nothing after it
        # changes them: no later custom processor, no reasoning budget that forces tokens
        later = (vllm_config.model_config.logits_processors or [])[-1:]
        self._greedy_is_argmax = (getattr(vllm_config, "reasoning_config", None) is None
                                  and (not later or _names_observer(later[0])))
        self._failed = False
        self._closed = False
        self._lock = threading.Lock()  # the batch state, between vLLM's thread and the parked-request watcher
        threading.Thread(target=self._watch_parked, name="softwatch-parked", daemon=True).start()
        atexit.register(self.close)
        # forked workers leave through os._exit, which skips atexit but runs multiprocessing's finalizers
        multiprocessing.util.Finalize(self, self.close, exitpriority=10)

    def is_argmax_invariant(self) -> bool:
        return False  # vLLM skips argmax-invariant processors on greedy batches

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rows and not self._failed:
            self._guarded(self._observe, logits)
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self._failed:
            with self._lock:
                self._guarded(self._update, batch_update)

    def _watch_parked(self) -> None:
        while not self._closed:
            time.sleep(PARKED_CHECK_S)
            if self._parked and not self._failed:
                with self._lock:
                    self._guarded(lambda _: self._expire_parked(), None)

    def _guarded(self, method, argument) -> None:
        """Run a hook; an error turns the observer off instead of failing vLLM's step."""
        try:
            method(argument)
        except Exception:  # noqa: BLE001
            log.exception("softwatch: the observer failed and stops observing; vLLM goes on")
            self._failed = True

    def _observe(self, logits: torch.Tensor) -> None:
        rows = [self._rows.get(i) for i in range(logits.shape[0])]
        if logits.device.type == "cpu" and self._greedy_is_argmax and all(r is not None and r.argmax_decoded for r in rows):
            # vLLM will take an argmax of each row, and no field depends on which: the statistics
            # need no copy, no waiting and no token, provided every logit is finite and in bound
            # (else the argmax may be a NaN or an infinity). CPU only: the check reads the host.
            stats = greedy_stats(logits)
            if stats is not None:
                self._step = _Step(rows, stats=stats)
                return
        self._step = _Step(rows, logits=self._copy(logits))

    def _update(self, batch_update: BatchUpdate | None) -> None:
        self._resolve()
        self._updates += 1
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        self._expire_parked()

    def close(self) -> None:
        """Record what is still followed (as cancelled), then flush records and metrics."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._failed:
                self._guarded(lambda _: self._resolve(), None)  # the last step's tokens may be in by now
            for request in [*self._rows.values(), *(r for r, _ in self._parked.values())]:
                self._record(request)
            self._rows.clear()
            self._parked.clear()
        self.recorder.close()

    # ---- the batch ---------------------------------------------------------------------------
    def _apply_batch_update(self, update: BatchUpdate) -> None:
        """vLLM's order: removed, added, moved. A slot that an added request or a one-way move
        fills may have held a request that left without being listed as removed."""
        for index in update.removed:
            self._leave(self._rows.pop(index, None))
        for index, params, prompt, output in update.added:
            self._leave(self._rows.pop(index, None))
            if id(output) in self._recorded:
                continue  # done already; vLLM has not let go of it yet
            parked = self._parked.pop(id(output), None)
            self._rows[index] = parked[0] if parked else TrackedRequest(self._ids.next(params), params, prompt,
                                                                        output, self.model)
        for a, b, direction in update.moved:
            moving, there = self._rows.pop(a, None), self._rows.pop(b, None)
            if moving is not None:
                self._rows[b] = moving
            if direction == MoveDirectionality.SWAP:
                if there is not None:
                    self._rows[a] = there
            else:
                self._leave(there)

    def _leave(self, request: TrackedRequest | None) -> None:
        if request is None:
            return
        if _released(request):
            self._record(request)
        elif request.done():
            self._recorded[id(request.output)] = request.output
            self._record(request)
        else:  # preempted or not scheduled this step: it comes back
            self._parked[id(request.output)] = (request, self._updates)

    def _expire_parked(self) -> None:
        for key, output in list(self._recorded.items()):
            if sys.getrefcount(output) <= OUR_REFERENCES + 1:  # + the reference in self._recorded
                del self._recorded[key]
        if not self._parked:
            return
        for key, (request, since) in list(self._parked.items()):
            if _released(request) or self._updates - since > PARKED_STEPS:
                del self._parked[key]
                self._record(request)

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
        index, positions, owners = [], [], []
        for i, (request, position) in enumerate(zip(step.rows, step.positions)):
            # a row whose request is still in a chunked prefill samples nothing
            if request is not None and len(request.output) > position:
                index.append(i)
                positions.append(position)
                owners.append(request)
        if not owners:
            return
        if step.stats is None:
            logits = step.logits if len(index) == len(step.rows) else step.logits[index]
            tokens = [r.output[p] for r, p in zip(owners, positions)]
            stats = self._stats(logits, torch.tensor(tokens, device=logits.device), owners)
        else:
            stats = step.stats if len(index) == len(step.rows) else step.stats[index]
        for request, position, row in zip(owners, positions, stats.unbind(0)):
            request.observe(position, row, step.at)

    def _stats(self, logits: torch.Tensor, token_ids: torch.Tensor, owners: list[TrackedRequest]) -> torch.Tensor:
        cached = self._row_params
        if cached is None or len(cached[0]) != len(owners) or any(a is not b for a, b in zip(cached[0], owners)):
            cached = self._row_params = (list(owners), _row_params(owners, logits.device))  # a new batch composition
        return _step_stats(logits, token_ids, owners, cached[1])

    # ---- recording ----------------------------------------------------------------------------
    def _record(self, request: TrackedRequest) -> None:
        try:
            completion, prompt = request.completion(self.settings)
            self.recorder.record(completion, prompt)
        except Exception:  # noqa: BLE001 - observing must never break vLLM's step
            log.exception("softwatch: recording request %s failed", request.request_id)


def _refuse_unsupported(vllm_config) -> None:
    """Configurations in which a logits row is not one request's one sampled token."""
    parallel, scheduler = vllm_config.parallel_config, vllm_config.scheduler_config
    problems = []
    if getattr(scheduler, "async_scheduling", False):
        problems.append("asynchronous scheduling (the sampled tokens are placeholders when the observer reads them): "
                        "pass --no-async-scheduling / async_scheduling=False")
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        problems.append("tensor or pipeline parallelism (every rank would record every request)")
    if problems:
        raise ValueError("softwatch observer: unsupported " + "; ".join(problems))


def _row_params(owners: list[TrackedRequest], device: torch.device) -> RowParams:
    params = [r.params for r in owners]
    return RowParams(
        temperature=tuple(r.temperature for r in owners),
        top_k=tuple(max(p.top_k, 0) for p in params),
        top_p=tuple(p.top_p for p in params),
        seed=(0,) * len(params),
        device=str(device),
        min_p=tuple(p.min_p for p in params),
    )


def _released(request: TrackedRequest) -> bool:
    """vLLM no longer holds the request's output list: it finished or was aborted."""
    return sys.getrefcount(request.output) <= OUR_REFERENCES


def _names_observer(processor) -> bool:
    name = processor if isinstance(processor, str) else f"{processor.__module__}:{processor.__qualname__}"
    return name.endswith("SoftwatchObserver")


def _step_stats(logits: torch.Tensor, token_ids: torch.Tensor, owners: list[TrackedRequest],
                rows: RowParams) -> torch.Tensor:
    """[len(owners), F] statistics of the rows for the tokens [len(owners)], against vLLM's sampling set."""
    if rows.any_filtered:
        x = sanitize(logits)
        # fp32 rounding at a boundary must not leave out the token vLLM drew
        keep_min = torch.minimum(keep_min_logit(x, rows), x.gather(1, token_ids[:, None]).squeeze(1))
    else:
        keep_min = torch.full((len(owners),), float("-inf"), device=logits.device)
    stats = softmax_stats(logits, token_ids, rows, keep_min)
    penalized = [r.penalized for r in owners]
    if any(penalized):
        mask = torch.tensor(penalized, device=stats.device)[:, None]
        stats[:, SAMPLING_COLUMNS] = torch.where(mask, float("nan"), stats[:, SAMPLING_COLUMNS])
    return stats


def _recorder(settings: ObserverSettings, context: RecordContext) -> Recorder | Handoff:
    from ..store import ParquetSink, journal_dir
    from ..telemetry import Telemetry

    if settings.handoff:
        return registered(settings.handoff)
    root = settings.data_root
    # vLLM shuts its engine down in its own order on SIGTERM; the sink closes with the observer
    sink = ParquetSink(root, token_sample_rate=settings.token_sample_rate, flush_interval_s=settings.flush_interval_s,
                       flush_on_sigterm=False, journal=journal_dir(root, settings.journal))
    telemetry = Telemetry(settings.metrics, instance_id=context.replica, data_root=root, host=settings.metrics_host,
                          port=settings.metrics_port)
    return Recorder(context, sink, telemetry)
