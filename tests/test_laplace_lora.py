"""The posterior and its predictive against brute-force dense computations in float64.

Reference (Bradley-Terry = 2-class softmax with logits [r(chosen), r(rejected)], target chosen):
    GGN  = sum_i p_i (1 - p_i) g_i g_i^T,  g_i = grad_theta [r(chosen_i) - r(rejected_i)],  p_i = sigmoid(r_c - r_r)
    P    = GGN + prior_precision * I
    var(x) = J(x)^T P^-1 J(x) ("full"),  sum_j J_j(x)^2 / P_jj ("diag"),  J(x) = grad_theta r(x)
    log marglik = sum_i log p_i - 1/2 (log det P - n log prior_precision + prior_precision |theta|^2)
Every gradient here is one plain autograd call per sequence on the unpadded tokens: no laplace-torch, no batching.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_bayes.laplace_lora import (
    shard_batches,
)
from trl_bayes.reward import tokenize_response

from .conftest import lora_config, make_trainer

TINY = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)


def tiny_float64_trainer(tokenizer, path, num_pairs, **config):
    """A float64 one-layer model with a rank-1 adapter: small enough for dense references."""
    return make_trainer(
        tokenizer, path, num_pairs=num_pairs, dtype=torch.float64, model_kwargs=TINY, peft=lora_config(r=1), **config
    )


def dense_log_marglik(ggn, log_lik, theta, delta):
    """log p(D | theta) - 1/2 (log det P - n log delta + delta |theta|^2), P = GGN + delta I."""
    precision = ggn + delta * torch.eye(len(theta), dtype=torch.float64)
    return log_lik - 0.5 * (torch.logdet(precision) - len(theta) * math.log(delta) + delta * theta @ theta)


def _dense_reference(posterior, pairs):
    model, params = posterior.model, posterior.params

    def reward_and_grad(ids):
        reward = model(input_ids=torch.tensor([ids])).logits.reshape(())
        grads = torch.autograd.grad(reward, params)
        return reward.detach(), torch.cat([g.flatten() for g in grads])

    ggn = torch.zeros(len(torch.cat([p.flatten() for p in params])), dtype=torch.float64).diag()
    log_lik = torch.zeros((), dtype=torch.float64)
    for chosen, rejected in pairs:
        r_c, g_c = reward_and_grad(chosen)
        r_r, g_r = reward_and_grad(rejected)
        p = torch.sigmoid(r_c - r_r)
        g = g_c - g_r
        ggn += p * (1 - p) * torch.outer(g, g)
        log_lik += torch.log(p)
    return ggn, log_lik, reward_and_grad


@pytest.fixture(scope="module", params=["full", "diag"])
def fitted(request, tokenizer, tmp_path_factory):
    trainer = tiny_float64_trainer(
        tokenizer,
        tmp_path_factory.mktemp(request.param),
        12,
        hessian_structure=request.param,
        optimize_prior_precision=None,
        prior_precision=0.7,
        posterior_batch_size=5,
    )
    posterior = trainer.fit_posterior()
    pairs = list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True))
    return request.param, trainer, posterior, pairs


def test_predictive_matches_dense_reference(fitted, tokenizer):
    structure, _, posterior, pairs = fitted
    assert posterior.params[0].dtype == torch.float64
    ggn, _, reward_and_grad = _dense_reference(posterior, pairs)
    precision = ggn + 0.7 * torch.eye(len(ggn), dtype=torch.float64)

    prompts = ["please list fruits : ", "name a few tools : ", "give me some colors : "]
    completions = ["apple pear fig", "saw saw saw", "red"]
    mean, var = posterior.predict(prompts, completions)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        r, jac = reward_and_grad(tokenize_response(tokenizer, prompt, completion))
        if structure == "full":
            expected = jac @ torch.linalg.solve(precision, jac)
        else:
            expected = (jac**2 / precision.diagonal()).sum()
        torch.testing.assert_close(mean[i], r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(var[i], expected, rtol=1e-7, atol=0)
    assert (var > 0).all()

    # Pairs: the variance of the reward difference, covariance included.
    diff_mean, diff_var = posterior.predict_pairs(prompts[:2], completions[:2], completions[1:])
    for i in range(2):
        r_c, j_c = reward_and_grad(tokenize_response(tokenizer, prompts[i], completions[i]))
        r_r, j_r = reward_and_grad(tokenize_response(tokenizer, prompts[i], completions[i + 1]))
        g = j_c - j_r
        expected = g @ torch.linalg.solve(precision, g) if structure == "full" else (g**2 / precision.diagonal()).sum()
        torch.testing.assert_close(diff_mean[i], r_c - r_r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(diff_var[i], expected, rtol=1e-7, atol=0)


def test_log_marglik_matches_dense_reference(fitted):
    structure, _, posterior, pairs = fitted
    ggn, log_lik, _ = _dense_reference(posterior, pairs)
    theta = torch.cat([p.detach().flatten() for p in posterior.params])
    for delta in (0.3, 0.7, 4.0):
        curvature = ggn if structure == "full" else ggn.diagonal().diag()
        expected = dense_log_marglik(curvature, log_lik, theta, delta)
        got = posterior.laplace.log_marginal_likelihood(prior_precision=torch.tensor([delta], dtype=torch.float64))
        torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-6)
    posterior.laplace.prior_precision = 0.7


def test_marglik_optimum_is_a_maximum_of_the_dense_marglik(tokenizer, tmp_path):
    trainer = tiny_float64_trainer(
        tokenizer,
        tmp_path,
        12,
        hessian_structure="full",
        optimize_prior_precision="marglik",
        prior_precision_steps=300,
    )
    posterior = trainer.fit_posterior()
    pairs = list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True))
    ggn, log_lik, _ = _dense_reference(posterior, pairs)
    theta = torch.cat([p.detach().flatten() for p in posterior.params])
    best = posterior.prior_precision
    assert best != 1.0  # moved away from the initial value
    for factor in (1.1, 1 / 1.1, 2.0, 0.5):
        assert dense_log_marglik(ggn, log_lik, theta, best) > dense_log_marglik(ggn, log_lik, theta, best * factor)


def test_kron_variance_tends_to_prior_variance_under_a_strong_prior(tokenizer, tmp_path):
    """With P = H + delta I and delta >> |H|, var(x) -> |J(x)|^2 / delta: checks the Kronecker inverse path."""
    delta = 1e9
    trainer = tiny_float64_trainer(
        tokenizer,
        tmp_path,
        8,
        hessian_structure="kron",
        optimize_prior_precision=None,
        prior_precision=delta,
    )
    posterior = trainer.fit_posterior()
    _, _, reward_and_grad = _dense_reference(posterior, [])
    ids = tokenize_response(tokenizer, "please list fruits : ", "apple fig")
    _, jac = reward_and_grad(ids)
    _, var = posterior.predict(["please list fruits : "], ["apple fig"])
    torch.testing.assert_close(var[0], jac @ jac / delta, rtol=1e-5, atol=0)


def test_kron_variance_is_below_the_prior_variance_and_positive(tokenizer, tmp_path):
    trainer = tiny_float64_trainer(
        tokenizer,
        tmp_path,
        16,
        hessian_structure="kron",
        optimize_prior_precision=None,
        prior_precision=1.0,
    )
    posterior = trainer.fit_posterior()
    _, _, reward_and_grad = _dense_reference(posterior, [])
    prompts, completions = ["please list fruits : ", "name a few tools : "], ["apple fig", "hammer hammer"]
    _, var = posterior.predict(prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        _, jac = reward_and_grad(tokenize_response(tokenizer, p, c))
        assert 0 < var[i] < jac @ jac  # the data only adds precision: P >= prior_precision * I


def test_shard_batches_partition_the_global_batches():
    assert shard_batches(10, 3, 0, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert shard_batches(10, 3, 0, 2) == [[0, 1, 2], [6, 7, 8]]
    assert shard_batches(10, 3, 1, 2) == [[3, 4, 5], [9]]
    with pytest.raises(ValueError, match="posterior_batch_size"):
        shard_batches(4, 4, 0, 2)
