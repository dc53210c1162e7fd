import math
import os

import pytest
import torch

from .reference import reference_stats
from softwatch.sampling import RowParams, keep_min_logit, sample, sanitize
from softwatch.stats import COLUMN, FIELDS, greedy_stats, softmax_stats, triton_available

# The Triton kernel runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if (torch.cuda.is_available() or INTERPRETED) and triton_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(logits, tokens, temperature, top_k, top_p, backend):
    b = logits.shape[0]
    rows = RowParams(tuple(temperature), tuple(top_k), tuple(top_p), tuple(range(b)), DEVICE)
    logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
    return softmax_stats(logits, tokens, rows, backend=backend).double().cpu()


def assert_matches(got, want, rtol=1e-5, atol=1e-6):
    assert got.shape == want.shape
    for j, name in enumerate(FIELDS):
        g, w = got[:, j], want[:, j]
        same_nonfinite = torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(torch.isinf(g), torch.isinf(w))
        assert same_nonfinite, f"{name}: {g} vs {w}"
        ok = torch.isfinite(w)
        assert torch.equal(g[~ok & ~torch.isnan(w)], w[~ok & ~torch.isnan(w)]), name
        torch.testing.assert_close(g[ok], w[ok], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def params_grid(b):
    temps = [0.0, 0.5, 1.0, 1.7]
    ks = [0, 1, 5, 0]
    ps = [1.0, 0.9, 1.0, 1e-6]
    return ([temps[i % 4] for i in range(b)], [ks[(i // 4) % 4] for i in range(b)], [ps[(i // 2) % 4] for i in range(b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 4.0, 30.0])
@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_random_logits_match_float64(backend, scale, vocab):
    g = torch.Generator().manual_seed(vocab + int(scale))
    b = 16
    logits = torch.randn(b, vocab, generator=g) * scale
    tokens = torch.randint(0, vocab, (b,), generator=g)
    t, k, p = params_grid(b)
    # the sampled token must lie in the sampling set, as the sampler guarantees
    rows = RowParams(tuple(t), tuple(k), tuple(p), tuple(range(b)))
    tokens = sample(sanitize(logits), rows, torch.zeros(b, dtype=torch.long))
    assert_matches(run(logits, tokens, t, k, p, backend), reference_stats(logits, tokens, t, k, p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_tokens_including_outside_the_sampling_set(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=g) * 3
    tokens = torch.randint(0, 300, (8,), generator=g)
    t, k, p = [0.8] * 8, [3] * 8, [1.0] * 8
    got = run(logits, tokens, t, k, p, backend)
    assert_matches(got, reference_stats(logits, tokens, t, k, p))
    outside = got[:, COLUMN["rank"]] >= 3
    assert outside.any() and torch.isinf(got[outside, COLUMN["sampling_logprob"]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 5000, generator=g) * 1e4
    logits[0, :] = 1e4  # flat at an extreme value
    logits[1, 7] = -1e4
    tokens = torch.randint(0, 5000, (8,), generator=g)
    tokens[1] = 7
    t, k, p = [1.0, 0.7, 0.0, 1.0, 2.0, 1.0, 0.3, 1.0], [0, 0, 0, 5, 0, 1, 0, 0], [1.0, 0.9, 1.0, 1.0, 0.5, 1.0, 1.0, 1e-6]
    got = run(logits, tokens, t, k, p, backend)
    want = reference_stats(logits, tokens, t, k, p)
    assert_matches(got, want)
    assert got[0, COLUMN["entropy"]] == pytest.approx(math.log(5000), rel=1e-6)
    assert (got[:, COLUMN["overflow"]] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_high_temperature_over_logits_wider_than_the_exp_floor(backend):
    # x - max x reaches -600: at T = 50 those tokens weigh exp(-12), not exp(-87 / 50)
    g = torch.Generator().manual_seed(5)
    logits = torch.rand(4, 2000, generator=g) * 600 - 300
    tokens = torch.randint(0, 2000, (4,), generator=g)
    t, k, p = [50.0, 1000.0, 50.0, 3.0], [0, 0, 0, 0], [1.0, 1.0, 0.5, 1.0]
    rows = RowParams(tuple(t), tuple(k), tuple(p), tuple(range(4)))
    tokens = sample(sanitize(logits), rows, torch.zeros(4, dtype=torch.long))
    assert_matches(run(logits, tokens, t, k, p, backend), reference_stats(logits, tokens, t, k, p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_distribution_keeps_relative_precision(backend):
    # top_prob ~ 1 - 1e-6: entropy ~ 1e-5 must still be exact to 1e-5 relative
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 20.0
    logits[1, 1:] = torch.linspace(-5, 5, 999)
    tokens = torch.tensor([0, 0])
    got = run(logits, tokens, [1.0, 1.0], [0, 0], [1.0, 1.0], backend)
    want = reference_stats(logits, tokens, [1.0, 1.0], [0, 0], [1.0, 1.0])
    assert_matches(got, want, atol=0)
    assert 0 < got[0, COLUMN["entropy"]] < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_are_counted_and_isolated(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 500, generator=g) * 3
    logits[1, 10] = float("nan")
    logits[1, 11] = float("inf")
    logits[1, 12] = float("-inf")
    logits[2, :] = float("nan")  # the whole row: no distribution
    logits[3, :250] = float("inf")
    logits[4, 0] = 100.0  # overflow, finite
    tokens = torch.randint(13, 500, (6,), generator=g)
    t, k, p = [1.0, 0.7, 1.0, 1.0, 0.0, 1.0], [0, 5, 0, 0, 0, 0], [1.0, 1.0, 1.0, 0.9, 1.0, 1.0]
    got = run(logits, tokens, t, k, p, backend)
    want = reference_stats(logits, tokens, t, k, p)
    assert_matches(got, want)
    assert got[:, COLUMN["nonfinite"]].tolist() == [0, 3, 500, 250, 0, 0]
    assert got[:, COLUMN["overflow"]].tolist() == [0, 0, 0, 0, 1, 0]
    assert torch.isnan(got[2, : COLUMN["nonfinite"]]).all()
    clean = run(logits[[0, 5]], tokens[[0, 5]], [1.0, 1.0], [0, 0], [1.0, 1.0], backend)
    assert torch.equal(clean, got[[0, 5]])  # other rows are not poisoned


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties(backend):
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0], [3.0, 1.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    tokens = torch.tensor([1, 0, 3])
    t, k, p = [1.0, 1.0, 0.5], [0, 2, 0], [1.0, 1.0, 1.0]
    got = run(logits, tokens, t, k, p, backend)
    assert_matches(got, reference_stats(logits, tokens, t, k, p))
    assert got[:, COLUMN["margin"]].tolist() == [0.0, 0.0, 0.0]
    assert got[2, COLUMN["entropy"]] == pytest.approx(math.log(4), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_degenerate_sampling_sets_are_point_masses(backend):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 2000, generator=g) * 2
    x = sanitize(logits)
    tokens = x.argmax(dim=1)
    got = run(logits, tokens, [0.0, 1.0, 0.8], [0, 1, 0], [1.0, 1.0, 1e-6], backend)
    assert got[:, COLUMN["sampling_entropy"]].abs().max() < 1e-6
    assert got[:, COLUMN["sampling_logprob"]].abs().max() < 1e-6
    assert (got[:, COLUMN["rank"]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 3000, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 3000, (4,), generator=g)
    got = run(logits, tokens, [1.0] * 4, [0] * 4, [1.0] * 4, BACKENDS[-1])
    assert_matches(got, reference_stats(logits.float(), tokens, [1.0] * 4, [0] * 4, [1.0] * 4))


def test_bad_shapes_are_refused():
    rows = RowParams((1.0,), (0,), (1.0,), (0,))
    with pytest.raises(ValueError, match="expected logits"):
        softmax_stats(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), rows)


def test_keep_min_matches_a_full_sort_when_the_nucleus_is_wide():
    # a flat distribution: the 0.99 nucleus is far wider than the CPU candidate window
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 4000, generator=g) * 0.1
    rows = RowParams((1.0, 1.0, 0.5, 1.0), (0, 0, 0, 3000), (0.99, 0.5, 0.999, 0.95), (0, 1, 2, 3))
    got = keep_min_logit(sanitize(logits), rows)
    for i in range(4):
        order = torch.sort(logits[i].double(), descending=True).values
        probs = torch.softmax(order / rows.temperature[i], 0)
        before = torch.cumsum(probs, 0) - probs
        kept = (before < rows.top_p[i]) & (torch.arange(4000) < (rows.top_k[i] or 4000))
        assert got[i].item() == order[int(kept.sum()) - 1].item()


def test_greedy_stats_equal_the_fields_of_the_argmax_token():
    """greedy_stats (greedy decoding of these very logits, CPU) gives what softmax_stats gives
    for each row's argmax token at temperature 0, on rows with exact ties for the maximum and
    rows that are nearly a point mass, and matches a float64 recomputation."""
    torch.manual_seed(4)
    logits = torch.randn(6, 1000) * 4
    logits[1, [3, 700]] = logits[1].max() + 1.0  # a tie for the maximum
    logits[2, 5] = 60.0  # nearly a point mass: entropy far below fp32's resolution of 1
    logits[3] = torch.linspace(-88.0, 88.0, 1000)  # the whole in-bound range
    rows = RowParams(temperature=(0.0,) * 6, top_k=(0,) * 6, top_p=(1.0,) * 6, seed=(0,) * 6)
    tokens = logits.argmax(dim=1)
    got = greedy_stats(logits)
    torch.testing.assert_close(got, softmax_stats(logits, tokens, rows, backend="torch"), rtol=2e-6, atol=1e-7)
    assert_matches(got.double(), reference_stats(logits, tokens, [0.0] * 6, [0] * 6, [1.0] * 6), rtol=1e-5)
    assert got[1, COLUMN["margin"]] == 0 and got[2, COLUMN["entropy"]] > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 89.0, -89.0])
def test_greedy_stats_refuse_logits_whose_argmax_needs_the_token(bad):
    logits = torch.randn(3, 100)
    logits[1, 7] = bad
    assert greedy_stats(logits) is None
