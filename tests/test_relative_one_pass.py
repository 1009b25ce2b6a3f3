"""The relative variance in one forward-backward pass (scaled gradients u = J S, Sigma = S S^T, centered on their
group's mean) against the two-pass path (J_mean first, then the centered quadratic form) and against brute force.

Brute force (float64, nothing from `trl_bayes.per_sample`): one unpadded autograd call per response for its Jacobian
J_i, the dense posterior covariance from laplace-torch (`posterior_covariance` for full, `diag(posterior_variance)` for
diag, `posterior_precision.to_matrix(exponent=-1)` for kron), the weighted group mean J_mean = sum_j w_j J_j / sum_j w_j,
then (J_i - J_mean) Sigma (J_i - J_mean)^T.
"""

from __future__ import annotations

import random

import pytest
import torch
from laplace.baselaplace import FullLaplace, KronLaplace

from trl_bayes.generation import pad_token_ids, tokenize_response
from trl_bayes.laplace_lora import (
    RewardPairModel,
    fit_laplace,
    make_laplace,
    pop_input_require_grads_hooks,
    select_laplace_parameters,
)
from trl_bayes.per_sample import PosteriorScale, ScaledGradients, forward_backward
from trl_bayes.relative_variance import (
    RelativeVariancePredictor,
    centered_square_norms,
    group_blocks,
    relative_predict_ids,
)
from trl_bayes.reward_model import BayesianRewardModel, scoring_mode

from .conftest import TINY_MODEL as TINY
from .conftest import lora_config, make_trainer

WORDS = "apple pear fig saw hammer drill red blue cat dog nail green".split()
PROMPTS = [
    "list fruits : ",
    "name tools : ",
    "give colors : ",
    "name an animal : ",
    "hi : ",
    "a city : ",
    "a number : ",
]
# 30 responses; with batch_size=2 a group spans up to 3 batches, and the two-pass path cuts them into 2 blocks.
SIZES = [6, 2, 5, 4, 3, 6, 4]
STRUCTURES = ["kron", "diag", "full"]
DTYPES = [torch.float64, torch.float32]


def _responses(seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """Prompts (groups interleaved, not contiguous), completions of 1 to 5 words, and weights in {1, 2, 3}."""
    rng = random.Random(seed)
    rows = [
        (prompt, " ".join(rng.choices(WORDS, k=rng.randint(1, 5))))
        for prompt, size in zip(PROMPTS, SIZES, strict=True)
        for _ in range(size)
    ]
    rng.shuffle(rows)
    return [p for p, _ in rows], [c for _, c in rows], [float(rng.randint(1, 3)) for _ in rows]


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """Per dtype (float64, float32), a tiny GPT-NeoX reward model (rank-2 LoRA + score head, all Laplace weights) and
    its 10 training pairs."""
    models = {}
    for dtype in DTYPES:
        trainer = make_trainer(
            tokenizer,
            tmp_path_factory.mktemp("one_pass"),
            num_pairs=10,
            dtype=dtype,
            model_kwargs=TINY,
            peft=lora_config(r=2),
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        select_laplace_parameters(model, "all")
        pop_input_require_grads_hooks(model)
        pairs = list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True))
        models[dtype] = model, pairs
    return models


def _posterior(tiny, tokenizer, structure: str, dtype: torch.dtype) -> BayesianRewardModel:
    model, pairs = tiny[dtype]
    la = make_laplace(RewardPairModel(model), structure, 0.5, "reduce")
    la = fit_laplace(la, pairs, tokenizer.pad_token_id, batch_size=4)
    return BayesianRewardModel(model, tokenizer, la, {"hessian_structure": structure})


def _dense_covariance(la) -> torch.Tensor:
    if isinstance(la, FullLaplace):
        return la.posterior_covariance
    if isinstance(la, KronLaplace):
        return la.posterior_precision.to_matrix(exponent=-1)
    return torch.diag(la.posterior_variance)


def _jacobians(posterior: BayesianRewardModel, ids: list[list[int]]) -> torch.Tensor:
    """(B, P): one unpadded autograd call per response, parameters in laplace-torch's order."""
    rows = []
    with scoring_mode(posterior.model):
        for response in ids:
            reward = posterior.model(input_ids=torch.tensor([response])).logits.reshape(())
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(reward, posterior.params)]))
    return torch.stack(rows)


def _scored(posterior, prompts, completions, weights, memory_budget, batch_size=2):
    keys = list(prompts)
    ids = [tokenize_response(posterior.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    with scoring_mode(posterior.model):
        return relative_predict_ids(posterior, ids, keys, weights, batch_size=batch_size, memory_budget=memory_budget)


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_pass_equals_two_passes(tiny, tokenizer, structure, dtype, monkeypatch):
    posterior = _posterior(tiny, tokenizer, structure, dtype)
    prompts, completions, weights = _responses()
    calls = []
    one_pass = RelativeVariancePredictor.one_pass
    monkeypatch.setattr(
        RelativeVariancePredictor, "one_pass", lambda self, *a, **k: calls.append(1) or one_pass(self, *a, **k)
    )
    largest = max(SIZES)
    needed = RelativeVariancePredictor(posterior, batch_size=2).one_pass_bytes(largest)
    assert needed == (largest + 1) * posterior.n_params * posterior.params[0].element_size()

    assert len(group_blocks(prompts, min_block_size=8 * 2)) == 2
    for w in (None, weights):
        one = _scored(posterior, prompts, completions, w, memory_budget=needed)  # just fits: one pass
        assert len(calls) == 1
        two = _scored(posterior, prompts, completions, w, memory_budget=needed - 1)  # just over: two passes
        assert len(calls) == 1
        calls.clear()
        for got, expected in zip(one, two, strict=True):
            assert got.dtype == posterior.params[0].dtype
            torch.testing.assert_close(got, expected, **_tolerance(got.dtype))
        mean, var, relative = one
        assert (relative > 0).all() and (relative < var).any()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_pass_equals_brute_force(tiny, tokenizer, structure):
    posterior = _posterior(tiny, tokenizer, structure, torch.float64)
    prompts, completions, weights = _responses(seed=1)
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    jacobians = _jacobians(posterior, ids)  # (B, P)
    covariance = _dense_covariance(posterior.laplace)  # (P, P)
    w_all = torch.tensor(weights, dtype=torch.float64)
    expected = torch.empty(len(ids), dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        members = torch.tensor([p == prompt for p in prompts])
        j_mean = (w_all[members, None] * jacobians[members]).sum(0) / w_all[members].sum()
        d = jacobians[i] - j_mean
        expected[i] = d @ covariance @ d

    mean, var, relative = _scored(posterior, prompts, completions, weights, memory_budget=2**30)
    torch.testing.assert_close(relative, expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(var, torch.einsum("bp,pq,bq->b", jacobians, covariance, jacobians), rtol=1e-9, atol=0)

    # The scaled rows of one padded batch carry the whole reward covariance: u_i . u_j = J_i Sigma J_j^T.
    input_ids, attention_mask = pad_token_ids(ids, tokenizer.pad_token_id)
    scaled = ScaledGradients(PosteriorScale(posterior.laplace))
    with scoring_mode(posterior.model):
        forward_backward(posterior.model, posterior.layers, input_ids, attention_mask, scaled)
    u = scaled.finish()
    assert u.shape == (len(ids), posterior.n_params)
    torch.testing.assert_close(u @ u.T, jacobians @ covariance @ jacobians.T, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_pass_groups_of_one_and_groups_across_batches(tiny, tokenizer, structure, dtype):
    """The predictor's two paths on contiguous groups of sizes 1, 4, 1, 6, 2, 1 in batches of 3: groups that span
    batches, batches that hold several groups, and single responses, whose relative variance is zero."""
    posterior = _posterior(tiny, tokenizer, structure, dtype)
    sizes = [1, 4, 1, 6, 2, 1]
    rng = random.Random(2)
    prompts = [PROMPTS[g % len(PROMPTS)] for g, size in enumerate(sizes) for _ in range(size)]
    ids = [tokenize_response(tokenizer, p, " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))) for p in prompts]
    groups = torch.tensor([g for g, size in enumerate(sizes) for _ in range(size)])
    weights = torch.tensor([float(rng.randint(1, 3)) for _ in ids], dtype=torch.float64)
    predictor = RelativeVariancePredictor(posterior, batch_size=3)
    with scoring_mode(posterior.model):
        mean, var, relative = predictor.one_pass(ids, groups, weights)
        means, mean_2, var_2 = predictor.group_means(ids, groups, weights, len(sizes))
        _, relative_2, _ = predictor.centered_variances(ids, groups, means)
    tolerance = _tolerance(mean.dtype)
    torch.testing.assert_close(mean, mean_2, **tolerance)
    torch.testing.assert_close(var, var_2, **tolerance)
    torch.testing.assert_close(relative, relative_2, **tolerance)
    alone = torch.tensor([size == 1 for size in sizes])[groups]
    # A response alone is its group's mean: zero up to the round-off of w u / w.
    bound = 100 * torch.finfo(var.dtype).eps * var[alone]
    assert (relative[alone] <= bound).all() and (relative_2[alone] <= bound).all()
    assert (relative[~alone] > 0).all()


def test_centered_square_norms_by_hand():
    # Group 0: u = (1, 0) with weight 1 and (3, 0) with weight 3: mean (2.5, 0), so |u - mean|^2 = 2.25 and 0.25.
    # Group 1: u = (0, 2) alone: 0. Chunks cut inside group 0 give the same as one chunk.
    rows = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1])
    weights = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([2.25, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(centered_square_norms([rows], groups, weights), expected, rtol=0, atol=0)
    torch.testing.assert_close(centered_square_norms([rows[:1], rows[1:]], groups, weights), expected, rtol=0, atol=0)


def test_one_pass_row_order_and_group_blocks(tiny, tokenizer):
    """Results come back in the input order, although the one pass visits the rows group by group."""
    posterior = _posterior(tiny, tokenizer, "diag", torch.float64)
    prompts, completions, weights = _responses(seed=3)
    order = [i for rows in group_blocks(prompts, min_block_size=1) for i in rows]
    assert order != list(range(len(prompts)))  # the groups are interleaved in the input
    scored = _scored(posterior, prompts, completions, weights, memory_budget=2**30)
    reordered = _scored(
        posterior, [prompts[i] for i in order], [completions[i] for i in order], [weights[i] for i in order], 2**30
    )
    for got, expected in zip(scored, reordered, strict=True):
        torch.testing.assert_close(got[order], expected, **_tolerance(got.dtype))
