"""Penalties on precomputed predictions: `PenalizedReward.predict` once, `penalize` / `rank` many times, equal to
calling the reward; `RewardPredictions` checks its shapes and round-trips through safetensors, refusing mismatches."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from safetensors.torch import save_file

from trl_bayes.penalties import (
    PENALTY_SCALES,
    UNCERTAINTIES,
    UNCERTAINTY_FIELDS,
    PenalizedReward,
    Penalty,
    RewardPredictions,
    penalize,
    prompt_groups,
)

from .conftest import make_trainer

# Two members, four responses to two prompts (rows 0-1: prompt 0; rows 2-3: prompt 1), in float64.
# Combined (combine_gaussians): mean [2, 1, -1, 2]; marginal var (4+0, 1+1, 0+4, 2+2) / 4 = [1, 0.5, 1, 1];
# relative var (1+0, 1+1, 0+4, 4+4) / 4 = [0.25, 0.5, 1, 2].
HAND = RewardPredictions(
    means=torch.tensor([[1.0, 2.0, -1.0, 0.0], [3.0, 0.0, -1.0, 4.0]], dtype=torch.float64),
    variances=torch.tensor([[4.0, 1.0, 0.0, 2.0], [0.0, 1.0, 4.0, 2.0]], dtype=torch.float64),
    relative_variances=torch.tensor([[1.0, 1.0, 0.0, 4.0], [0.0, 1.0, 4.0, 4.0]], dtype=torch.float64),
    groups=torch.tensor([0, 0, 1, 1]),
)
R2 = math.sqrt(2)


@pytest.mark.parametrize(
    ("penalty", "k", "uncertainty", "scale", "expected"),
    [
        ("none", 5.0, "marginal", "absolute", [2.0, 1.0, -1.0, 2.0]),  # the members' mean, k unused
        ("std", 2.0, "marginal", "absolute", [0.0, 1.0 - R2, -3.0, 0.0]),  # mean - 2 sqrt(var)
        ("std", 2.0, "relative", "absolute", [1.0, 1.0 - R2, -3.0, 2.0 - 2 * R2]),  # the relative variances instead
        ("var", 0.5, "relative", "absolute", [1.875, 0.75, -1.5, 1.0]),  # mean - var / 2
        ("var", 0.5, "marginal", "absolute", [1.5, 0.75, -1.5, 1.5]),
        ("wco", 0.0, "marginal", "absolute", [1.0, 0.0, -1.0, 0.0]),  # min over members
        ("uwo", 1.0, "relative", "absolute", [1.0, 0.0, -1.0, -2.0]),  # population variances of the means [1, 1, 0, 4]
        # Prompt scale, relative std [1/2, 1/sqrt 2, 1, sqrt 2], k = 1. Prompt 0: r = [2, 1] (sd 1/2), mean std
        # (1/2 + 1/sqrt 2) / 2: factor 1 / (1/2 + 1/sqrt 2). Prompt 1: r = [-1, 2] (sd 3/2), mean std (1 + sqrt 2) / 2:
        # factor 3 / (1 + sqrt 2).
        (
            "std",
            1.0,
            "relative",
            "prompt",
            [
                2.0 - 0.5 / (0.5 + 1 / R2),
                1.0 - (1 / R2) / (0.5 + 1 / R2),
                -1.0 - 3 / (1 + R2),
                2.0 - 3 * R2 / (1 + R2),
            ],
        ),
    ],
)
def test_penalize_hand_computed(penalty, k, uncertainty, scale, expected):
    got = penalize(HAND, penalty, k, uncertainty, scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_penalize_sweeps_without_models_and_subset_picks_members():
    """A sweep is a loop over `penalize`: k moves the reward linearly in the uncertainty, member 0 alone is its own."""
    base = penalize(HAND, "std", 0.0, "relative")
    for k in (0.5, 1.0, 4.0):
        torch.testing.assert_close(
            penalize(HAND, "std", k, "relative"), base - k * (HAND.relative_variances.sum(0) / 4).sqrt()
        )
    first = HAND.subset([0])
    assert first.means.shape == (1, 4) and torch.equal(first.groups, HAND.groups)
    torch.testing.assert_close(penalize(first, "var", 1.0, "marginal"), HAND.means[0] - HAND.variances[0])


@pytest.fixture(scope="module")
def members(tokenizer, tmp_path_factory):
    models = []
    for seed in (0, 1):
        trainer = make_trainer(tokenizer, tmp_path_factory.mktemp(f"m{seed}"), num_pairs=16, seed=seed)
        trainer.train()
        models.append(trainer.posterior)
    return models


# Several completions per prompt, as Best-of-N and GRPO groups score them: the relative variance needs them.
PROMPTS = ["please list fruits : "] * 2 + ["name a few tools : "] * 3 + ["give me some colors : "] * 2
COMPLETIONS = ["apple pear", "fig fig fig", "saw", "saw saw saw", "hammer", "red blue", "green"]


@pytest.fixture(scope="module")
def full_predictions(members):
    """Everything a sweep needs, predicted once: relative predictions carry the marginal variances too; the baselines
    of issue 16 add their fields (hidden_* predicts both distances)."""
    predict = lambda uncertainty: PenalizedReward(  # noqa: E731
        members, penalty="std", uncertainty=uncertainty, batch_size=3
    ).predict(PROMPTS, COMPLETIONS)
    full, prior, hidden = predict("relative"), predict("prior_relative"), predict("hidden_euclidean")
    for other in (prior, hidden):  # the same MAP rewards from every path
        torch.testing.assert_close(other.means, full.means)
    return dataclasses.replace(
        full,
        prior_relative_variances=prior.prior_relative_variances,
        hidden_euclidean=hidden.hidden_euclidean,
        hidden_mahalanobis=hidden.hidden_mahalanobis,
    )


@pytest.mark.parametrize("num_members", [1, 2])
@pytest.mark.parametrize(
    ("penalty", "uncertainty", "scale"), list(itertools.product(list(Penalty), UNCERTAINTIES, PENALTY_SCALES))
)
def test_rank_of_predictions_equals_the_callable(members, full_predictions, num_members, penalty, uncertainty, scale):
    models = members[:num_members]
    kwargs = dict(penalty=penalty.value, k=0.7, uncertainty=uncertainty, scale=scale, batch_size=3)
    predictions = full_predictions.subset(list(range(num_members)))
    ensemble_only = penalty in (Penalty.WCO, Penalty.UWO) and num_members == 1
    if ensemble_only:  # refused alike by the callable and by the pure path, with the same message
        with pytest.raises(ValueError, match="ensemble penalty"):
            PenalizedReward(models, **kwargs)
        with pytest.raises(ValueError, match="ensemble penalty"):
            penalize(predictions, penalty, 0.7, uncertainty, scale)
        return
    reward = PenalizedReward(models, **kwargs)
    called = torch.tensor(reward(PROMPTS, COMPLETIONS))
    own = reward.predict(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(reward.rank(own), called, rtol=0, atol=0)  # the callable is predict + rank
    # The sweep's promise: one full prediction ranks like a fresh call of every configuration.
    torch.testing.assert_close(penalize(predictions, penalty, 0.7, uncertainty, scale), called)
    # Each reward predicts what its penalty needs, and the prompt groups.
    needs_variance = penalty in (Penalty.STD, Penalty.VAR)
    assert (vars(own)[UNCERTAINTY_FIELDS[uncertainty]] is not None) == needs_variance
    assert (own.variances is not None) == (needs_variance and uncertainty in ("marginal", "relative"))
    assert (own.relative_variances is not None) == (needs_variance and uncertainty == "relative")
    assert torch.equal(own.groups, torch.tensor([0, 0, 1, 1, 1, 2, 2]))


def test_score_parts_come_from_the_predictions(members, full_predictions):
    parts = PenalizedReward(members, penalty="var", k=2.0, uncertainty="relative", batch_size=3).score(
        PROMPTS, COMPLETIONS
    )
    torch.testing.assert_close(parts["variances"], full_predictions.relative_variances)
    torch.testing.assert_close(parts["marginal_variances"], full_predictions.variances)
    torch.testing.assert_close(parts["reward"], penalize(full_predictions, "var", 2.0, "relative", "prompt"))


def test_prompt_groups_number_prompts_in_order_of_appearance():
    chat = [{"role": "user", "content": "b"}]
    assert prompt_groups(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]
    assert prompt_groups([chat, list(chat), [{"role": "user", "content": "c"}]]).tolist() == [0, 0, 1]


def test_predictions_refuse_mismatched_shapes():
    means = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"means must have shape \(M, B\).*got \(3,\).*mean\[None\]"):
        RewardPredictions(torch.zeros(3))
    with pytest.raises(ValueError, match=r"variances has shape \(2, 4\) but means has shape \(2, 3\).*one variance"):
        RewardPredictions(means, variances=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"relative_variances has shape \(1, 3\)"):
        RewardPredictions(means, relative_variances=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"groups must be an integer tensor of shape \(B,\) = \(3,\).*one prompt"):
        RewardPredictions(means, groups=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        RewardPredictions(means, groups=torch.zeros(3))


def test_penalize_names_the_missing_field_and_the_fix():
    means_only = RewardPredictions(HAND.means, groups=HAND.groups)
    with pytest.raises(ValueError, match=r"needs RewardPredictions\.variances.*uncertainty='marginal'\)\.predict"):
        penalize(means_only, "std", 1.0, "marginal")
    marginal_only = RewardPredictions(HAND.means, variances=HAND.variances)
    with pytest.raises(ValueError, match=r"needs RewardPredictions\.relative_variances.*uncertainty='relative'"):
        penalize(marginal_only, "var", 1.0, "relative")
    with pytest.raises(ValueError, match=r"scale='prompt' needs RewardPredictions\.groups.*prompt_groups"):
        penalize(marginal_only, "std", 1.0, "marginal", scale="prompt")
    torch.testing.assert_close(penalize(means_only, "uwo", 1.0, "relative"), penalize(HAND, "uwo", 1.0, "relative"))
    for bad, match in [
        (dict(penalty="max"), "Unknown penalty 'max'"),
        (dict(k=-1.0), "k must be >= 0"),
        (dict(uncertainty="absolute"), "Unknown uncertainty 'absolute'"),
        (dict(scale="global"), "Unknown scale 'global'"),
    ]:
        with pytest.raises(ValueError, match=match):
            penalize(HAND, **{**dict(penalty="std", k=1.0, uncertainty="marginal"), **bad})
    with pytest.raises(ValueError, match="ensemble penalty"):
        penalize(HAND.subset([1]), "wco", 0.0, "marginal")


def test_rank_refuses_predictions_of_another_ensemble(members):
    with pytest.raises(ValueError, match="holds 2 members but this PenalizedReward has 1 models"):
        PenalizedReward(members[0], penalty="none").rank(HAND)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "predictions.safetensors"
    HAND.save(path)
    loaded = RewardPredictions.load(path)
    for name in ("means", "variances", "relative_variances", "groups"):
        original, reloaded = getattr(HAND, name), getattr(loaded, name)
        assert reloaded.dtype == original.dtype and torch.equal(reloaded, original), name
    torch.testing.assert_close(
        penalize(loaded, "std", 1.0, "relative", "prompt"), penalize(HAND, "std", 1.0, "relative", "prompt")
    )
    # Absent fields stay absent; the dict of tensors holds only what is there.
    partial = RewardPredictions(HAND.means, variances=HAND.variances)
    assert set(partial.state_dict()) == {"means", "variances"}
    reloaded = RewardPredictions.from_state_dict(partial.state_dict())
    assert reloaded.relative_variances is None and reloaded.groups is None


def test_load_fails_loudly_on_mismatch(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"means": torch.zeros(2, 3), "variances": torch.zeros(2, 5)}, str(path))
    with pytest.raises(ValueError, match=r"variances has shape \(2, 5\) but means has shape \(2, 3\)"):
        RewardPredictions.load(path)
    save_file({"means": torch.zeros(2, 3), "rel_var": torch.zeros(2, 3)}, str(path))
    with pytest.raises(ValueError, match=r"Not RewardPredictions.*unexpected: \['rel_var'\]"):
        RewardPredictions.load(path)
    with pytest.raises(ValueError, match="Not RewardPredictions.*expected `means`"):
        RewardPredictions.from_state_dict({"variances": torch.zeros(2, 3)})


# Issue 16's baselines: squared distances, penalized like variances. Member 0 of HAND's two.
TYPICAL = dataclasses.replace(
    HAND.subset([0]),
    prior_relative_variances=torch.tensor([[4.0, 1.0, 9.0, 0.25]], dtype=torch.float64),
    hidden_euclidean=torch.tensor([[1.0, 4.0, 0.0, 16.0]], dtype=torch.float64),
    hidden_mahalanobis=torch.tensor([[9.0, 0.0, 1.0, 4.0]], dtype=torch.float64),
)


@pytest.mark.parametrize("uncertainty", ["prior_relative", "hidden_euclidean", "hidden_mahalanobis"])
def test_typicality_uncertainties_penalize_their_distance_with_std_and_its_square_with_var(uncertainty, tmp_path):
    squared = vars(TYPICAL)[UNCERTAINTY_FIELDS[uncertainty]][0]
    mean = TYPICAL.means[0]
    torch.testing.assert_close(penalize(TYPICAL, "std", 2.0, uncertainty), mean - 2.0 * squared.sqrt())
    torch.testing.assert_close(penalize(TYPICAL, "var", 0.5, uncertainty), mean - 0.5 * squared)
    # saved and loaded with the rest
    TYPICAL.save(tmp_path / "typical.safetensors")
    loaded = RewardPredictions.load(tmp_path / "typical.safetensors")
    assert torch.equal(vars(loaded)[UNCERTAINTY_FIELDS[uncertainty]], vars(TYPICAL)[UNCERTAINTY_FIELDS[uncertainty]])
    torch.testing.assert_close(penalize(loaded, "std", 1.0, uncertainty, "prompt"),
                               penalize(TYPICAL, "std", 1.0, uncertainty, "prompt"))  # fmt: skip
    with pytest.raises(ValueError, match=rf"needs RewardPredictions\.{UNCERTAINTY_FIELDS[uncertainty]}.*"
                                         rf"uncertainty='{uncertainty}'\)\.predict"):  # fmt: skip
        penalize(HAND, "std", 1.0, uncertainty)
    with pytest.raises(ValueError, match=r"hidden_euclidean has shape \(1, 3\)"):
        RewardPredictions(HAND.means, hidden_euclidean=torch.zeros(1, 3))


def test_typicality_uncertainties_are_the_typicality_functions(members):
    from trl_bayes.typicality import group_euclidean, group_mahalanobis, predict_hidden, predict_prior_relative

    groups = prompt_groups(PROMPTS)
    prior = PenalizedReward(members, uncertainty="prior_relative", batch_size=3).score(PROMPTS, COMPLETIONS)
    expected = torch.stack([predict_prior_relative(m, PROMPTS, COMPLETIONS, batch_size=3)[1] for m in members])
    torch.testing.assert_close(prior["variances"], expected)
    hidden = PenalizedReward(members, uncertainty="hidden_mahalanobis", batch_size=3).predict(PROMPTS, COMPLETIONS)
    features = [predict_hidden(m, PROMPTS, COMPLETIONS) for m in members]
    torch.testing.assert_close(
        hidden.hidden_mahalanobis, torch.stack([group_mahalanobis(f, groups) for f in features])
    )
    torch.testing.assert_close(hidden.hidden_euclidean, torch.stack([group_euclidean(f, groups) for f in features]))
    assert (hidden.hidden_euclidean > 0).all() and (prior["variances"] > 0).all()


@pytest.mark.parametrize("uncertainty", ["prior_relative", "hidden_euclidean", "hidden_mahalanobis"])
def test_a_reference_set_that_is_the_group_gives_the_groups_scores(members, full_predictions, uncertainty):
    """PPO scores one completion per prompt against a reference set: when that set is the prompt's completions, each
    completion gets what it gets when the whole group is scored at once."""
    reference = {p: [c for q, c in zip(PROMPTS, COMPLETIONS, strict=True) if q == p] for p in set(PROMPTS)}
    firsts = [PROMPTS.index(p) for p in dict.fromkeys(PROMPTS)]
    # scale="absolute": one completion per prompt has no spread to scale k by (refused with "prompt", the default).
    reward = PenalizedReward(members, uncertainty=uncertainty, batch_size=3, reference=reference, scale="absolute")
    with pytest.raises(ValueError, match="scale='prompt' measures .* single completion.*pass scale='absolute'"):
        PenalizedReward(members, uncertainty=uncertainty, reference=reference)(PROMPTS[:1], COMPLETIONS[:1])
    single = reward.predict([PROMPTS[i] for i in firsts], [COMPLETIONS[i] for i in firsts])
    field = UNCERTAINTY_FIELDS[uncertainty]
    torch.testing.assert_close(vars(single)[field], vars(full_predictions)[field][:, firsts], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=rf"uncertainty='{uncertainty}' measures each completion against the other"):
        PenalizedReward(members, uncertainty=uncertainty).predict(PROMPTS[1:3], COMPLETIONS[1:3])
    with pytest.raises(ValueError, match="`reference` is the group.*not 'marginal'"):
        PenalizedReward(members, uncertainty="marginal", reference=reference)
