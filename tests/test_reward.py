from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trl_bayes.penalties import PenalizedReward, combine_gaussians, penalized_reward, prompt_scale

from .conftest import make_trainer

# Two members, three responses. Hand-computed expectations below.
MEANS = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.0, -1.0]])
VARS = torch.tensor([[4.0, 1.0, 0.0], [0.0, 1.0, 4.0]])


def test_combine_gaussians_is_the_mean_of_independent_gaussians():
    mean, var = combine_gaussians(MEANS, VARS)
    torch.testing.assert_close(mean, torch.tensor([2.0, 1.0, -1.0]))
    torch.testing.assert_close(var, torch.tensor([1.0, 0.5, 1.0]))  # (v1 + v2) / 2^2


def test_combine_gaussians_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    samples = MEANS[:, :, None] + VARS.sqrt()[:, :, None] * torch.randn(2, 3, 200_000, generator=gen)
    average = samples.mean(0)  # the ensemble's reward: mean over members of independent draws
    mean, var = combine_gaussians(MEANS, VARS)
    torch.testing.assert_close(average.mean(-1), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(average.var(-1), var, atol=0.02, rtol=0.02)


def test_penalties_single_model():
    means, variances = MEANS[:1], VARS[:1]
    torch.testing.assert_close(penalized_reward(means, variances, "none", 2.0), torch.tensor([1.0, 2.0, -1.0]))
    torch.testing.assert_close(penalized_reward(means, variances, "std", 2.0), torch.tensor([-3.0, 0.0, -1.0]))
    torch.testing.assert_close(penalized_reward(means, variances, "var", 0.5), torch.tensor([-1.0, 1.5, -1.0]))


def test_penalties_ensembles():
    # LA-Ens: combined mean [2, 1, -1], var [1, .5, 1].
    torch.testing.assert_close(
        penalized_reward(MEANS, VARS, "std", 1.0), torch.tensor([1.0, 1.0 - math.sqrt(0.5), -2.0])
    )
    torch.testing.assert_close(penalized_reward(MEANS, VARS, "var", 2.0), torch.tensor([0.0, 0.0, -3.0]))
    # MAP ensembles (Coste et al.): WCO = min, UWO = mean - k * population variance ([1, 1, 0]).
    torch.testing.assert_close(penalized_reward(MEANS, None, "wco", 1.0), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(penalized_reward(MEANS, None, "uwo", 0.5), torch.tensor([1.5, 0.5, -1.0]))
    torch.testing.assert_close(penalized_reward(MEANS, None, "none", 0.5), torch.tensor([2.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="needs the Laplace variances"):
        penalized_reward(MEANS, None, "std", 1.0)


def test_prompt_scale_penalty_hand_computed():
    """k * sd_g(r) * u_i / mean_g(u) within each prompt's group (population sd).

    Group 0 (rows 0, 2): r = [1, 3] (sd 1), std = [1, 3] (mean 2): factor 1/2; k = 2 -> penalties [1, 3].
    Group 1 (rows 1, 3, 4): r = [0, 0, 6] (mean 2, sd sqrt((4 + 4 + 16) / 3) = 2 sqrt 2), std = [2, 2, 2]:
    factor sqrt 2; k = 2 -> penalty 2 * sqrt 2 * 2 = 4 sqrt 2 each.
    Group 2 (row 5): alone, no spread: factor 0, the reward unchanged.
    """
    means = torch.tensor([[1.0, 0.0, 3.0, 0.0, 6.0, 5.0]], dtype=torch.float64)
    std = torch.tensor([[1.0, 2.0, 3.0, 2.0, 2.0, 7.0]], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 1, 1, 2])
    root8 = 2 * math.sqrt(2)
    factor = prompt_scale(means[0], std[0], groups)
    torch.testing.assert_close(
        factor, torch.tensor([0.5, root8 / 2, 0.5, root8 / 2, root8 / 2, 0.0], dtype=torch.float64)
    )
    got = penalized_reward(means, std**2, "std", 2.0, scale="prompt", groups=groups)
    expected = torch.tensor([0.0, -2 * root8, 0.0, -2 * root8, 6.0 - 2 * root8, 5.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    # var: group 0 has var [1, 9] (mean 5), factor 1/5; k = 1 -> penalties [0.2, 1.8].
    got = penalized_reward(means, std**2, "var", 1.0, scale="prompt", groups=groups)
    torch.testing.assert_close(got[[0, 2]], torch.tensor([0.8, 1.2], dtype=torch.float64))
    # k is in units of the prompt's reward spread: rescaling the variances changes nothing.
    torch.testing.assert_close(penalized_reward(means, 100 * std**2, "var", 1.0, scale="prompt", groups=groups), got)
    # "absolute" is the paper's penalty.
    torch.testing.assert_close(
        penalized_reward(means, std**2, "std", 2.0, scale="absolute", groups=groups), means[0] - 2 * std[0]
    )
    # An ensemble: the factor comes from the combined Gaussian (mean of means, sum of variances / M^2).
    mean, var = combine_gaussians(MEANS, VARS)
    one_group = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(
        penalized_reward(MEANS, VARS, "std", 1.5, scale="prompt", groups=one_group),
        mean - 1.5 * prompt_scale(mean, var.sqrt(), one_group) * var.sqrt(),
    )
    with pytest.raises(ValueError, match="needs the `groups`"):
        penalized_reward(means, std**2, "std", 1.0, scale="prompt")
    with pytest.raises(ValueError, match="Unknown penalty scale"):
        penalized_reward(means, std**2, "std", 1.0, scale="global", groups=groups)


@pytest.fixture(scope="module")
def members(tokenizer, tmp_path_factory):
    models = []
    for seed in (0, 1):
        trainer = make_trainer(tokenizer, tmp_path_factory.mktemp(f"m{seed}"), num_pairs=16, seed=seed)
        trainer.train()
        models.append(trainer.posterior)
    return models


PROMPTS = ["please list fruits : ", "name a few tools : ", "give me some colors : "]
COMPLETIONS = ["apple pear", "saw saw saw", "red blue"]


def test_penalized_reward_is_the_formula_over_predictions(members):
    parts = [m.predict(PROMPTS, COMPLETIONS) for m in members]
    means = torch.stack([p[0] for p in parts])
    variances = torch.stack([p[1] for p in parts])
    for penalty, k in [("std", 0.7), ("var", 2.0), ("none", 1.0)]:
        reward = PenalizedReward(members, penalty=penalty, k=k, uncertainty="marginal", scale="absolute")
        got = reward(PROMPTS, COMPLETIONS)
        assert isinstance(got, list) and len(got) == 3
        torch.testing.assert_close(torch.tensor(got), penalized_reward(means, variances, penalty, k))
    single = PenalizedReward(members[0], penalty="std", k=1.0, uncertainty="marginal", scale="absolute")
    torch.testing.assert_close(torch.tensor(single(PROMPTS, COMPLETIONS)), means[0] - variances[0].sqrt())
    uwo = PenalizedReward(members, penalty="uwo", k=3.0, scale="absolute")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(uwo), means.mean(0) - 3.0 * means.var(0, unbiased=False))


def test_penalized_reward_prompt_scale_groups_equal_prompts(members):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    completions = ["apple pear", "saw", "fig fig", "saw saw saw", "hammer"]
    parts = [m.predict(prompts, completions) for m in members]
    means, variances = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    got = PenalizedReward(members, penalty="std", k=0.7, scale="prompt", uncertainty="marginal")(prompts, completions)
    groups = torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(torch.tensor(got), penalized_reward(means, variances, "std", 0.7, "prompt", groups))
    assert not torch.allclose(torch.tensor(got), penalized_reward(means, variances, "std", 0.7))
    # uwo's members' spread, in units of the prompt's reward sd per unit of its mean spread, by hand in float64.
    mean, spread = means.double().mean(0), means.double().var(0, unbiased=False)
    expected = torch.empty(5, dtype=torch.float64)
    for rows in ([0, 2], [1, 3, 4]):
        factor = mean[rows].std(unbiased=False) / spread[rows].mean()
        expected[rows] = mean[rows] - 3.0 * factor * spread[rows]
    uwo = PenalizedReward(members, penalty="uwo", k=3.0, scale="prompt")(prompts, completions)
    torch.testing.assert_close(torch.tensor(uwo, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    # A prompt alone has no spread to scale k by: refused with the fix, never a silent zero penalty.
    for penalty in ("std", "uwo"):
        with pytest.raises(ValueError, match="scale='prompt' measures .* single completion.*scale='absolute'"):
            PenalizedReward(members, penalty=penalty, uncertainty="marginal", scale="prompt")(
                prompts + [PROMPTS[2]], completions + ["red"]
            )
    # The penalties without a k ignore the scale.
    alone = PenalizedReward(members, penalty="wco", scale="prompt")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(alone), penalized_reward(means_of(members), None, "wco", 0.0))


def means_of(members):
    return torch.stack([m.predict(PROMPTS, COMPLETIONS, return_var=False)[0] for m in members])


def test_penalized_reward_protocol(members):
    reward = PenalizedReward(members[0], penalty="std", uncertainty="marginal", scale="absolute")
    assert not isinstance(reward, nn.Module)  # GRPO/RLOO would treat a module as an HF model
    logged = {}
    reward(
        PROMPTS,
        COMPLETIONS,
        completion_ids=[[1], [2], [3]],
        log_metric=lambda k, v: logged.update({k: v}),
        trainer_state=None,
        log_extra=None,
    )
    assert set(logged) == {"laplace/reward", "laplace/map_reward", "laplace/reward_std"}
    assert logged["laplace/reward_std"] > 0


def test_penalized_reward_rejects_bad_arguments(members):
    with pytest.raises(ValueError, match="Unknown penalty 'max'"):
        PenalizedReward(members, penalty="max")
    with pytest.raises(ValueError, match="ensemble penalty"):
        PenalizedReward(members[0], penalty="wco")
    with pytest.raises(ValueError, match="at least one"):
        PenalizedReward([], penalty="var")
    with pytest.raises(ValueError, match="k must be >= 0"):
        PenalizedReward(members, penalty="var", k=-1)


def test_conversational_completions_are_scored_with_the_chat_template(members):
    model = members[0]
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    try:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
        conversational = PenalizedReward(model, penalty="none")(prompts, completions)
        # This template renders the messages as the plain text "prompt completion" without EOS.
        plain_ids = [
            model.tokenizer(p + " " + c + " ")["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
        expected, _ = model.predict_ids(plain_ids, return_var=False)
        torch.testing.assert_close(torch.tensor(conversational), expected)
    finally:
        model.tokenizer.chat_template = None


def test_penalized_reward_defaults_to_the_hidden_mahalanobis_var_and_refuses_lone_prompts(members):
    """The defaults are issue 16's validation pick (README, "How the defaults were chosen"): the var penalty on the
    hidden-state Mahalanobis distance within each prompt's completions, k = 4 prompt reward sds. Checked against a
    float64 brute force (explicit inverse of the explicitly shrunk covariance). A prompt scored alone has no group:
    refused with the fix, never a silent zero penalty."""
    from trl_bayes.penalties import DEFAULT_K, DEFAULT_PENALTY, DEFAULT_SCALE, DEFAULT_UNCERTAINTY
    from trl_bayes.typicality import DEFAULT_SHRINKAGE, predict_hidden

    reward = PenalizedReward(members[0])
    assert (reward.penalty.value, reward.uncertainty, reward.k, reward.scale) == ("var", "hidden_mahalanobis", 4.0,
                                                                                  "prompt")  # fmt: skip
    assert (reward.penalty, reward.uncertainty, reward.k, reward.scale) == (
        DEFAULT_PENALTY,
        DEFAULT_UNCERTAINTY,
        DEFAULT_K,
        DEFAULT_SCALE,
    )
    with pytest.raises(ValueError, match="single completion.*pass `reference`"):
        reward(PROMPTS, COMPLETIONS)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 4
    completions = ["apple pear", "fig fig fig", "plum", "saw", "hammer saw", "drill", "saw saw saw saw"]
    mean, _ = members[0].predict(prompts, completions, return_var=False)
    features = predict_hidden(members[0], prompts, completions).double()
    expected = torch.empty(len(prompts), dtype=torch.float64)
    for rows in ([0, 1, 2], [3, 4, 5, 6]):
        centered = features[rows] - features[rows].mean(0)
        sample = centered.T @ centered / len(rows)
        diagonal = torch.diag(torch.diagonal(sample))
        shrunk = (1 - DEFAULT_SHRINKAGE) * sample + DEFAULT_SHRINKAGE * diagonal
        shrunk = shrunk + 1e-9 * torch.diagonal(sample).mean() * torch.eye(len(sample), dtype=torch.float64)
        distance = ((centered @ torch.linalg.inv(shrunk)) * centered).sum(1)
        group_mean = mean[rows].double()
        factor = group_mean.std(unbiased=False) / distance.mean()
        expected[rows] = group_mean - 4.0 * factor * distance
    got = torch.tensor(reward(prompts, completions), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
