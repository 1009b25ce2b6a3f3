"""The relative variance Var(r_i - mean_j r_j) within a prompt's group, against brute force in float64.

Reference: per-response reward gradients from one unpadded autograd call each, the posterior covariance as a dense
matrix (laplace-torch's `posterior_covariance` for full, `diag(posterior_variance)` for diag, the inverse of the dense
Kronecker precision for kron), the reward covariance C = J Sigma J^T, and the variance of r_i minus the weighted group
mean read off C: C_ii - 2 sum_j w_j C_ij + sum_jk w_j w_k C_jk. No centered Jacobian is formed on that side.
"""

from __future__ import annotations

import pytest
import torch

from trl_bayes import PenalizedReward
from trl_bayes.generation import pad_token_ids, tokenize_response
from trl_bayes.laplace_lora import (
    RewardPairModel,
    fit_laplace,
    make_laplace,
    pop_input_require_grads_hooks,
    select_laplace_parameters,
)
from trl_bayes.per_sample import GLMVariance, PosteriorScale, centered, layer_gradients, stream_layer_gradients
from trl_bayes.relative_variance import group_blocks, prompt_key
from trl_bayes.reward_model import BayesianRewardModel

from .conftest import GROUPED_COMPLETIONS as COMPLETIONS
from .conftest import GROUPED_PROMPTS as PROMPTS
from .conftest import GROUPED_WEIGHTS as WEIGHTS
from .conftest import TINY_MODEL as TINY
from .conftest import lora_config, make_trainer


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    trainer = make_trainer(
        tokenizer,
        tmp_path_factory.mktemp("relative"),
        num_pairs=10,
        dtype=torch.float64,
        model_kwargs=TINY,
        peft=lora_config(r=2),
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    select_laplace_parameters(model, "all")
    pop_input_require_grads_hooks(model)
    pairs = list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True))
    return model, pairs


def _posterior(model, tokenizer, pairs, structure) -> BayesianRewardModel:
    la = make_laplace(RewardPairModel(model), structure, 0.5, "reduce")
    la = fit_laplace(la, pairs, tokenizer.pad_token_id, batch_size=4)
    return BayesianRewardModel(model, tokenizer, la, {"hessian_structure": structure})


def _dense_covariance(posterior: BayesianRewardModel) -> torch.Tensor:
    la, structure = posterior.laplace, posterior.hessian_structure
    if structure == "full":
        return la.posterior_covariance
    if structure == "diag":
        return torch.diag(la.posterior_variance)
    delta = float(la.prior_precision)
    blocks = [torch.kron(*block) if len(block) == 2 else block[0] for block in la.H_facs.kfacs]
    precision = torch.block_diag(*blocks) + delta * torch.eye(la.n_params, dtype=torch.float64)
    return torch.linalg.inv(precision)


def _jacobians(posterior: BayesianRewardModel, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rewards, rows = [], []
    posterior.model.eval()
    for response in ids:
        reward = posterior.model(input_ids=torch.tensor([response])).logits.reshape(())
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(reward, posterior.params)]))
        rewards.append(reward.detach())
    return torch.stack(rewards), torch.stack(rows)


def _brute_force(covariance: torch.Tensor, groups: list, weights: list[float]) -> torch.Tensor:
    """Var(r_i - sum_j w_j r_j / W) from the reward covariance C (B, B), groups and weights per response."""
    out = torch.zeros(covariance.shape[0], dtype=torch.float64)
    for i, g in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == g]
        w = torch.zeros(covariance.shape[0], dtype=torch.float64)
        w[members] = torch.tensor([weights[j] for j in members], dtype=torch.float64)
        w /= w.sum()
        out[i] = covariance[i, i] - 2 * (w @ covariance[:, i]) + w @ covariance @ w
    return out


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_relative_variance_equals_brute_force(tiny, tokenizer, structure):
    model, pairs = tiny
    posterior = _posterior(model, tokenizer, pairs, structure)
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    rewards, jacobians = _jacobians(posterior, ids)
    covariance = jacobians @ _dense_covariance(posterior) @ jacobians.T  # (B, B) reward covariance

    # batch_size=3: batches cut across groups, and group means are summed over several batches.
    for weights in (None, WEIGHTS):
        mean, var, relative = posterior.predict_relative(PROMPTS, COMPLETIONS, batch_size=3, weights=weights)
        expected = _brute_force(covariance, PROMPTS, weights or [1.0] * len(PROMPTS))
        assert relative.dtype == torch.float64
        torch.testing.assert_close(mean, rewards, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var, covariance.diagonal(), rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(relative, expected, rtol=1e-5, atol=1e-10)
        assert (relative > 0).all()  # distinct responses: strictly positive, not a clamp at zero
        # Centering removes exactly the variance of the weighted group mean: sum_i w_i (var_i - rel_i) = W Var(mean).
        w_all = torch.tensor(weights or [1.0] * len(PROMPTS), dtype=torch.float64)
        for prompt in set(PROMPTS):
            mask = torch.tensor([p == prompt for p in PROMPTS])
            w = torch.where(mask, w_all, 0.0)
            removed = (w * (var.double() - relative.double())).sum()
            torch.testing.assert_close(removed, w @ covariance @ w / w.sum(), rtol=1e-5, atol=1e-10)
            assert removed > 0


def test_relative_variance_of_identical_responses_is_zero(tiny, tokenizer):
    model, pairs = tiny
    posterior = _posterior(model, tokenizer, pairs, "kron")
    prompts = ["please list fruits : "] * 3 + ["name a few tools : "] * 2
    completions = ["apple pear"] * 3 + ["saw", "hammer drill"]
    _, var, relative = posterior.predict_relative(prompts, completions, batch_size=2)
    assert (var[:3] > 1e-3).all()  # the marginal variance of the same responses is far from zero
    torch.testing.assert_close(relative[:3], torch.zeros(3, dtype=relative.dtype), rtol=0, atol=1e-10 * var.max())
    assert (relative[3:] > 0).all()


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_relative_variance_is_invariant_to_a_prompt_only_feature(tiny, tokenizer, structure):
    """Adding the same gradient c to every response of a group (a feature of the prompt alone, like a prompt offset)
    leaves the centered quadratic form unchanged, while it changes the marginal one."""
    model, pairs = tiny
    posterior = _posterior(model, tokenizer, pairs, structure)
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    input_ids, attention_mask = pad_token_ids(ids, tokenizer.pad_token_id)
    per_param: dict[int, torch.Tensor] = {}

    def keep(layer, inputs, output_grads):
        per_param.update(layer_gradients(layer, inputs, output_grads))

    model.eval()
    with torch.enable_grad(), stream_layer_gradients(posterior.layers, keep):
        torch.autograd.grad(model(input_ids=input_ids, attention_mask=attention_mask).logits.sum(), posterior.params)
    groups = torch.tensor([0 if p.startswith("please") else 1 for p in PROMPTS])
    gen = torch.Generator().manual_seed(0)
    shifted = {
        i: j + (torch.randn(2, *j.shape[1:], generator=gen, dtype=j.dtype) * 3)[groups] for i, j in per_param.items()
    }

    def variances(jacobians, center):
        means = {i: torch.stack([j[groups == g].mean(0) for g in (0, 1)]) for i, j in jacobians.items()}
        acc = GLMVariance(PosteriorScale(posterior.laplace), centered(means, groups) if center else None)
        for index in range(len(posterior.params)):
            acc.add(index, jacobians[index])
        return acc.finish()

    torch.testing.assert_close(variances(shifted, True), variances(per_param, True), rtol=1e-8, atol=1e-12)
    assert not torch.allclose(variances(shifted, False), variances(per_param, False), rtol=1e-2)


def test_reference_set_equals_own_group_when_it_is_the_group(tiny, tokenizer):
    model, pairs = tiny
    posterior = _posterior(model, tokenizer, pairs, "kron")
    reference = {p: [c for q, c in zip(PROMPTS, COMPLETIONS, strict=True) if q == p] for p in set(PROMPTS)}
    own = posterior.predict_relative(PROMPTS, COMPLETIONS, batch_size=3)
    # One completion per prompt (as PPO scores), centered on the reference set.
    single = posterior.predict_relative(PROMPTS[:2], COMPLETIONS[:2], batch_size=3, reference=reference)
    for got, expected in zip(single, own, strict=True):
        torch.testing.assert_close(got, expected[:2], rtol=1e-6, atol=1e-10)
    assert set(posterior.reference_cache) == set(PROMPTS)  # the reference means are kept per prompt


def test_lonely_prompt_is_refused(tiny, tokenizer):
    model, pairs = tiny
    posterior = _posterior(model, tokenizer, pairs, "diag")
    with pytest.raises(ValueError, match="single completion"):
        posterior.predict_relative(["please list fruits : ", "name a few tools : "], ["apple", "saw"])
    with pytest.raises(ValueError, match="no completions for the prompt"):
        posterior.predict_relative(["name a few tools : "], ["saw"], reference={"other : ": ["x"]})
    with pytest.raises(ValueError, match="positive"):
        posterior.predict_relative(PROMPTS, COMPLETIONS, weights=[0.0] * len(PROMPTS))


def test_penalized_reward_relative_per_member_then_combined(tiny, tokenizer):
    model, pairs = tiny
    members = [_posterior(model, tokenizer, pairs, s) for s in ("kron", "diag")]
    reward = PenalizedReward(members, penalty="std", k=2.0, uncertainty="relative", batch_size=3, scale="absolute")
    parts = reward.score(PROMPTS, COMPLETIONS)
    relatives = torch.stack([m.predict_relative(PROMPTS, COMPLETIONS, batch_size=3)[2] for m in members])
    torch.testing.assert_close(parts["variances"], relatives)
    expected = parts["means"].mean(0) - 2.0 * (relatives.sum(0) / 4).sqrt()
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, COMPLETIONS), dtype=expected.dtype), expected)
    assert (parts["marginal_variances"] > parts["variances"]).any()
    with pytest.raises(ValueError, match="uncertainty"):
        PenalizedReward(members, uncertainty="absolute")
    with pytest.raises(ValueError, match="relative"):
        PenalizedReward(members, uncertainty="marginal", reference={"a": ["b"]})


def test_group_blocks_keep_groups_whole():
    keys = ["a", "b", "a", "c", "b", "c", "d"]
    blocks = group_blocks(keys, min_block_size=3)
    assert blocks == [[0, 2, 1, 4], [3, 5, 6]]
    assert sorted(i for block in blocks for i in block) == list(range(len(keys)))
    assert prompt_key([{"role": "user", "content": "hi"}]) == prompt_key([{"content": "hi", "role": "user"}])
