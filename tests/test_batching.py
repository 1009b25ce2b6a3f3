"""Token-budget batching (trl_bayes.batching): batches keep the input order, fit the budget, and split nothing."""

from __future__ import annotations

import random

import pytest

from trl_bayes.batching import token_budget_batches


def padded_size(lengths, batch):
    return len(batch) * max(lengths[i] for i in batch)


def test_hand_computed_batches():
    # [3, 3, 3] pads to 3 x 3 = 9 tokens (fits 9); adding the 8 would pad to 4 x 8 = 32. [8] alone is 8; adding the 2
    # would pad to 2 x 8 = 16. The 2 starts the last batch.
    assert token_budget_batches([3, 3, 3, 8, 2], max_tokens=9) == [[0, 1, 2], [3], [4]]
    # A sequence over the budget is a batch of its own, never split.
    assert token_budget_batches([2, 20, 2, 2], max_tokens=8) == [[0], [1], [2, 3]]
    # The cap on sequences cuts first when the budget would allow more.
    assert token_budget_batches([1] * 5, max_tokens=100, max_batch_size=2) == [[0, 1], [2, 3], [4]]
    # Without a budget: fixed-size batches, as `range(0, N, batch_size)` would cut them.
    assert token_budget_batches([7, 1, 9, 4, 4], max_batch_size=2) == [[0, 1], [2, 3], [4]]
    assert token_budget_batches([], max_tokens=8) == []


def test_random_lengths_keep_order_fit_the_budget_and_are_maximal():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(0, 40) for _ in range(rng.randint(1, 60))]
        max_tokens, cap = rng.randint(1, 200), rng.choice([None, 1, 3, 16])
        batches = token_budget_batches(lengths, max_tokens, cap)
        assert [i for batch in batches for i in batch] == list(range(len(lengths)))
        for batch, following in zip(batches, batches[1:] + [None], strict=True):
            assert len(batch) == 1 or padded_size(lengths, batch) <= max_tokens
            assert cap is None or len(batch) <= cap
            if following is not None:  # greedy: the next sequence did not fit
                grown = batch + following[:1]
                assert padded_size(lengths, grown) > max_tokens or len(grown) > (cap or len(lengths))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Set max_tokens, max_batch_size or both"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_budget_batches([1, 2], **kwargs)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        token_budget_batches([1, -1], max_tokens=4)
