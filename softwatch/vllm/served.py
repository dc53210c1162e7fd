"""The served model as records name it: model_id, model_rev of the weights and dtype vLLM
serves, and the tokenizer (loaded only when text is needed: stop strings, stored text)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..models import checkpoint_digest, model_rev
from .settings import ObserverSettings


@dataclass
class ServedModel:
    model_id: str
    model_rev: str
    tokenizer_path: str
    max_model_len: int

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)


def served_model(vllm_config, settings: ObserverSettings) -> ServedModel:
    config = vllm_config.model_config
    path = Path(config.model)
    if path.is_dir():
        digest = checkpoint_digest(path)
    else:  # a hub id: name and revision are all there is to hash without the files
        digest = hashlib.blake2b(f"{config.model}@{config.revision}".encode(), digest_size=16).hexdigest()
    served_name = config.served_model_name if isinstance(config.served_model_name, str) else None
    model_id = settings.model_id or (served_name if served_name and served_name != config.model else path.name)
    return ServedModel(model_id, model_rev(digest, config.dtype), str(config.tokenizer), int(config.max_model_len))
