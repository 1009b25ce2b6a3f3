"""The typicality baselines of issue 16 against brute force in float64: the prior-only relative variance from explicit
per-response Jacobians, the hidden features against the score head, the group distances against numpy per group, and
the SFT NLL against a per-token loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPTNeoXForCausalLM

from trl_bayes.experiments.world import tiny_gpt_neox_config
from trl_bayes.generation import tokenize_response
from trl_bayes.relative_variance import prompt_key, relative_predict_ids
from trl_bayes.reward_model import BayesianRewardModel
from trl_bayes.typicality import (
    PriorScale,
    completion_nll,
    dense_mahalanobis,
    group_euclidean,
    group_mahalanobis,
    hidden_features,
    low_rank_mahalanobis,
    predict_hidden,
    predict_prior_relative,
    score_head,
)

from .conftest import GROUPED_COMPLETIONS as COMPLETIONS
from .conftest import GROUPED_PROMPTS as PROMPTS
from .conftest import GROUPED_WEIGHTS as WEIGHTS
from .conftest import TINY_MODEL as TINY
from .conftest import lora_config, make_trainer


@pytest.fixture(scope="module")
def posterior(tokenizer, tmp_path_factory):
    trainer = make_trainer(
        tokenizer, tmp_path_factory.mktemp("typicality"), num_pairs=10, dtype=torch.float64, model_kwargs=TINY,
        peft=lora_config(r=2), hessian_structure="kron",
    )  # fmt: skip
    trainer.train()
    return trainer.posterior


def _jacobians(posterior, ids: list[list[int]]) -> torch.Tensor:
    """`(B, P)`: each response's reward gradient from one unpadded autograd call."""
    rows = []
    posterior.model.eval()
    for response in ids:
        reward = posterior.model(input_ids=torch.tensor([response])).logits.reshape(())
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(reward, posterior.params)]))
    return torch.stack(rows)


def _brute_prior_relative(jacobians, prior_diag, keys, weights, reference_jacobians=None) -> torch.Tensor:
    """|J_i - J_mean(g)|^2 / delta, J_mean the weighted mean of the group's rows (or of its reference rows)."""
    out = torch.zeros(len(keys), dtype=torch.float64)
    for i, key in enumerate(keys):
        if reference_jacobians is None:
            members = [j for j, other in enumerate(keys) if other == key]
            w = torch.tensor([weights[j] for j in members], dtype=torch.float64)
            mean = (jacobians[members] * w[:, None]).sum(0) / w.sum()
        else:
            mean = reference_jacobians[key].mean(0)
        out[i] = ((jacobians[i] - mean) ** 2 / prior_diag).sum()
    return out


@pytest.mark.parametrize("prior", ["scalar", "per_parameter"])
def test_prior_relative_variance_equals_brute_force(posterior, tokenizer, prior):
    la = posterior.laplace
    before = la.prior_precision
    if prior == "per_parameter":  # one precision per Laplace parameter tensor: laplace-torch's layer-wise prior
        la.prior_precision = torch.linspace(0.5, 3.0, len(la.params), dtype=torch.float64)
    try:
        ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
        keys = [prompt_key(p) for p in PROMPTS]
        jacobians = _jacobians(posterior, ids)
        expected = _brute_prior_relative(jacobians, la.prior_precision_diag, keys, WEIGHTS)
        mean, relative = predict_prior_relative(posterior, PROMPTS, COMPLETIONS, batch_size=3, weights=WEIGHTS)
        assert relative.dtype == torch.float64
        torch.testing.assert_close(relative, expected, rtol=1e-8, atol=1e-12)
        # Both paths of the relative variance (one pass; two passes with memory_budget=0) take the prior's scale.
        _, marginal, two_pass = relative_predict_ids(
            posterior, ids, keys, WEIGHTS, batch_size=2, memory_budget=0, scale=PriorScale(la)
        )
        torch.testing.assert_close(two_pass, expected, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(marginal, (jacobians**2 / la.prior_precision_diag).sum(1), rtol=1e-8, atol=1e-12)
        # Not the posterior's: the curvature of the preference data is left out.
        _, _, posterior_relative = posterior.predict_relative(PROMPTS, COMPLETIONS, batch_size=3, weights=WEIGHTS)
        assert not torch.allclose(relative, posterior_relative, rtol=1e-2)
        # A reference set: one completion per prompt, centered on the reference completions' mean gradient.
        reference = {"please list fruits : ": ["fig", "pear pear"], "name a few tools : ": ["drill"]}
        reference_jacobians = {
            prompt_key(p): _jacobians(posterior, [tokenize_response(tokenizer, p, c) for c in cs])
            for p, cs in reference.items()
        }
        expected = _brute_prior_relative(jacobians[:2], la.prior_precision_diag, keys[:2], None, reference_jacobians)
        _, single = predict_prior_relative(posterior, PROMPTS[:2], COMPLETIONS[:2], reference=reference)
        torch.testing.assert_close(single, expected, rtol=1e-8, atol=1e-12)
        full = PriorScale(la).full(jacobians)
        torch.testing.assert_close(full.square().sum(1), (jacobians**2 / la.prior_precision_diag).sum(1))
    finally:
        la.prior_precision = before
        posterior.reference_cache.clear()


def test_hidden_features_are_what_the_score_head_reads(posterior, tokenizer):
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    features = hidden_features(posterior.model, ids, tokenizer.pad_token_id, batch_size=3)
    assert features.shape == (len(ids), TINY["hidden_size"]) and features.dtype == torch.float64
    rewards, _ = posterior.predict(PROMPTS, COMPLETIONS, return_var=False)
    with torch.no_grad():
        torch.testing.assert_close(score_head(posterior.model)(features).reshape(-1), rewards, rtol=1e-10, atol=1e-12)
    # Padding and batching change nothing: each response alone, unpadded.
    alone = torch.cat([hidden_features(posterior.model, [i], tokenizer.pad_token_id) for i in ids])
    torch.testing.assert_close(features, alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(predict_hidden(posterior, PROMPTS, COMPLETIONS, batch_size=7), features)
    with pytest.raises(ValueError, match="no `score` or `classifier` head"):
        score_head(torch.nn.Sequential(torch.nn.Linear(2, 1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hidden_features_return_the_map_rewards_of_the_same_forward(posterior, dtype):
    # A float32 copy of the reward model: MAP scoring reads no posterior, only the model and tokenizer.
    model = posterior if dtype == torch.float64 else BayesianRewardModel(
        copy.deepcopy(posterior.model).float(), posterior.tokenizer, posterior.laplace, posterior.metadata
    )  # fmt: skip
    for batch_size in (3, None):  # given, and the token budget's batches
        features, rewards = predict_hidden(model, PROMPTS, COMPLETIONS, batch_size, return_rewards=True)
        means, _ = model.predict(PROMPTS, COMPLETIONS, batch_size, return_var=False)
        assert rewards.dtype == dtype and torch.equal(rewards, means)  # the same forward passes, bit for bit
        torch.testing.assert_close(features, predict_hidden(model, PROMPTS, COMPLETIONS, batch_size), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one prompt per completion"):
        predict_hidden(model, PROMPTS, COMPLETIONS[:2], return_rewards=True)


def _brute_mahalanobis(features, groups, weights, shrinkage, reference=None) -> np.ndarray:
    """Per group in float64: the shrunk covariance built entry by entry as `shrunk_covariance` defines it, inverted
    through its eigendecomposition V diag(1 / lambda) V^T. (np.linalg.inv of the same matrix is off by up to 1e-4
    relative at shrinkage 0, where the smallest eigenvalues are the 1e-9 jitter.)"""
    out = np.zeros(len(features))
    for g in np.unique(groups):
        source, w = (features, weights) if reference is None else reference[::2]
        source_groups = groups if reference is None else reference[1]
        source, w = source[source_groups == g], w[source_groups == g]
        mean = w @ source / w.sum()  # exact for equal rows (as group_means): their centered rows are 0
        w = w / w.sum()
        centered = source - mean
        covariance = np.einsum("j,jd,je->de", w, centered, centered)
        variances = np.diag(covariance)
        if variances.mean() <= 0:  # every row equal: the identity
            covariance = np.eye(len(covariance))
        else:
            covariance = (1 - shrinkage) * covariance + shrinkage * np.diag(variances)
            covariance += 1e-9 * variances.mean() * np.eye(len(covariance))
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        diff = features[groups == g] - mean
        out[groups == g] = ((diff @ eigenvectors) ** 2 / eigenvalues).sum(1)
    return out


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 1.0])
def test_low_rank_mahalanobis_equals_the_dense_path_and_a_float64_inverse(shrinkage):
    rng = np.random.default_rng(1)
    dim = 32
    # Groups of 1, 2 and 5 rows (n <= D / 4: the low-rank path), 16 (n < D, dense by cost), 32 (= D) and 40 (> D);
    # and 3 equal rows (the identity). Correlated features of unequal scales with a common offset, as hidden states.
    sizes = [1, 2, 5, 16, 32, 40, 3]
    groups = rng.permutation(np.repeat(np.arange(len(sizes)) * 3, sizes))
    mixing = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
    features = rng.normal(size=(len(groups), dim)) @ mixing * np.exp(rng.normal(size=dim)) + 4 * rng.normal(size=dim)
    features[groups == 18] = features[groups == 18][0]
    features[groups == 6, 7] = 2.5  # a feature constant within the group of 5: only the jitter on its variance
    features = features.astype(np.float32).astype(np.float64)  # float32 inputs, exactly representable in float64
    weights = rng.integers(1, 4, size=len(groups)).astype(np.float64)
    brute = _brute_mahalanobis(features, groups, weights, shrinkage)
    args = (torch.from_numpy(features).float(), torch.from_numpy(groups), torch.from_numpy(weights).float())
    got, dense = group_mahalanobis(*args, shrinkage=shrinkage), group_mahalanobis(*args, shrinkage, dense=True)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-4)
    np.testing.assert_allclose(dense.numpy(), brute, rtol=1e-4)
    np.testing.assert_allclose(got[torch.from_numpy(groups == 18)].numpy(), 0.0, atol=0)
    # The low-rank formula itself, at every size (it is exact for n >= D too), against the dense one in float64.
    for g in np.unique(groups):
        source = torch.from_numpy(features[groups == g])
        w = torch.from_numpy(weights[groups == g])
        centered = source - (w / w.sum()) @ source
        probe = centered + torch.from_numpy(rng.normal(size=centered.shape))  # also off the rows' span
        torch.testing.assert_close(low_rank_mahalanobis(probe, centered, w, shrinkage),
                                   dense_mahalanobis(probe, centered, w, shrinkage), rtol=1e-6, atol=0)  # fmt: skip
    # A reference set: the mean and covariance of 6 other rows per group (low-rank), one scored row per group.
    ref_groups = np.repeat(np.unique(groups), 6)
    ref_features = rng.normal(size=(len(ref_groups), dim)) @ mixing + 4 * rng.normal(size=dim)
    ref_features = ref_features.astype(np.float32).astype(np.float64)
    ref_weights = rng.integers(1, 4, size=len(ref_groups)).astype(np.float64)
    first = np.array([np.flatnonzero(groups == g)[0] for g in np.unique(groups)])
    reference = dict(
        reference_features=torch.from_numpy(ref_features).float(),
        reference_groups=torch.from_numpy(ref_groups),
        reference_weights=torch.from_numpy(ref_weights).float(),
    )
    single = (torch.from_numpy(features[first]).float(), torch.from_numpy(groups[first]))
    expected = _brute_mahalanobis(
        features[first], groups[first], None, shrinkage, (ref_features, ref_groups, ref_weights)
    )
    np.testing.assert_allclose(
        group_mahalanobis(*single, shrinkage=shrinkage, **reference).numpy(), expected, rtol=1e-4
    )
    np.testing.assert_allclose(group_mahalanobis(*single, shrinkage=shrinkage, dense=True, **reference).numpy(),
                               expected, rtol=1e-4)  # fmt: skip


def _numpy_distances(features, groups, weights, shrinkage=None, reference=None) -> np.ndarray:
    """Per group with numpy: the weighted mean (and covariance, shrunk towards its diagonal) of the group's rows or of
    its reference rows, and each row's squared distance to it."""
    out = np.zeros(len(features))
    for g in np.unique(groups):
        if reference is None:
            source, w = features[groups == g], weights[groups == g]
        else:
            ref_features, ref_groups, ref_weights = reference
            source, w = ref_features[ref_groups == g], ref_weights[ref_groups == g]
        w = w / w.sum()
        mean = w @ source
        diff = features[groups == g] - mean
        if shrinkage is None:
            out[groups == g] = (diff**2).sum(1)
            continue
        covariance = np.cov(source.T, aweights=w, bias=True)
        covariance = (1 - shrinkage) * covariance + shrinkage * np.diag(np.diag(covariance))
        covariance += 1e-9 * np.diag(covariance).mean() * np.eye(len(covariance))
        out[groups == g] = np.einsum("id,de,ie->i", diff, np.linalg.inv(covariance), diff)
    return out


@pytest.mark.parametrize("shrinkage", [None, 0.0, 0.1, 1.0])
def test_group_distances_equal_numpy_per_group(shrinkage):
    rng = np.random.default_rng(0)
    # Groups of 12 and 9 rows in 5 dimensions (covariance of full rank), and one of 3 rows (rank 2 < 5: shrinkage
    # needed, so not with shrinkage 0); rows interleaved.
    sizes = [12, 9] + ([3] if shrinkage else [])
    groups = rng.permutation(np.repeat(np.arange(len(sizes)) * 7, sizes))  # labels need not be 0..G-1
    features = rng.normal(size=(len(groups), 5)) * np.array([1.0, 3.0, 0.1, 1.0, 2.0])
    weights = rng.integers(1, 4, size=len(groups)).astype(np.float64)
    args = (torch.from_numpy(features), torch.from_numpy(groups), torch.from_numpy(weights))
    if shrinkage is None:
        got = group_euclidean(*args)
    else:
        got = group_mahalanobis(*args, shrinkage=shrinkage)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _numpy_distances(features, groups, weights, shrinkage), rtol=1e-9)
    # A reference set: other rows of the same groups give the mean (and covariance); one scored row per group.
    ref_groups = np.repeat(np.arange(len(sizes)) * 7, 10)
    ref_features, ref_weights = rng.normal(size=(len(ref_groups), 5)), np.ones(len(ref_groups))
    first = np.array([np.flatnonzero(groups == g)[0] for g in np.unique(groups)])
    reference = dict(reference_features=torch.from_numpy(ref_features), reference_groups=torch.from_numpy(ref_groups))
    single = (torch.from_numpy(features[first]), torch.from_numpy(groups[first]))
    got = group_euclidean(*single, **reference) if shrinkage is None else group_mahalanobis(*single, shrinkage=shrinkage, **reference)  # fmt: skip
    expected = _numpy_distances(
        features[first], groups[first], None, shrinkage, (ref_features, ref_groups, ref_weights)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_group_distances_of_identical_rows_are_zero_and_bad_inputs_are_refused():
    features = torch.tensor([[1.0, 2.0]] * 3 + [[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1])
    for distances in (group_euclidean(features, groups), group_mahalanobis(features, groups)):
        torch.testing.assert_close(distances[:3], torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
        assert (distances[3:] > 0).all()
    with pytest.raises(ValueError, match="group 1 has no reference rows"):
        group_euclidean(features, groups, reference_features=features[:3], reference_groups=groups[:3])
    with pytest.raises(ValueError, match="shrinkage must be in"):
        group_mahalanobis(features, groups, shrinkage=1.5)
    with pytest.raises(ValueError, match="weights must be 5 positive"):
        group_euclidean(features, groups, weights=torch.zeros(5))


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **TINY)  # fmt: skip
    return GPTNeoXForCausalLM(config).double().eval()


def _brute_nll(policy, tokenizer, prompt: str, completion: str) -> tuple[float, float]:
    """Per token, one unpadded forward of the prefix: (mean NLL of the completion's tokens incl. EOS, mean NLL of every
    predicted token incl. the prompt's)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    sequence = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    nll = []
    with torch.no_grad():
        for t in range(1, len(sequence)):
            logits = policy(input_ids=torch.tensor([sequence[:t]])).logits[0, -1]
            nll.append(-logits.log_softmax(-1)[sequence[t]].item())
    return float(np.mean(nll[len(prompt_ids) - 1 :])), float(np.mean(nll))


def test_completion_nll_equals_a_per_token_loop(policy, tokenizer):
    got = completion_nll(policy, tokenizer, PROMPTS, COMPLETIONS, batch_size=3)
    brute = [_brute_nll(policy, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), [completion for completion, _ in brute], rtol=1e-9)
    # The prompt's tokens are conditioned on, not scored: counting them would give other numbers.
    assert not np.allclose(got.numpy(), [every for _, every in brute], rtol=1e-3)
    # Neither the batch size nor the padding side changes it. Left padding in float32: in float64, eager attention
    # turns the rows of padding (which attend to nothing) into NaN that reach the real tokens.
    torch.testing.assert_close(completion_nll(policy, tokenizer, PROMPTS, COMPLETIONS, batch_size=1), got,
                               rtol=1e-9, atol=1e-12)  # fmt: skip
    single = policy.float()
    try:
        right = completion_nll(single, tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
        for kwargs in (
            dict(batch_size=7, padding_side="left"),
            dict(batch_size=2, padding_side="left"),
            dict(batch_size=3),
        ):
            torch.testing.assert_close(completion_nll(single, tokenizer, PROMPTS, COMPLETIONS, **kwargs), right,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    finally:
        policy.double()
    # Conversational completions as samplers return them score their text.
    messages = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    torch.testing.assert_close(completion_nll(policy, tokenizer, PROMPTS, messages, batch_size=3), got)
    with pytest.raises(ValueError, match="one prompt per completion"):
        completion_nll(policy, tokenizer, PROMPTS, COMPLETIONS[:2])
