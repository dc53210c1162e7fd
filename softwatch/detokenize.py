"""Text of a growing token sequence, decoded incrementally: each token decodes only a short
window of recent ids (the way vLLM's and HF's incremental detokenizers do), so a long output
costs the same per token as a short one."""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", ()))  # decoded as "": kept out of the window
        self.tokens: list[int] = []
        # tokens[prefix_offset:read_offset] are decoded again as context of the new ones (a
        # tokenizer may render a token differently at the start of a text); the text of
        # tokens[:read_offset] has been returned
        self.prefix_offset = self.read_offset = 0

    def push(self, token: int) -> str:
        """The text this token completes: "" while it ends in a partial UTF-8 character (or is a
        skipped special token)."""
        if token in self.special:  # else a run of them would widen the window without end
            return ""
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        window = self.tokenizer.decode(self.tokens[self.prefix_offset:], skip_special_tokens=True)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return window[len(prefix):]
