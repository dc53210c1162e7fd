"""VLLMEngine, softwatch's engine interface over vLLM's in-process engine: what a request's
caller gets when the observer's completion is lost, a step fails or a request is cancelled
early; the unobserved baseline; seeds and temperatures as vLLM decodes them."""

import time

import pytest
import torch

from softwatch.completion import SEED_RANGE, Completion, DecodingParams
from softwatch.engine import StepFailed
from softwatch.stats import FIELDS
from softwatch.vllm.engine import HANDOFF_GRACE_S, VLLMEngine

MODEL = "SmolLM2-135M-Instruct"
OVERRIDES = {"enforce_eager": True, "max_model_len": 512}
GREEDY = DecodingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["What is a unit test?", "Name three colours"]


@pytest.fixture(scope="module")
def engine():
    """The observed engine of this module's tests."""
    yield from running(VLLMEngine(MODEL, max_batch=4, **OVERRIDES))


@pytest.fixture(scope="module")
def baseline():
    """The unobserved engine (a benchmark's baseline), shut down with `engine` at the module's
    end: shutting an in-process vLLM engine down tears down the process's distributed state,
    which every engine in the process shares."""
    yield from running(VLLMEngine(MODEL, max_batch=4, observe=False, **OVERRIDES))


def running(vllm_engine: VLLMEngine):
    yield vllm_engine
    vllm_engine.close()
    vllm_engine._engine.engine_core.shutdown()  # now, not when collected: a later module's engine may be running then


@pytest.fixture(scope="module")
def greedy_reference(engine) -> dict[str, Completion]:
    return run_to_end(engine, {f"reference-{i}": (p, GREEDY) for i, p in enumerate(PROMPTS)})


def run_to_end(engine, requests: dict[str, tuple[str, DecodingParams]], timeout_s: float = 120.0) -> dict[str, Completion]:
    for request_id, (prompt, params) in requests.items():
        engine.submit(prompt, params, request_id=request_id)
    return drain(engine, timeout_s)


def drain(engine, timeout_s: float = 120.0) -> dict[str, Completion]:
    done, deadline = {}, time.monotonic() + timeout_s
    while engine.has_work():
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        done.update((c.request_id, c) for c in engine.step())
    return done


def assert_freed(engine) -> None:
    """vLLM holds no request of ours: none to output, none scheduled, no KV cache block used."""
    core = engine._engine.engine_core.engine_core
    assert not engine.has_work()
    assert not engine._engine.has_unfinished_requests()
    assert not core.scheduler.requests
    assert core.scheduler.kv_cache_manager.usage == 0.0


def lose_the_observer_s_completions(monkeypatch, engine) -> None:
    """The observer fails to hand completions over (it logs the failure and goes on)."""
    def failing(completion, prompt=None):
        raise RuntimeError("injected: the handoff failed")
    monkeypatch.setattr(engine.handoff, "record", failing)


def test_a_request_whose_completion_the_observer_never_hands_over_is_answered_without_statistics(
        engine, greedy_reference, monkeypatch):
    lose_the_observer_s_completions(monkeypatch, engine)
    started = time.monotonic()
    c = run_to_end(engine, {"lost": (PROMPTS[0], GREEDY)})["lost"]
    reference = greedy_reference["reference-0"]
    assert time.monotonic() - started >= HANDOFF_GRACE_S
    assert c.finish_reason == "length"
    assert (c.token_ids, c.text) == (reference.token_ids, reference.text)  # the caller's answer
    assert c.stats.shape == (8, len(FIELDS)) and torch.isnan(c.stats).all()
    assert c.summary["generated_tokens"] == 8 and c.summary["finish_reason"] == "length"
    assert c.regime == reference.regime
    assert_freed(engine)


def test_observe_false_decodes_the_same_greedy_tokens_without_statistics(baseline, greedy_reference):
    done = run_to_end(baseline, {f"baseline-{i}": (p, GREEDY) for i, p in enumerate(PROMPTS)})
    for i in range(len(PROMPTS)):
        c, reference = done[f"baseline-{i}"], greedy_reference[f"reference-{i}"]
        assert (c.token_ids, c.text, c.finish_reason) == (reference.token_ids, reference.text, "length")
        assert c.stats is None
        assert set(c.summary) == {"finish_reason", "generated_tokens", "prompt_tokens", "ttft_s", "latency_s"}
        assert c.regime == reference.regime


def test_a_request_cancelled_before_it_is_scheduled_ends_empty_and_frees_its_place(engine, greedy_reference):
    engine.submit(PROMPTS[0], GREEDY, request_id="early")
    engine.cancel("early", reason="timeout")
    c = drain(engine)["early"]
    assert (c.finish_reason, c.token_ids, c.text) == ("timeout", [], "")
    assert c.stats.shape == (0, len(FIELDS))
    assert c.summary["generated_tokens"] == 0 and c.summary["finish_reason"] == "timeout"
    assert c.prompt_tokens == greedy_reference["reference-0"].prompt_tokens
    assert_freed(engine)
    again = run_to_end(engine, {"after-early": (PROMPTS[0], GREEDY)})["after-early"]
    assert again.token_ids == greedy_reference["reference-0"].token_ids


def test_an_error_in_vllm_s_step_fails_every_request_it_held_and_aborts_them_in_vllm(
        engine, greedy_reference, monkeypatch):
    for i, prompt in enumerate(PROMPTS):
        engine.submit(prompt, DecodingParams(temperature=0, max_tokens=200, ignore_eos=True), request_id=f"held-{i}")
    for _ in range(3):
        assert engine.step() == []  # both decode, holding KV cache blocks
    executor = engine._engine.engine_core.engine_core.model_executor

    def failing(*args, **kwargs):
        raise RuntimeError("injected: the model runner failed")
    monkeypatch.setattr(executor, "execute_model", failing)
    with pytest.raises(StepFailed) as failure:
        engine.step()
    monkeypatch.undo()
    failed = {c.request_id: c for c in failure.value.failed}
    assert set(failed) == {"held-0", "held-1"}
    for i in range(len(PROMPTS)):
        c = failed[f"held-{i}"]
        assert c.finish_reason == "error" and 1 <= len(c.token_ids) <= 3
        assert c.token_ids == greedy_reference[f"reference-{i}"].token_ids[: len(c.token_ids)]
        assert torch.isnan(c.stats).all()
    assert_freed(engine)
    again = run_to_end(engine, {"after-failure": (PROMPTS[1], GREEDY)})["after-failure"]
    assert again.token_ids == greedy_reference["reference-1"].token_ids


@pytest.mark.parametrize("seed", [SEED_RANGE[0], -1, 0, SEED_RANGE[1]])
def test_every_accepted_seed_samples_the_same_tokens_twice(engine, seed):
    hot = DecodingParams(temperature=2.0, max_tokens=12, ignore_eos=True, seed=seed)
    done = run_to_end(engine, {f"seeded-{seed}-a": (PROMPTS[1], hot), f"seeded-{seed}-b": (PROMPTS[1], hot)})
    assert done[f"seeded-{seed}-a"].token_ids == done[f"seeded-{seed}-b"].token_ids


def test_different_seeds_sample_different_tokens(engine):
    seeds = [-1, 0, 1, 12345]  # distinct in their low 32 bits, all vLLM's CPU sampler uses
    runs = {f"distinct-{seed}": (PROMPTS[1], DecodingParams(temperature=2.0, max_tokens=12, ignore_eos=True,
                                                            seed=seed)) for seed in seeds}
    done = run_to_end(engine, runs)
    assert len({tuple(c.token_ids) for c in done.values()}) == len(seeds)


def test_temperatures_vllm_raises_to_0_01_are_recorded_as_0_01_whoever_completes_them(engine, monkeypatch):
    """vLLM samples any temperature in (0, 0.01) at 0.01: the records say so, and those
    requests share 0.01's regime, whether the observer or the engine completes them."""
    decoded_as = DecodingParams(temperature=0.01).regime("", "")
    expected = {k: decoded_as[k] for k in ("params_id", "temperature", "top_p", "top_k")}
    observed = run_to_end(engine, {"cold": (PROMPTS[0], DecodingParams(temperature=0.003, max_tokens=4, seed=1))})
    lose_the_observer_s_completions(monkeypatch, engine)
    bare = run_to_end(engine, {"cold-bare": (PROMPTS[0], DecodingParams(temperature=0.007, max_tokens=4, seed=1))})
    for c in (observed["cold"], bare["cold-bare"]):
        assert {k: c.regime[k] for k in expected} == expected
    assert torch.isnan(bare["cold-bare"].stats).all()
