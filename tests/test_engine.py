import pytest
import torch

from softwatch.completion import SEED_RANGE, prompt_key
from softwatch.engine import DecodingParams, Engine, InvalidRequest, StepFailed
from softwatch.models import tiny_model
from softwatch.stats import COLUMN

GREEDY = DecodingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["a", "hello there, general", "the quick brown fox jumps over", "xyz"]


def run_to_end(engine, requests):
    done = {}
    for rid, (prompt, params) in requests.items():
        engine.submit(prompt, params, request_id=rid)
    while engine.has_work():
        for c in engine.step():
            done[c.request_id] = c
    return done


def test_batched_greedy_equals_one_at_a_time(tiny):
    alone = [Engine(tiny, max_batch=1).generate([p], GREEDY)[0] for p in PROMPTS]
    together = Engine(tiny).generate(PROMPTS, GREEDY)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.stats, b.stats, rtol=1e-4, atol=1e-4)


def test_requests_join_and_leave_between_steps(tiny):
    engine = Engine(tiny)
    reference = {p: Engine(tiny, max_batch=1).generate([p], GREEDY)[0].token_ids for p in PROMPTS}
    engine.submit(PROMPTS[0], GREEDY, request_id="first")
    short = DecodingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.submit(PROMPTS[3], short, request_id="short")
    done = {}
    for i in range(40):
        if i == 4:
            engine.submit(PROMPTS[2], GREEDY, request_id="late")  # joins while others decode
        if i == 6:
            engine.submit(PROMPTS[1], GREEDY, request_id="later")
        for c in engine.step():
            done[c.request_id] = c
        if not engine.has_work():
            break
    assert done["first"].token_ids == reference[PROMPTS[0]]
    assert done["late"].token_ids == reference[PROMPTS[2]]
    assert done["later"].token_ids == reference[PROMPTS[1]]
    assert done["short"].token_ids == reference[PROMPTS[3]][:3]
    assert done["short"].finish_reason == "length"


def test_completion_carries_stats_summary_and_regime(tiny):
    params = DecodingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=10, seed=3, ignore_eos=True)
    c = Engine(tiny).generate(["hello"], params)[0]
    assert c.stats.shape == (10, 10) and len(c.token_ids) == 10
    logprob = c.stats[:, COLUMN["logprob"]].double()
    assert c.summary["perplexity"] == pytest.approx(torch.exp(-logprob.mean()).item(), rel=1e-6)
    assert c.summary["generated_tokens"] == 10 and c.summary["prompt_tokens"] == 5
    assert c.summary["max_entropy"] >= c.summary["mean_entropy"] > 0
    assert 0 < c.summary["ttft_s"] <= c.summary["latency_s"]
    assert c.regime == {"model_id": tiny.model_id, "model_rev": tiny.model_rev, "params_id": params.params_id,
                        "temperature": 0.8, "top_p": 0.9, "top_k": 20, "template_version": "v1"}
    records = c.token_records(tiny.tokenizer)
    assert [r["id"] for r in records] == c.token_ids and isinstance(records[0]["rank"], int)


def test_params_id_names_the_regime_not_the_request():
    a = DecodingParams(temperature=0.7, max_tokens=5, seed=1)
    assert a.params_id == DecodingParams(temperature=0.7, max_tokens=99, seed=2, stop=("x",)).params_id
    assert a.params_id != DecodingParams(temperature=0.8).params_id
    assert a.params_id != DecodingParams(temperature=0.7, template_version="v2").params_id
    # greedy ignores the filters it never uses
    assert DecodingParams(temperature=0, top_p=0.5).params_id == DecodingParams(temperature=0, top_k=9).params_id


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    params = DecodingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=42, ignore_eos=True)
    a = Engine(tiny).generate(PROMPTS, params)
    b = Engine(tiny).generate(PROMPTS[::-1], params)[::-1]
    c = Engine(tiny, max_batch=1).generate(PROMPTS[1:2], params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert a[1].token_ids == c[0].token_ids


@pytest.mark.parametrize("seed", [SEED_RANGE[0], -1, 0, SEED_RANGE[1]])
def test_every_accepted_seed_samples_the_same_tokens_twice(tiny, seed):
    params = DecodingParams(temperature=2.0, max_tokens=12, ignore_eos=True, seed=seed)
    done = run_to_end(Engine(tiny), {"a": ("hello", params), "b": ("hello", params)})
    assert done["a"].token_ids == done["b"].token_ids


def test_different_seeds_sample_different_tokens(tiny):
    seeds = [SEED_RANGE[0], -1, 0, 1, SEED_RANGE[1]]
    runs = {f"s{seed}": ("hello", DecodingParams(temperature=2.0, max_tokens=12, ignore_eos=True, seed=seed))
            for seed in seeds}
    done = run_to_end(Engine(tiny), runs)
    assert len({tuple(c.token_ids) for c in done.values()}) == len(seeds)


def test_stop_strings_eos_and_max_tokens():
    lm = tiny_model(seed=0, logit_scale=30.0)
    eos = lm.tokenizer.eos_token_id
    engine = Engine(lm)
    free = engine.generate(["hello"], DecodingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = free.text
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_at = text[3:5]
    cut = engine.generate(["hello"], DecodingParams(temperature=0, max_tokens=20, stop=(stop_at,)))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop_at)]
    with torch.no_grad():
        lm.model.lm_head.weight[eos] = lm.model.lm_head.weight.abs().max() * 50
    stopped = engine.generate(["hello"], DecodingParams(temperature=0, max_tokens=20))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == [eos] and stopped.text == ""


def test_nonfinite_logits_are_counted_and_a_dead_row_ends_with_error():
    lm = tiny_model(seed=0)
    tilde = lm.tokenizer("~")["input_ids"][0]
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[tilde] = float("nan")  # any prompt with '~' yields NaN logits
        lm.model.lm_head.weight[100] = float("inf")  # one logit overflows to +-inf (or NaN) every step
    engine = Engine(lm)
    params = DecodingParams(temperature=0.7, max_tokens=6, ignore_eos=True, seed=0)
    good, bad = engine.generate(["hello", "he~llo"], params)
    assert bad.finish_reason == "error" and bad.token_ids == [] and bad.summary["nonfinite"] == lm.vocab_size
    assert good.finish_reason == "length" and len(good.token_ids) == 6
    assert good.summary["nonfinite"] == 6 and torch.isfinite(good.stats[:, COLUMN["entropy"]]).all()
    assert 100 not in good.token_ids


@pytest.mark.parametrize("params,field", [
    (DecodingParams(temperature=-0.1), "temperature"),
    (DecodingParams(temperature=float("nan")), "temperature"),
    (DecodingParams(top_p=0.0), "top_p"),
    (DecodingParams(top_p=1.5), "top_p"),
    (DecodingParams(top_k=-1), "top_k"),
    (DecodingParams(max_tokens=0), "max_tokens"),
    (DecodingParams(max_tokens=10_000), "max_tokens"),
    (DecodingParams(stop=("",)), "stop"),
])
def test_bad_parameters_are_refused_naming_the_field(tiny, params, field):
    with pytest.raises(InvalidRequest) as err:
        Engine(tiny).submit("hello", params)
    assert err.value.field == field


def test_bad_prompts_are_refused(tiny):
    engine = Engine(tiny)
    for prompt, field in [("", "prompt"), ([], "messages"), ("x" * 600, "prompt")]:
        with pytest.raises(InvalidRequest) as err:
            engine.submit(prompt, DecodingParams(max_tokens=1))
        assert err.value.field == field
    assert not engine.has_work()


def test_token_id_prompts_outside_the_vocabulary_are_refused(tiny):
    engine = Engine(tiny)
    for ids in ([1, tiny.vocab_size], [-1, 5]):
        with pytest.raises(InvalidRequest, match="token ids") as err:
            engine.submit(ids, DecodingParams(max_tokens=2))
        assert err.value.field == "prompt"


def test_chat_prompts_use_the_chat_template(tiny):
    engine = Engine(tiny)
    ids = engine.limits.encode([{"role": "user", "content": "hi"}])
    assert tiny.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.limits.encode("hi", chat=True) == ids


def test_smollm2_greedy_equals_transformers_generate(smollm2):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived a"]
    params = DecodingParams(temperature=0, max_tokens=32)
    completions = Engine(smollm2).generate(prompts, params)
    tok = smollm2.tokenizer
    for prompt, c in zip(prompts, completions):
        inputs = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = smollm2.model.generate(**inputs, max_new_tokens=32, do_sample=False)
        assert c.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()[: len(c.token_ids)]
        # logprob equals a teacher-forced forward pass over the same text
        full = torch.tensor([inputs["input_ids"][0].tolist() + c.token_ids])
        with torch.inference_mode():
            log_q = smollm2.model(full).logits[0].double().log_softmax(-1)
        n = inputs["input_ids"].shape[1]
        forced = torch.stack([log_q[n - 1 + i, t] for i, t in enumerate(c.token_ids)])
        assert (forced - c.stats[:, COLUMN["logprob"]].double()).abs().max() < 1e-3


def test_streaming_callback_and_logprobs_match_the_statistics(tiny):
    engine = Engine(tiny, max_batch=4)
    streamed = []
    engine.submit("hello", DecodingParams(max_tokens=6, top_logprobs=4, seed=5, ignore_eos=True), request_id="lp",
                  on_token=lambda token, lp: streamed.append((token, lp)))
    engine.submit("other", DecodingParams(max_tokens=9, seed=6), request_id="plain")
    done = {}
    while engine.has_work():
        done.update((c.request_id, c) for c in engine.step())
    c = done["lp"]
    assert [t for t, _ in streamed] == c.token_ids and [lp for _, lp in streamed] == c.logprobs
    for entry, row in zip(c.logprobs, c.stats):
        assert entry.logprob == pytest.approx(row[COLUMN["logprob"]].item(), abs=1e-5)
        assert len(entry.top) == 4 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
        assert entry.top[0][1] == pytest.approx(torch.log(row[COLUMN["top_prob"]]).item(), abs=1e-5)
    assert done["plain"].logprobs is None


def test_cancel_retires_a_running_request_and_a_waiting_one(tiny):
    engine = Engine(tiny, max_batch=1)
    engine.submit("a", DecodingParams(max_tokens=50, ignore_eos=True), request_id="running")
    engine.submit("b", DecodingParams(max_tokens=50), request_id="waiting")
    engine.step()
    engine.step()
    waited = engine.cancel("waiting", reason="timeout")
    assert waited.finish_reason == "timeout" and waited.token_ids == [] and waited.stats.shape[0] == 0
    c = engine.cancel("running")
    assert c.finish_reason == "cancelled" and len(c.token_ids) == 2 and c.stats.shape[0] == 2
    assert not engine.has_work() and engine.cancel("running") is None


def test_injected_logit_faults_are_counted_and_generation_goes_on(tiny):
    from softwatch.engine import FAULTY_LOGITS

    engine = Engine(tiny)
    params = DecodingParams(temperature=1.0, max_tokens=6, seed=1, ignore_eos=True)
    ids = {fault: engine.submit("abc", params, fault=fault) for fault in ("nonfinite", "overflow", None)}
    done = {}
    while engine.has_work():
        done.update({c.request_id: c for c in engine.step()})
    for fault, rid in ids.items():
        c = done[rid]
        assert c.finish_reason == "length" and len(c.token_ids) == 6
        assert c.summary["nonfinite"] == (6 * FAULTY_LOGITS if fault == "nonfinite" else 0)
        assert c.summary["overflow"] >= (6 * FAULTY_LOGITS if fault == "overflow" else 0)
        if fault:
            assert not set(c.token_ids) & set(range(FAULTY_LOGITS))  # the corrupted logits are never sampled
    with pytest.raises(InvalidRequest, match="inject_fault"):
        engine.submit("abc", params, fault="gamma-rays")


def test_instrumented_generate_matches_the_engine(tiny, tmp_path):
    import softwatch
    from softwatch.store import Store

    watch = softwatch.instrument(tiny.model, tiny.tokenizer, model_id="tiny", data=str(tmp_path))
    inputs = tiny.tokenizer(["hello there", "hello there"], return_tensors="pt")
    sequences = watch.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert sequences.shape == (2, inputs["input_ids"].shape[1] + 6)
    (c, _) = watch.completions
    reference = Engine(tiny).generate(["hello there"], DecodingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert c.token_ids == reference.token_ids
    assert torch.allclose(c.stats, reference.stats, atol=1e-4)
    assert c.summary["perplexity"] == pytest.approx(reference.summary["perplexity"], rel=1e-4)
    assert c.regime["params_id"] == reference.regime["params_id"]  # greedy: the same regime as the engine's
    watch.close()
    assert Store(str(tmp_path)).rows("SELECT count(*) AS n FROM tokens") == [{"n": 12}]


def break_attention(lm):
    """A real failure of the forward pass: a projection whose shape no longer fits. Returns the undo."""
    proj = lm.model.model.layers[0].self_attn.q_proj
    weight = proj.weight
    proj.weight = torch.nn.Parameter(torch.zeros(3, 5))
    return lambda: setattr(proj, "weight", weight)


def test_a_failed_step_fails_the_requests_it_held_and_keeps_the_waiting_ones():
    lm = tiny_model(seed=0)
    engine = Engine(lm, max_batch=2)
    params = DecodingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = Engine(lm).generate(PROMPTS[:3], params)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.submit(prompt, params, request_id=f"r{i}")
    engine.step()
    engine.step()  # r0 and r1 run, two tokens each; r2 waits for a row
    repair = break_attention(lm)
    with pytest.raises(StepFailed) as failure:
        engine.step()
    failed = {c.request_id: c for c in failure.value.failed}
    assert set(failed) == {"r0", "r1"} and isinstance(failure.value.cause, RuntimeError)
    for rid, ref in zip(("r0", "r1"), reference):
        c = failed[rid]
        assert c.finish_reason == "error" and c.token_ids == ref.token_ids[:2]
        torch.testing.assert_close(c.stats, ref.stats[:2], rtol=1e-4, atol=1e-4)  # what they had is kept
        assert c.summary["generated_tokens"] == 2 and c.summary["finish_reason"] == "error"
    assert engine.running == 0 and engine.waiting == 1
    with pytest.raises(StepFailed) as failure:  # a failing prefill fails the request it admitted
        engine.step()
    assert [(c.request_id, c.token_ids) for c in failure.value.failed] == [("r2", [])]
    repair()
    engine.submit(PROMPTS[2], params, request_id="again")
    assert run_to_end(engine, {})["again"].token_ids == reference[2].token_ids  # the engine serves on


def test_admission_keeps_the_padded_batch_within_the_token_budget(tiny):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 6  # ~265 tokens: one row pads every row to it
    params = DecodingParams(temperature=0, max_tokens=10, ignore_eos=True)
    budget = 300
    engine = Engine(tiny, max_batch=8, max_batch_tokens=budget)
    rids = [engine.submit(p, params) for p in [PROMPTS[0], long_prompt, *PROMPTS[1:]]]
    done, footprints = {}, []
    while engine.has_work():
        for c in engine.step():
            done[c.request_id] = c
        rows = engine._rows
        footprints.append(len(rows) * max((len(s.prompt_ids) + s.params.max_tokens for s in rows), default=0))
    assert max(footprints) <= budget and max(footprints) > budget // 2
    alone = {p: Engine(tiny, max_batch=1).generate([p], params)[0].token_ids for p in [long_prompt, *PROMPTS]}
    assert [done[r].token_ids for r in rids] == [alone[p] for p in [PROMPTS[0], long_prompt, *PROMPTS[1:]]]
    with pytest.raises(InvalidRequest, match="token budget") as err:  # could never fit, even alone
        engine.submit(long_prompt, DecodingParams(max_tokens=100))
    assert err.value.field == "max_tokens"


def test_prompt_limits_name_the_field_the_prompt_came_in(tiny):
    engine = Engine(tiny, max_prompt_tokens=20)
    with pytest.raises(InvalidRequest, match="at most 20") as err:
        engine.submit("y" * 21, DecodingParams(max_tokens=1))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="at most 20") as err:
        engine.submit([{"role": "user", "content": "y" * 10}], DecodingParams(max_tokens=1))  # 10 + the template's
    assert err.value.field == "messages"
    with pytest.raises(InvalidRequest, match="context") as err:
        Engine(tiny).submit("x" * 600, DecodingParams(max_tokens=1), chat=True)
    assert err.value.field == "messages"
    assert not engine.has_work()


ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


def test_a_chat_template_that_raises_is_the_requests_invalid_messages():
    lm = tiny_model(seed=0)
    lm.tokenizer.chat_template = ALTERNATING_TEMPLATE
    engine = Engine(lm)
    assert engine.prepare([{"role": "user", "content": "hi"}], chat=True)
    with pytest.raises(InvalidRequest, match="roles must alternate") as err:
        engine.prepare([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], chat=True)
    assert err.value.field == "messages" and not engine.has_work()


def stored_prompt_keys(root, request_ids: list[str]) -> list[str | None]:
    """The prompt_key of each request's sequences row in the dataset at `root`."""
    from softwatch.store import Store

    rows = Store(str(root)).rows("SELECT request_id, prompt_key FROM sequences")
    keys = {r["request_id"]: r["prompt_key"] for r in rows}
    return [keys[rid] for rid in request_ids]


def test_the_engine_s_sequences_carry_the_key_of_their_prompt_s_token_ids(tiny, tmp_path):
    from softwatch.records import RecordContext
    from softwatch.store import ParquetSink

    params = DecodingParams(temperature=0.9, max_tokens=3, ignore_eos=True)
    prompts = ["hello there", "xyz", "hello there"]
    done = run_to_end(Engine(tiny), {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    with ParquetSink(str(tmp_path)) as sink:
        for c in done.values():
            sink.write_completion(c, RecordContext())
    keys = stored_prompt_keys(tmp_path, [f"r{i}" for i in range(len(prompts))])
    assert keys == [prompt_key(tiny.tokenizer.encode(p)) for p in prompts]
    assert keys[0] == keys[2] != keys[1]


def test_instrumented_sequences_carry_the_key_of_their_unpadded_prompt(tiny, tmp_path):
    import softwatch

    watch = softwatch.instrument(tiny.model, tiny.tokenizer, model_id="tiny", data=str(tmp_path))
    prompts = ["hello there", "a"]
    inputs = tiny.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    watch.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2, pad_token_id=0)
    watch.close()
    keys = stored_prompt_keys(tmp_path, [c.request_id for c in watch.completions])
    expected = [prompt_key(tiny.tokenizer.encode(p)) for p in prompts]
    assert keys == [expected[0], expected[0], expected[1], expected[1]]  # generate groups a prompt's sequences
