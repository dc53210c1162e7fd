"""A test-only vLLM logits processor placed before the observer: it corrupts the logits of
requests that ask for it (extra_args {"inject_fault": "nonfinite" | "overflow"}), so the
observer's counts can be checked on logits vLLM really carried."""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

FAULTY = {"nonfinite": [float("nan"), float("inf"), float("-inf"), float("nan")], "overflow": [-1000.0] * 4}


class FaultInjector(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory):
        self.faults: dict[int, str] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.faults.pop(index, None)
        for index, params, _, _ in batch_update.added:
            self.faults.pop(index, None)
            fault = (params.extra_args or {}).get("inject_fault")
            if fault:
                self.faults[index] = fault
        for a, b, direction in batch_update.moved:
            fa, fb = self.faults.pop(a, None), self.faults.pop(b, None)
            if fa:
                self.faults[b] = fa
            if fb and direction == MoveDirectionality.SWAP:
                self.faults[a] = fb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, fault in self.faults.items():
            logits[index, : len(FAULTY[fault])] = torch.tensor(FAULTY[fault], device=logits.device)
        return logits
