"""What a request's prompt becomes before an engine takes it: token ids (text, chat messages
through the model's template, or ids), checked against the model's context and a deployment's
limits. Shared by softwatch's engine and the vLLM engine; touches no engine state, so it runs
off the decode thread."""

from __future__ import annotations

from dataclasses import dataclass

from .completion import DecodingParams, InvalidRequest


@dataclass(frozen=True)
class PromptLimits:
    lm: object  # tokenizer, vocab_size, model_id and context_length (a LoadedModel or vLLM's ServedLM)
    max_prompt_tokens: int
    max_batch_tokens: int  # rows x longest (prompt + max_tokens) of a batch: the KV cache's size in tokens

    @classmethod
    def of(cls, lm, max_batch: int, max_prompt_tokens: int | None = None,
           max_batch_tokens: int | None = None) -> PromptLimits:
        context = lm.context_length
        return cls(lm, min(max_prompt_tokens or context, context), max_batch_tokens or max_batch * context)

    def encode(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, chat messages ([{"role", "content"}]) or ids."""
        tok = self.lm.tokenizer
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.lm.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
            return list(prompt)
        if isinstance(prompt, list) or chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not messages:
                raise InvalidRequest("messages", "must not be empty")
            if not getattr(tok, "chat_template", None):
                raise InvalidRequest("messages", f"model {self.lm.model_id} has no chat template")
            return self._apply_chat_template(messages)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt", "must be a non-empty string")
        return tok(prompt)["input_ids"]

    def prepare(self, prompt: str | list[dict] | list[int], params: DecodingParams, chat: bool = False) -> list[int]:
        """Validate a request and return its prompt's token ids; InvalidRequest names the field."""
        params.validate()
        ids = self.encode(prompt, chat)
        field = "messages" if chat or isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt) else "prompt"
        context = self.lm.context_length
        if not ids:
            raise InvalidRequest(field, "encodes to no tokens")
        if len(ids) >= context:
            raise InvalidRequest(field, f"is {len(ids)} tokens; the model's context is {context}")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(field, f"is {len(ids)} tokens; this deployment accepts at most {self.max_prompt_tokens}")
        if len(ids) + params.max_tokens > context:
            raise InvalidRequest(
                "max_tokens",
                f"{params.max_tokens} plus the prompt's {len(ids)} tokens exceeds the model's context of {context}",
            )
        if len(ids) + params.max_tokens > self.max_batch_tokens:
            raise InvalidRequest(
                "max_tokens",
                f"{params.max_tokens} plus the prompt's {len(ids)} tokens exceeds this deployment's token budget "
                f"of {self.max_batch_tokens}",
            )
        return ids

    def _apply_chat_template(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            ids = self.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # the template refuses these messages (e.g. roles out of order)
            raise InvalidRequest("messages", f"the chat template refused them: {exc}") from exc
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
