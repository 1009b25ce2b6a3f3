"""Batches sized by a token budget instead of a fixed number of sequences.

A batch of token sequences is padded to its longest, so the model sees a `(B, L)` tensor of B x L tokens, and time
and memory follow B x L, not B. A fixed B is either too small for short responses (the offline world's ~10 tokens: a
batch of 16 leaves a CPU core waiting on Python overhead) or too large for long ones (out of memory at 1,000 tokens).
A budget of padded tokens per batch fits both. Measured on a default proxy of recipes/bon.py, 1 thread, (mean, var) of
1,831 responses: 1,615 per second in batches of 16, 2,546 of 64, 2,950 of 256 (~2,500 padded tokens), 2,911 of 1,024.

`DEFAULT_MAX_TOKENS` = 4,096 is the scoring default (`BayesianRewardModel.predict*`, `relative_predict_ids`), chosen
from the same kind of measurement (2026-11-28, `predict_ids(..., return_var=True)` of 2,000 sampled completions of
mean length 9.6 tokens, a default proxy of recipes/bon.py, 1 thread, best of 3 interleaved rounds on a shared machine):
922 responses per second in batches of 16, 1,393 of 64; budgets of 1,024 / 2,048 / 4,096 / 8,192 padded tokens:
1,422 / 1,561 / 1,668 / 1,664. Throughput is flat past 4,096; a larger budget only adds memory.

Batches keep the order of the sequences (no sorting by length), so results come back in input order and a caller that
needs whole groups in sequence (the relative variance's prompts) still sees them so. Note that another batching
changes floats in the last bits (other matrix shapes, other padding), not their meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAX_TOKENS = 4096
"""Padded tokens per scoring batch when no `batch_size` is given (see the module docstring for the measurement)."""


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int | None = None, max_batch_size: int | None = None
) -> list[list[int]]:
    """Consecutive indices of `lengths` cut into batches that fit a budget of padded tokens.

    Greedy, in order: each batch takes the following sequences while `len(batch) * max(lengths in batch)` (its padded
    size) stays <= `max_tokens` and it holds at most `max_batch_size` sequences. A sequence longer than `max_tokens`
    makes a batch of its own (a sequence is never split). With `max_tokens=None` this is fixed-size batching by
    `max_batch_size`.

    Args:
        lengths: `(N,)` tokens of each sequence, >= 0.
        max_tokens: padded tokens per batch (>= 1); `None` = no budget.
        max_batch_size: sequences per batch (>= 1); `None` = no cap. At least one of the two must be set.

    Returns:
        Lists of indices into `lengths`; their concatenation is `range(N)`. Usable as a DataLoader's `batch_sampler`.

    Example:
    ```python
    >>> token_budget_batches([3, 3, 3, 8, 2], max_tokens=9)  # 3 x 3 = 9 fits; [8, 2] would pad to 2 x 8 = 16
    [[0, 1, 2], [3], [4]]
    ```
    """
    if max_tokens is None and max_batch_size is None:
        raise ValueError("Set max_tokens, max_batch_size or both: with neither, every sequence would go in one batch.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (padded tokens per batch), got {max_tokens}.")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    if any(length < 0 for length in lengths):
        raise ValueError("lengths must be >= 0 (tokens per sequence).")
    budget = float("inf") if max_tokens is None else max_tokens
    cap = len(lengths) if max_batch_size is None else max_batch_size
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, length in enumerate(lengths):
        widest = max(longest, length)
        if current and (len(current) == cap or (len(current) + 1) * widest > budget):
            batches.append(current)
            current, widest = [], length
        current.append(i)
        longest = widest
    if current:
        batches.append(current)
    return batches


def scoring_batches(
    lengths: Sequence[int], batch_size: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[list[int]]:
    """The scoring batches of sequences with `lengths`: `batch_size` consecutive sequences each when it is given
    (fixed batching, exactly as before token budgets: `max_tokens` is then unused), else a budget of `max_tokens`
    padded tokens per batch (`token_budget_batches`). Either way consecutive, in order.

    Args:
        lengths: `(N,)` tokens of each sequence.
        batch_size: sequences per batch (>= 1), or `None` for the token budget.
        max_tokens: padded tokens per batch (>= 1) when `batch_size` is `None`.
    """
    if batch_size is not None:
        return token_budget_batches(lengths, max_batch_size=batch_size)
    return token_budget_batches(lengths, max_tokens=max_tokens)
