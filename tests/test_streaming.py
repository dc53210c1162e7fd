"""Streaming in the OpenAI-compatible layer: the replica's incremental text deltas, and how a
multi-choice stream starts (every choice admitted first) and ends (an error event, no [DONE])."""

import pytest

from softwatch.serve.llm import _TextStream

MULTIBYTE = ("Hello 世界! 🎉🎉 naïve café — 日本語のテキスト 👍🏽 family: 👨‍👩‍👧 flag: 🇯🇵 "
             "Ελληνικά, русский, עברית, हिन्दी. The end.")


class CountingTokenizer:
    """A tokenizer whose decode calls are counted by how many ids each one decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, _TextStream]:
    text = _TextStream(tokenizer, stop)
    return "".join(text.push(token) for token in ids), text


def test_streamed_multibyte_text_equals_the_full_decode(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids)  # characters split across tokens
    streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE


def test_a_special_token_inside_the_output_streams_as_the_full_decode_does(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode("before 🎉", add_special_tokens=False) + [tokenizer.eos_token_id] + \
        tokenizer.encode(" after 世界", add_special_tokens=False)
    streamed, _ = stream(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == "before 🎉 after 世界"


@pytest.mark.parametrize("stop", ["日本語", "🎉", "The end", "Hello", "."])
def test_a_stop_string_is_never_streamed_and_the_rest_completes_the_text(smollm2, stop):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    final = MULTIBYTE[:MULTIBYTE.index(stop)]  # the engine's text: cut before the stop string
    streamed, text = stream(tokenizer, ids, (stop, "never there"))
    assert stop not in streamed and final.startswith(streamed)
    assert streamed + final[text.sent_chars:] == final  # what "done" adds


def test_per_token_decoding_work_does_not_grow_with_the_output(smollm2):
    tokenizer = CountingTokenizer(smollm2.tokenizer)
    ids = smollm2.tokenizer.encode(MULTIBYTE * 40, add_special_tokens=False)
    assert len(ids) > 2000
    streamed, _ = stream(tokenizer, ids, ("never there",))
    assert streamed + MULTIBYTE[-len("never there") + 1:] == MULTIBYTE * 40
    assert max(tokenizer.decoded_lengths) <= 8  # a window of recent ids, not the whole output
    assert sum(tokenizer.decoded_lengths) <= 8 * len(ids)
