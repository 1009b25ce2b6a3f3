"""`trl_bayes.active`: the selection strategies against brute force (the pool's pair Gaussians from
`BayesianRewardModel.predict_pairs`, sorted), Monte Carlo (BALD's mutual information, double Thompson sampling's choice
frequencies on a small Gaussian example) and their seeds."""

from __future__ import annotations

import math
import random

import pytest
import torch

from trl_bayes.active import (
    CandidatePool,
    bald_scores,
    binary_entropy,
    double_thompson,
    pair_gaussians,
    select_pairs,
    thompson_prompt_order,
    within_prompt_pairs,
)

from .conftest import TINY_MODEL as TINY
from .conftest import lora_config, make_trainer

WORDS = "apple pear fig saw hammer drill red blue cat dog".split()


@pytest.fixture(scope="module")
def posterior(tokenizer, tmp_path_factory):
    """A tiny GPT-NeoX reward model (rank-2 LoRA + score head) trained on 16 pairs, with its K-FAC posterior."""
    trainer = make_trainer(
        tokenizer, tmp_path_factory.mktemp("active"), num_pairs=16, model_kwargs=TINY, peft=lora_config(r=2)
    )
    trainer.train()
    return trainer.posterior


@pytest.fixture(scope="module")
def pool():
    """5 prompts with 3 to 5 candidates each: 35 pairs."""
    rng = random.Random(0)
    prompts = [f"name some {c} : " for c in ("fruits", "tools", "colors", "animals", "drinks")]
    candidates = [[" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(k)] for k in (3, 4, 5, 5, 4)]
    return CandidatePool(prompts, candidates)


def brute_force_pair_gaussians(posterior, pool: CandidatePool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, var) of every pair of the pool, one `predict_pairs` call (the library's pair path, not `active`'s)."""
    g, a, b = pool.pairs.T.tolist()
    return posterior.predict_pairs(
        [pool.prompts[i] for i in g],
        [pool.candidates[i][j] for i, j in zip(g, a, strict=True)],
        [pool.candidates[i][j] for i, j in zip(g, b, strict=True)],
    )


def test_pool_pairs_are_every_pair_within_each_prompt(pool):
    assert len(pool.pairs) == 3 + 6 + 10 + 10 + 6 == 35
    assert within_prompt_pairs([3]).tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 2]]
    offsets, rows = pool.responses()
    assert offsets.tolist() == [0, 3, 7, 12, 17] and rows[3].tolist() == [3, 4]  # group 1's first pair
    with pytest.raises(ValueError, match="two distinct candidates"):
        CandidatePool(["p : "], [["a", "b"]], torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="budget 36 must be in"):
        select_pairs(None, pool, 36, "random")


def test_pair_gaussians_are_the_predict_pairs_ones(posterior, pool):
    """mu = r(a) - r(b) and var = |u_a - u_b|^2 from the scaled gradients equal `predict_pairs`' (J_a - J_b) Σ
    (J_a - J_b)^T."""
    from trl_bayes.active import scaled_gradients
    from trl_bayes.generation import tokenize_response

    ids = [
        tokenize_response(posterior.tokenizer, p, c)
        for p, cs in zip(pool.prompts, pool.candidates, strict=True)
        for c in cs
    ]
    mean, scaled = scaled_gradients(posterior, ids, batch_size=4)
    _, rows = pool.responses()
    mu, var = pair_gaussians(mean, scaled, rows)
    expected_mu, expected_var = brute_force_pair_gaussians(posterior, pool)
    torch.testing.assert_close(mu, expected_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, expected_var, rtol=1e-4, atol=1e-8)
    assert var.min() > 0


@pytest.mark.parametrize("block_responses", [1, 1000])
def test_variance_selection_is_a_brute_force_sort(posterior, pool, block_responses):
    """The `budget` pairs of largest Var(r(a) - r(b)), largest first, whatever the blocks the pool is scored in."""
    _, var = brute_force_pair_gaussians(posterior, pool)
    chosen = select_pairs(posterior, pool, 7, "variance", block_responses=block_responses, progress_bar=False)
    assert chosen.tolist() == torch.argsort(var, descending=True)[:7].tolist()


def test_bald_selection_sorts_the_mutual_information(posterior, pool):
    mu, var = brute_force_pair_gaussians(posterior, pool)
    chosen = select_pairs(posterior, pool, 7, "bald", progress_bar=False)
    assert chosen.tolist() == torch.argsort(bald_scores(mu, var), descending=True)[:7].tolist()
    # An ensemble of two copies of one model: the mean of two equal Gaussians halves the variance, and BALD ranks by
    # that (combine_gaussians), so the ranking can move; the variance's cannot.
    assert select_pairs([posterior, posterior], pool, 7, "variance", progress_bar=False).tolist() == (
        select_pairs(posterior, pool, 7, "variance", progress_bar=False).tolist()
    )
    ensemble = select_pairs([posterior, posterior], pool, 7, "bald", progress_bar=False)
    assert ensemble.tolist() == torch.argsort(bald_scores(mu, var / 2), descending=True)[:7].tolist()


def _mutual_information_mc(mu: float, var: float, likelihood, samples: int = 400_000) -> float:
    """H[E p] - E[H(p)], p = likelihood(d), d ~ N(mu, var) by Monte Carlo (float64, a fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    d = mu + math.sqrt(var) * torch.randn(samples, generator=generator, dtype=torch.float64)
    p = likelihood(d)
    return float(binary_entropy(p.mean()) - binary_entropy(p).mean())


@pytest.mark.parametrize(("mu", "var"), [(0.0, 0.01), (0.0, 1.0), (0.0, 10.0), (1.0, 0.5), (-2.0, 4.0), (3.0, 0.1),
                                         (0.5, 25.0)])  # fmt: skip
def test_bald_closed_form_against_monte_carlo(mu, var):
    """The closed form is exact but for Houlsby's h(Phi(x)) ~ exp(-x^2 / (pi ln 2)): against the probit likelihood
    Phi(sqrt(pi/8) d) it is within 0.002 nats; against the Bradley-Terry (logistic) likelihood itself, which
    Phi(sqrt(pi/8) d) approximates, within 0.03 nats, about 10% (the mutual information is at most ln 2 = 0.69)."""
    closed = float(bald_scores(torch.tensor([mu]), torch.tensor([var]))[0])
    probit = _mutual_information_mc(mu, var, lambda d: torch.special.ndtr(math.sqrt(math.pi / 8) * d))
    logistic = _mutual_information_mc(mu, var, torch.sigmoid)
    assert abs(closed - probit) < 0.002, (closed, probit)
    assert abs(closed - logistic) < 0.03, (closed, logistic)


def test_bald_prefers_uncertain_weights_not_uncertain_labels():
    """A pair with mu = 0 and no posterior variance has the most uncertain label but nothing to learn: BALD 0, while a
    pair with a large variance scores high; a large |mu| with small variance scores near 0."""
    scores = bald_scores(torch.tensor([0.0, 0.0, 6.0]), torch.tensor([0.0, 9.0, 0.1]))
    assert scores[0] < 1e-3 and scores[1] > 0.3 and scores[2] < 1e-3


def test_double_thompson_frequencies_against_monte_carlo():
    """3 candidates, r ~ N(m, U U^T). With every pair allowed and enough resamples, the first choice is i with
    p_i = P(argmax r = i), the second j != i with p_j / (1 - p_i): P(a = i, b = j) = p_i p_j / (1 - p_i). p from
    1e6 joint draws (numpy-free, an independent generator); frequencies from 20,000 calls."""
    means = torch.tensor([[0.0, 0.3, -0.2]], dtype=torch.float64)
    scaled = torch.tensor([[[1.0, 0.0, 0.2], [0.5, 0.8, 0.0], [0.0, 0.3, 1.2]]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(123)
    draws = means[0] + torch.randn(1_000_000, 3, generator=generator, dtype=torch.float64) @ scaled[0].T
    p = torch.bincount(draws.argmax(1), minlength=3).double() / len(draws)
    expected = p.unsqueeze(1) * p.unsqueeze(0) / (1 - p.unsqueeze(1))
    expected.fill_diagonal_(0)

    calls, counts = 20_000, torch.zeros(3, 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    allowed = ~torch.eye(3, dtype=torch.bool)
    for _ in range(calls):
        a, b = double_thompson(means, scaled, allowed, generator, max_resamples=100)
        counts[a, b] += 1
    freq = counts / calls
    sigma = (expected * (1 - expected) / calls).sqrt()
    assert ((freq - expected).abs() <= 4 * sigma + 1e-12).all(), (freq, expected)


def test_double_thompson_keeps_to_the_allowed_pairs():
    """Candidate 1 is best in almost every sample, but its pairs are labelled already: it is never chosen."""
    means = torch.tensor([[0.0, 10.0, 0.1, 0.2]])
    scaled = 0.5 * torch.eye(4).unsqueeze(0)
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[0, 2] = allowed[2, 3] = True
    generator = torch.Generator().manual_seed(0)
    chosen = {tuple(sorted(double_thompson(means, scaled, allowed, generator))) for _ in range(200)}
    assert chosen <= {(0, 2), (2, 3)} and len(chosen) == 2


def test_thompson_prompt_order_gives_each_prompt_a_turn_per_round():
    generator = torch.Generator().manual_seed(0)
    order = thompson_prompt_order({0: 1, 1: 3, 2: 3}, 6, generator)
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:5]) == [1, 2] and order.count(0) == 1
    assert len(order) == 6


@pytest.mark.parametrize("strategy", ["random", "thompson"])
def test_a_seed_reproduces_the_choices(posterior, pool, strategy):
    def pick(seed, block_responses=2048):
        return select_pairs(
            posterior, pool, 9, strategy, seed=seed, block_responses=block_responses, progress_bar=False
        ).tolist()

    first = pick(0)
    assert pick(0) == first and pick(1) != first
    assert len(set(first)) == 9  # no pair twice
    if strategy == "thompson":
        assert pick(0, block_responses=1) == first  # the blocks change what is held in memory, not the draws
        groups = pool.pairs[torch.tensor(first), 0].tolist()
        assert sorted(groups[:5]) == [0, 1, 2, 3, 4]  # one pair per prompt, every prompt before any returns
