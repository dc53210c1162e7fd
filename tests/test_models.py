import time

import pytest
import torch

from softwatch.models import ModelNotFoundError, byte_tokenizer, load_model, tiny_model


def test_model_rev_is_a_content_hash_of_weights_and_served_dtype():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert a.model_rev == b.model_rev
    assert tiny_model(seed=1).model_rev != a.model_rev
    assert tiny_model(seed=0, dtype="bfloat16").model_rev != a.model_rev
    with torch.no_grad():
        b.model.lm_head.weight[0, 0] += 1e-3
    from softwatch.models import model_rev, weights_digest

    assert model_rev(weights_digest(b.model), b.dtype) != a.model_rev


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "héllo wörld 🙂\n\t<|im_start|> ~"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 259


def test_unknown_models_fail_fast_with_a_clear_error():
    for name in ["no-such-org/no-such-model", "./no/such/dir", "/nonexistent.gguf"]:
        start = time.monotonic()
        with pytest.raises(ModelNotFoundError) as err:
            load_model(name)
        assert time.monotonic() - start < 10
        assert name in str(err.value)


def test_bad_device_and_dtype_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            load_model("tiny-random", device="cuda")


def test_default_model_loads_from_its_cache(smollm2):
    again = load_model("smollm2", device="cpu")
    assert again.model_rev == smollm2.model_rev
    assert smollm2.model_id == "SmolLM2-135M-Instruct"
    assert smollm2.context_length == 8192 and smollm2.vocab_size == 49152
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu"
    start = time.monotonic()
    load_model("SmolLM2-135M-Instruct", device="cpu")
    assert time.monotonic() - start < 5  # the GGUF is converted once, not per load
