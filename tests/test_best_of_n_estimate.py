"""The Best-of-n estimator's fast path (issue 15): prompt-mean first, then one weighting by Horner's scheme.

Checked in float64 against exact rational arithmetic (subset enumeration, big-integer binomials) and against the
previous implementation (log-gamma weights, one weighting per prompt), which is copied here as `_previous_estimate`.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from trl_bayes import best_of_n_estimate
from trl_bayes.best_of_n import _best_of_n_of_sorted, best_of_n_weights


def _previous_estimate(rank: np.ndarray, evals: np.ndarray, ns: list[int], reduce: bool = True) -> np.ndarray:
    """The estimator before the fast path: normalized log-gamma weights, all prompts sorted and weighted at once."""
    num_samples = rank.shape[1]
    n = torch.tensor(ns, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(1, num_samples + 1, dtype=torch.float64).unsqueeze(0)
    log_w = torch.lgamma(i) - torch.lgamma(n) - torch.lgamma((i - n + 1).clamp(min=1))
    log_w = log_w.masked_fill(i < n, float("-inf"))
    w = (log_w - log_w.max(dim=1, keepdim=True).values).exp()
    weights = (w / w.sum(dim=1, keepdim=True)).numpy()
    order = np.argsort(rank, axis=1)
    sorted_rank = np.take_along_axis(rank, order, axis=1)
    sorted_eval = np.take_along_axis(evals, order, axis=1)
    starts = np.ones_like(sorted_rank, dtype=bool)
    starts[:, 1:] = sorted_rank[:, 1:] != sorted_rank[:, :-1]
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, sorted_eval.size))
    sums = np.add.reduceat(sorted_eval.ravel(), first)
    sorted_eval = np.repeat(sums / counts, counts).reshape(sorted_eval.shape)
    estimates = (sorted_eval @ weights.T).T
    return estimates.mean(axis=1) if reduce else estimates


def _brute_force(rank: np.ndarray, evals: np.ndarray, n: int) -> Fraction:
    """Mean over prompts and over all n-subsets of the eval score of the subset's best sample, exactly.

    Ties for the best rank score in a subset: each tied sample is picked with equal probability.
    """
    total = Fraction(0)
    for rank_row, eval_row in zip(rank.tolist(), evals.tolist(), strict=True):
        subsets = list(itertools.combinations(range(len(rank_row)), n))
        for subset in subsets:
            top = max(rank_row[j] for j in subset)
            best = [Fraction(eval_row[j]) for j in subset if rank_row[j] == top]
            total += sum(best, Fraction(0)) / (len(best) * len(subsets))
    return total / len(rank)


def _exact_weighted(sorted_eval: list[float], n: int) -> Fraction:
    """sum_i C(i - 1, n - 1) / C(N, n) * e_i with Python integers (i is 1-indexed, e ascending by rank)."""
    num_samples = len(sorted_eval)
    binomial, total = 1, Fraction(0)  # binomial = C(i - 1, n - 1), starting at i = n
    for i in range(n, num_samples + 1):
        total += binomial * Fraction(sorted_eval[i - 1])
        binomial = binomial * i // (i - n + 1)
    return total / math.comb(num_samples, n)


@pytest.mark.parametrize("num_prompts, num_samples", [(1, 1), (1, 6), (4, 7), (3, 9)])
def test_fast_path_matches_subset_enumeration(num_prompts, num_samples):
    rng = np.random.default_rng(num_samples)
    rank = rng.integers(0, 3, size=(num_prompts, num_samples)).astype(float)  # 3 values: ties in every prompt
    evals = rng.standard_normal((num_prompts, num_samples))
    ns = list(range(1, num_samples + 1))
    got = best_of_n_estimate(rank, evals, ns)
    assert got.shape == (num_samples,) and got.dtype == np.float64
    for k, n in enumerate(ns):
        assert got[k] == pytest.approx(float(_brute_force(rank, evals, n)), rel=1e-14, abs=1e-15), n


@pytest.mark.parametrize("num_prompts, num_samples, values", [(7, 50, 5), (5, 200, 40), (3, 333, None)])
def test_matches_the_previous_implementation(num_prompts, num_samples, values):
    # Ties from a few distinct rank values (or none); eval scores correlated with the rank, off zero.
    rng = np.random.default_rng(num_samples)
    rank = rng.standard_normal((num_prompts, num_samples))
    if values is not None:
        rank = np.round(rank * values / 4)
    evals = 2.0 + rng.standard_normal((num_prompts, num_samples)) + 0.5 * rank
    ns = list(range(1, num_samples + 1))
    # The previous log-gamma weights are off by up to ~1e-12 relative at these N (the new ones by ~1e-15).
    np.testing.assert_allclose(best_of_n_estimate(rank, evals, ns), _previous_estimate(rank, evals, ns), rtol=1e-12)
    np.testing.assert_allclose(
        best_of_n_estimate(rank, evals, ns, reduce=False), _previous_estimate(rank, evals, ns, False), rtol=1e-12
    )


def test_reduce_is_the_mean_of_the_per_prompt_estimates():
    rng = np.random.default_rng(5)
    rank = np.round(rng.standard_normal((40, 120)) * 3)
    evals = rng.standard_normal((40, 120)) + rank
    ns = [120, 1, 7, 7, 64, 2]  # unsorted, with a repeat: the output follows ns
    per_prompt = best_of_n_estimate(rank, evals, ns, reduce=False)
    assert per_prompt.shape == (6, 40)
    reduced = best_of_n_estimate(rank, evals, ns)
    np.testing.assert_allclose(reduced, per_prompt.mean(axis=1), rtol=1e-13, atol=1e-14)
    assert reduced[2] == reduced[3]


def test_weights_match_big_integer_binomials():
    num_samples = 300  # C(300, 150) ~ 9e88: the exact ratio in Python integers, then one rounding
    ns = list(range(1, num_samples + 1))
    weights = best_of_n_weights(num_samples, ns)
    assert weights.shape == (num_samples, num_samples) and weights.dtype == np.float64
    exact = np.array(
        [[float(Fraction(math.comb(i - 1, n - 1), math.comb(num_samples, n))) for i in range(1, 301)] for n in ns]
    )
    np.testing.assert_array_equal(weights[exact == 0], 0.0)  # i < n: sample i cannot be the best of n
    normal = exact > 1e-290  # the rest is subnormal, where float64 has fewer digits
    np.testing.assert_allclose(weights[normal], exact[normal], rtol=1e-14, atol=0)
    np.testing.assert_allclose(weights[~normal], exact[~normal], rtol=0, atol=1e-300)


@pytest.mark.parametrize("num_samples", [1, 2, 400, 3000])
def test_horner_weighting_matches_big_integer_binomials(num_samples):
    rng = np.random.default_rng(num_samples)
    sorted_eval = np.sort(rng.standard_normal(num_samples)) + 0.25
    ns = sorted({n for n in (1, 2, 3, num_samples // 2 + 1, num_samples - 1, num_samples) if 1 <= n <= num_samples})
    got = _best_of_n_of_sorted(sorted_eval, ns[::-1])[::-1]  # any order of ns
    weights = best_of_n_weights(num_samples, ns)
    scale = weights @ np.abs(sorted_eval)  # sum_i w_i |e_i|: the size of the terms that rounding acts on
    for k, n in enumerate(ns):
        exact = float(_exact_weighted(sorted_eval.tolist(), n))
        assert abs(got[k] - exact) <= 1e-14 * scale[k], (n, got[k], exact)
        assert abs(weights[k] @ sorted_eval - exact) <= 1e-13 * scale[k], (n, weights[k] @ sorted_eval, exact)


def test_all_tied_and_single_prompt_edge_cases():
    evals = np.array([[1.0, 2.0, 6.0, 7.0], [0.0, 0.0, 0.0, 4.0]])
    rank = np.zeros((2, 4))  # every n picks a uniformly random sample: the mean
    np.testing.assert_allclose(best_of_n_estimate(rank, evals, [1, 2, 3, 4]), [2.5] * 4, rtol=1e-15)
    got = best_of_n_estimate(torch.tensor([[0.1, 0.5, 0.3]]), torch.tensor([[1.0, 2.0, 3.0]]), np.arange(1, 4))
    np.testing.assert_allclose(got, [2.0, 7.0 / 3.0, 2.0], rtol=1e-15)  # n = 2: (0 * 1 + 1 * 3 + 2 * 2) / 3
