import torch

from softwatch.sampling import RowParams, keep_min_logit, sample, sanitize, uniform_noise


def rows_of(b, temperature=1.0, top_k=0, top_p=1.0, seeds=None):
    return RowParams((temperature,) * b, (top_k,) * b, (top_p,) * b, tuple(seeds if seeds is not None else range(b)))


def test_noise_is_uniform_and_a_pure_function_of_seed_step_and_token():
    seed = torch.tensor([1, 2, 2**62 + 5])
    step = torch.tensor([0, 7, 7])
    u = uniform_noise(seed, step, 100_000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005
    counts = torch.histc(u[0], bins=10, min=0, max=1)
    expected = 10_000
    assert ((counts - expected) ** 2 / expected).sum() < 27.9  # chi-square, 9 dof, p = 0.001
    assert torch.equal(uniform_noise(seed[[2, 0]], step[[2, 0]], 100_000), u[[2, 0]])
    assert not torch.equal(u[1], uniform_noise(seed[1:2], step[1:2] + 1, 100_000)[0])


def test_samples_follow_the_sampling_distribution():
    n = 20_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(n, 1)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8)]:
        rows = rows_of(n, temperature, top_k, top_p)
        x = sanitize(logits)
        tokens = sample(x, rows, torch.zeros(n, dtype=torch.long))
        keep = x[0] >= keep_min_logit(x, rows)[0]
        pi = torch.softmax(torch.where(keep, x[0] / temperature, float("-inf")), 0)
        freq = torch.bincount(tokens, minlength=6).double() / n
        assert (freq[~keep] == 0).all(), (temperature, top_k, top_p)
        expected = pi[keep].double() * n
        chi2 = (((freq[keep] * n) - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.5, (temperature, top_k, top_p, freq, pi)  # <= 5 dof, p = 0.001


def test_greedy_rows_take_the_first_argmax_and_mix_with_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [0.0, 3.0, 3.0, 1.0]])
    rows = RowParams((0.0, 1.0), (0, 0), (1.0, 1.0), (0, 1))
    tokens = sample(sanitize(logits), rows, torch.zeros(2, dtype=torch.long))
    assert tokens[0] == 1


def test_nonfinite_logits_are_never_sampled():
    logits = torch.zeros(500, 5)
    logits[:, 0] = float("nan")
    logits[:, 1] = float("inf")
    tokens = sample(sanitize(logits), rows_of(500), torch.zeros(500, dtype=torch.long))
    assert (tokens >= 2).all()


def test_a_seed_gives_the_same_tokens_whatever_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=g)
    rows = rows_of(5, 0.9, 0, 0.95, seeds=[11, 12, 13, 14, 15])
    steps = torch.tensor([0, 3, 3, 9, 1])
    full = sample(sanitize(logits), rows, steps)
    part = sample(sanitize(logits[[3, 1]]), rows.select([3, 1]), steps[[3, 1]])
    assert torch.equal(part, full[[3, 1]])


def test_a_token_far_below_the_top_is_never_drawn_at_full_vocabulary():
    """The issue's case: V = 49,152, one logit 30 above the rest, 20,000 rows. With noise that
    rounded to 1.0 (about V / 2^24 per row) a random token won: at T = 1 any token, at T = 0.05 also
    a NaN logit's (its sanitized fill / T is -inf, and -inf + inf is NaN, which argmax takes)."""
    n, vocab, chunk = 20_000, 49_152, 500  # rows in chunks: 20,000 x V fp32 is 3.9 GB per copy
    logits = torch.zeros(chunk, vocab)
    logits[:, 7] = 30.0
    logits[:, 100:104] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    x = sanitize(logits)
    wrong = []
    for first in range(0, n, chunk):
        temperature = 1.0 if first < n // 2 else 0.05
        rows = rows_of(chunk, temperature, seeds=range(first, first + chunk))
        tokens = sample(x, rows, torch.full((chunk,), 3, dtype=torch.long))
        wrong += tokens[tokens != 7].tolist()
    assert not wrong, f"{len(wrong)} of {n} rows drew another token: {wrong[:10]}"
