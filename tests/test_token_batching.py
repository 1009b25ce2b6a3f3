"""Scoring batches sized by a token budget (the default of `BayesianRewardModel.predict*` and `relative_predict_ids`)
give the values of fixed batches of 1 and of 16, to round-off; an explicit `batch_size` keeps its fixed batches. The
posterior fit's batches by a token budget (`posterior_max_tokens`) give the posterior of fixed batches.

Batches of 1 see no padding at all, batches of 16 pad every response to the longest of 16, and a budget of 50 padded
tokens mixes batches of 3 to 6 responses: all three read each reward at the response's own last token, so only
round-off may differ.
"""

from __future__ import annotations

import pytest
import torch

from trl_bayes import BayesianRewardConfig
from trl_bayes.batching import DEFAULT_MAX_TOKENS, scoring_batches
from trl_bayes.generation import tokenize_response
from trl_bayes.laplace_lora import pair_batches, shard_batches
from trl_bayes.preference_formats import pair_ids
from trl_bayes.relative_variance import relative_predict_ids
from trl_bayes.reward_model import scoring_mode

from .conftest import lora_config, make_trainer
from .test_per_sample import COMPLETIONS, PROMPTS, TINY
from .test_relative_one_pass import DTYPES, _posterior, _responses, _tolerance, tiny  # noqa: F401

BATCHINGS = [dict(batch_size=1), dict(batch_size=16), dict(max_tokens=50), dict()]  # dict(): the default budget


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_token_budget_equals_fixed_batches(tiny, tokenizer, structure, dtype):  # noqa: F811
    posterior = _posterior(tiny, tokenizer, structure, dtype)
    prompts, completions, weights = _responses()
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    pairs = list(zip(ids[0::2], ids[1::2], strict=True))
    # The budget of 50 does cut batches of several sizes (else the test would compare fixed batches with themselves).
    sizes = {len(rows) for rows in scoring_batches([len(i) for i in ids], max_tokens=50)}
    assert len(sizes) > 2 and max(sizes) > 1

    results = {}
    for i, batching in enumerate(BATCHINGS):
        mean, var = posterior.predict(prompts, completions, **batching)
        pair_mean, pair_var = posterior.predict_pair_ids(pairs, **batching)
        with scoring_mode(posterior.model):
            relative = [
                relative_predict_ids(posterior, ids, prompts, weights, memory_budget=budget, **batching)
                for budget in (2**30, 0)  # one pass; two passes
            ]
        results[i] = [mean, var, pair_mean, pair_var, *relative[0], *relative[1]]
    assert all(value.abs().max() > 0 for value in results[0])  # nothing is compared to zeros
    for i in range(1, len(BATCHINGS)):
        for value, reference in zip(results[i], results[0], strict=True):
            torch.testing.assert_close(value, reference, **_tolerance(dtype))


def test_explicit_batch_size_ignores_the_budget(tiny, tokenizer):  # noqa: F811
    """With `batch_size` given, `max_tokens` changes nothing: the same batches, bit for bit (the Best-of-N study's
    results depend on it)."""
    posterior = _posterior(tiny, tokenizer, "kron", torch.float32)
    prompts, completions, weights = _responses()
    fixed = posterior.predict(prompts, completions, batch_size=4)
    budgeted = posterior.predict(prompts, completions, batch_size=4, max_tokens=1)
    for value, reference in zip(budgeted, fixed, strict=True):
        assert torch.equal(value, reference)
    relative = posterior.predict_relative(prompts, completions, 4, weights=weights)
    relative_budgeted = posterior.predict_relative(prompts, completions, 4, weights=weights, max_tokens=1)
    for value, reference in zip(relative_budgeted, relative, strict=True):
        assert torch.equal(value, reference)
    assert scoring_batches([3, 9, 2, 5, 7], batch_size=2, max_tokens=1) == [[0, 1], [2, 3], [4]]
    assert scoring_batches([3, 9, 2, 5, 7], max_tokens=21) == [[0, 1], [2, 3, 4]]
    per_batch = DEFAULT_MAX_TOKENS // 5  # the default budget, responses of 5 tokens
    assert [len(rows) for rows in scoring_batches([5] * 1000)] == [per_batch] * (1000 // per_batch) + [
        1000 % per_batch
    ]


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_fit_with_a_token_budget_equals_fixed_batches(tokenizer, tmp_path, structure):
    """`posterior_max_tokens` packs the fit's pairs by padded tokens; kron's default "reduce_masked" K-FAC and diag's
    exact GGN add the same curvature per pair whatever its batch, so the posterior (factors or diagonal, the marglik
    prior precision) and the predicted variances equal those of `posterior_batch_size` 1 (no padding) and 8 (8 + 2
    pairs), in float64."""
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        num_pairs=10,
        dtype=torch.float64,
        model_kwargs=TINY,
        peft=lora_config(r=2),
        hessian_structure=structure,
        prior_precision_steps=50,
    )
    lengths = [max(len(c), len(r)) for c, r in pair_ids(trainer.train_dataset)]
    # 120 padded tokens cut batches of 4, 4 and 2 pairs: neither 1 nor 8 per batch.
    assert [len(rows) for rows in pair_batches(lengths, 8, max_tokens=120)] == [4, 4, 2]
    fits = {}
    for batching in (dict(posterior_batch_size=1), dict(posterior_batch_size=8), dict(posterior_max_tokens=120)):
        trainer.args.posterior_batch_size = batching.get("posterior_batch_size", 8)
        trainer.args.posterior_max_tokens = batching.get("posterior_max_tokens")
        posterior = trainer.fit_posterior()
        la = posterior.laplace
        curvature = [f.clone() for block in la.H_facs.kfacs for f in block] if structure == "kron" else [la.H.clone()]
        _, var = posterior.predict(PROMPTS, COMPLETIONS, batch_size=4)
        fits[tuple(batching.items())] = (curvature, posterior.prior_precision, var)
    (curvature, prior_precision, var), *fixed = reversed(fits.values())  # the token budget's fit first
    assert all(f.abs().max() > 0 for f in curvature) and var.abs().min() > 0  # nothing is compared to zeros
    for other_curvature, other_prior_precision, other_var in fixed:
        for factor, other in zip(curvature, other_curvature, strict=True):
            torch.testing.assert_close(factor, other, rtol=1e-8, atol=1e-10 * other.abs().max().item())
        assert prior_precision == pytest.approx(other_prior_precision, rel=1e-7)
        torch.testing.assert_close(var, other_var, rtol=1e-7, atol=0)


def test_shard_batches_with_a_token_budget_deal_the_global_batches():
    """With a budget the global batches are packed once, whatever the number of processes, and dealt round-robin."""
    lengths = [3, 9, 2, 5, 7, 4, 4, 12, 1]
    global_batches = pair_batches(lengths, batch_size=8, max_tokens=30)  # a pair of rows of 9 tokens counts 18
    assert global_batches == [[0], [1], [2, 3], [4, 5], [6], [7], [8]]
    assert shard_batches(9, 8, 0, 1, max_tokens=30, pair_lengths=lengths) == global_batches
    shards = [shard_batches(9, 8, i, 2, max_tokens=30, pair_lengths=lengths) for i in range(2)]
    assert shards == [global_batches[0::2], global_batches[1::2]]
    assert sorted(shards[0] + shards[1]) == global_batches
    # The default (no budget) keeps fixed batches of `posterior_batch_size` pairs.
    assert shard_batches(9, 4, 0, 1, pair_lengths=lengths) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    with pytest.raises(ValueError, match="posterior_batch_size.*posterior_max_tokens"):
        shard_batches(2, 8, 0, 3, max_tokens=1000, pair_lengths=[5, 5])
    with pytest.raises(ValueError, match="pair_lengths"):
        shard_batches(2, 8, 0, 1, max_tokens=1000)
    with pytest.raises(ValueError, match="posterior_max_tokens"):
        BayesianRewardConfig("unused", use_cpu=True, report_to="none", posterior_max_tokens=0)
