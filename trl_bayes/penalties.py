"""Penalized rewards: one Bayesian reward model, or an ensemble of them, as one number per response, and
`PenalizedReward`, the TRL reward function built on them.

Penalties (Yang et al. 2024, arXiv 2402.13210): `std` = mean - k sqrt(var), `var` = mean - k var.
Ensembles of Laplace reward models ("LA Ens") combine as the mean of independent Gaussians:
mean = (1/M) sum mean_i, var = (1/M^2) sum var_i. MAP-ensemble baselines (Coste et al., ICLR 2024,
arXiv 2310.02743): `wco` = min over members, `uwo` = mean - k * (population variance of the members' means).

The uncertainty a `std` / `var` penalty uses is one of `UNCERTAINTIES`: the paper's marginal variance, the relative
variance within the prompt's group, or a typicality baseline of it (`trl_bayes.typicality`; issue 16 found that in the
offline world typicality within the prompt's candidates does most of the relative penalty's work).

One path from models to rewards, in two steps, so that a sweep over penalties and k runs the models once:
`PenalizedReward.predict` -> `RewardPredictions` (the forward-backward passes; saveable), then `penalize` -> `(B,)`
(microseconds: the variance `uncertainty` names, through `penalized_reward`, the pure penalty over `(M, B)` tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .relative_variance import prompt_key
from .reward_model import BayesianRewardModel
from .typicality import group_euclidean, group_mahalanobis, predict_hidden, predict_prior_relative

# ---------------------------------------------------------------------------------------------------------------------
# Penalties: pure functions over tensors of shape (M, B) = (ensemble members, responses).


UNCERTAINTY_FIELDS = {
    "marginal": "variances",
    "relative": "relative_variances",
    "prior_relative": "prior_relative_variances",
    "hidden_euclidean": "hidden_euclidean",
    "hidden_mahalanobis": "hidden_mahalanobis",
}
"""Which uncertainty a `std` / `var` penalty uses -> the `RewardPredictions` field that holds it (a variance, or a
squared distance: `std` takes its square root, `var` takes it as it is, so that k means the same for each):

- `marginal`: J Σ J^T, the paper's Laplace variance of the reward.
- `relative`: (J_i - J_mean) Σ (J_i - J_mean)^T, the variance of the reward minus its prompt group's mean
  (`relative_variance`): the prompt's unidentified offset cancels.
- `prior_relative`: |J_i - J_mean|^2 / δ, the same centering with the prior covariance I / δ in place of the posterior
  (`typicality.PriorScale`): how much of `relative` is the centering alone.
- `hidden_euclidean`: |f_i - mean_g f|^2, f the reward model's last hidden state at the token its head reads
  (`typicality.hidden_features`), mean over the prompt's group: typicality, no posterior and no preference data.
- `hidden_mahalanobis`: the same distance under the group's own covariance of f, shrunk towards its diagonal
  (`typicality.group_mahalanobis`).

Issue 16: in the offline world the last two matched or beat `relative`, and `prior_relative` kept most of its gain, so
read a gain of `relative` against them. Every option but `marginal` needs several completions per prompt in a call, or
a `reference` set.
"""
UNCERTAINTIES = tuple(UNCERTAINTY_FIELDS)
GROUP_UNCERTAINTIES = UNCERTAINTIES[1:]
"""The uncertainties measured within a prompt's group of completions (or against its `reference` set)."""
LAPLACE_UNCERTAINTIES = ("marginal", "relative")
"""The uncertainties that are variances of the reward under the Laplace posterior (the others are typicality)."""


class Penalty(str, Enum):
    """How a (possibly ensembled) Gaussian reward becomes one number per response."""

    NONE = "none"
    """The (ensemble-mean) MAP reward, no penalty."""
    STD = "std"
    """mean - k * sqrt(var): the paper's standard-deviation penalty."""
    VAR = "var"
    """mean - k * var: the paper's variance penalty."""
    WCO = "wco"
    """Worst-case optimization over MAP ensemble members: min_i mean_i (Coste et al.)."""
    UWO = "uwo"
    """Uncertainty-weighted optimization: mean - k * population variance of the members' MAP rewards (Coste et al.)."""


def combine_gaussians(means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of M independent Gaussians per response: `(M, B)` means and variances -> mean `(B,)` = (1/M) sum_i mean_i
    and variance `(B,)` = (1/M^2) sum_i var_i."""
    m = means.shape[0]
    return means.mean(0), variances.sum(0) / m**2


PENALTY_SCALES = ("absolute", "prompt")
"""Units of k: `absolute` (k * std in reward units, the paper's) or `prompt` (relative to each prompt's spreads)."""
SCALED_PENALTIES = (Penalty.STD, Penalty.VAR, Penalty.UWO)
"""The penalties with a strength k, whose units `scale` sets; `none` and `wco` have no k and ignore it."""


def prompt_scale(reward: torch.Tensor, uncertainty: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`(B,)`: per response, sd_g(reward) / mean_g(uncertainty) over its group g (one prompt's candidates), so that
    the penalty k * sd_g(r) * u_i / mean_g(u) with k = 1 moves a response of the group's mean uncertainty down by one
    reward sd of its group, whatever the scales of reward and variance (they differ between models, prompts, worlds).

    Population sds. A group of one response, of equal rewards, or of mean uncertainty 0 gets factor 0 (no spread).

    Args:
        reward: `(B,)` the unpenalized reward (the ensemble's mean MAP reward).
        uncertainty: `(B,)` what is penalized: the std or the variance.
        groups: `(B,)` integer group of each response.
    """
    _, index = torch.unique(groups, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, torch.ones_like(reward))
    group_mean = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, reward) / count
    spread = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, (reward - group_mean[index]) ** 2)
    sd = (spread / count).sqrt()
    mean_uncertainty = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, uncertainty.to(reward)) / count
    factor = torch.where(mean_uncertainty > 0, sd / mean_uncertainty.clamp_min(torch.finfo(reward.dtype).tiny), 0.0)
    return factor[index]


def penalized_reward(
    means: torch.Tensor,
    variances: torch.Tensor | None,
    penalty: Penalty | str,
    k: float,
    scale: str = "absolute",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `penalty` with strength `k` to member rewards: the pure penalty over tensors, which `penalize` (on
    `RewardPredictions`) and `PenalizedReward` call. `std` / `var` penalize the combined Gaussian of the members
    (`combine_gaussians`); `wco` / `uwo` / `none` use the means only.

    Args:
        means: `(M, B)` MAP rewards of M members (M = 1 for a single model).
        variances: `(M, B)` Laplace variances, or `None` for the penalties that do not use them.
        scale: units of k for `std` / `var` / `uwo` (`SCALED_PENALTIES`): `"absolute"` (mean - k u) or `"prompt"`
            (mean - k * prompt_scale * u, see `prompt_scale`, within each of `groups`).
        groups: `(B,)` integer group (prompt) of each response; needed with `scale="prompt"` for those penalties.

    Returns:
        `(B,)` rewards.
    """
    if scale not in PENALTY_SCALES:
        raise ValueError(f"Unknown penalty scale {scale!r}: choose one of {list(PENALTY_SCALES)}.")
    penalty = Penalty(penalty)
    if scale == "prompt" and penalty in SCALED_PENALTIES and groups is None:
        raise ValueError("scale='prompt' needs the `groups` (prompts) of the responses.")
    if penalty == Penalty.WCO:
        return means.min(0).values
    if penalty == Penalty.UWO:
        mean, spread = means.mean(0), means.var(0, unbiased=False)
        if scale == "prompt":
            spread = prompt_scale(mean, spread, groups) * spread
        return mean - k * spread
    if penalty == Penalty.NONE:
        return means.mean(0)
    if variances is None:
        raise ValueError(f"penalty='{penalty.value}' needs the Laplace variances: pass `variances` of shape (M, B).")
    mean, var = combine_gaussians(means, variances)
    uncertainty = var.sqrt() if penalty == Penalty.STD else var
    if scale == "prompt":
        uncertainty = prompt_scale(mean, uncertainty, groups) * uncertainty
    return mean - k * uncertainty


# ---------------------------------------------------------------------------------------------------------------------
# Predictions, computed once and penalized many times.


@dataclass(frozen=True, eq=False)
class RewardPredictions:
    """What M reward models predict for B responses: everything a penalty needs, computed once by
    `PenalizedReward.predict` (the forward-backward passes) and penalized any number of times by `penalize`.

    Args:
        means: `(M, B)` MAP rewards of M members (M = 1 for a single model).
        variances: `(M, B)` marginal Laplace variances J Σ J^T, or `None`; `uncertainty="marginal"` uses them.
        relative_variances: `(M, B)` Var(r_i - mean_j r_j) over the completions j of response i's prompt
            (`BayesianRewardModel.predict_relative`), or `None`; `uncertainty="relative"` uses them.
        groups: `(B,)` integer prompt group of each response (equal prompts share one), or `None`; `scale="prompt"`
            uses them.
        prior_relative_variances: `(M, B)` |J_i - J_mean|^2 / δ (`typicality.predict_prior_relative`), or `None`;
            `uncertainty="prior_relative"` uses them.
        hidden_euclidean, hidden_mahalanobis: `(M, B)` squared distances of each response's hidden features to its
            prompt group's (`typicality.group_euclidean` / `group_mahalanobis`), or `None`; the `uncertainty` of the
            same name uses them.

    `state_dict()` / `from_state_dict()` (the tensors that are not `None`, by field name) and `save()` / `load()` (a
    safetensors file) round-trip it; other keys or shapes are refused.
    """

    means: torch.Tensor
    variances: torch.Tensor | None = None
    relative_variances: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    prior_relative_variances: torch.Tensor | None = None
    hidden_euclidean: torch.Tensor | None = None
    hidden_mahalanobis: torch.Tensor | None = None

    def __post_init__(self):
        if self.means.dim() != 2:
            raise ValueError(
                f"RewardPredictions.means must have shape (M, B) = (members, responses), got {tuple(self.means.shape)}:"
                " stack the members' rewards, e.g. `mean[None]` for a single model."
            )
        for name in UNCERTAINTY_FIELDS.values():
            value = vars(self)[name]
            if value is not None and value.shape != self.means.shape:
                raise ValueError(
                    f"RewardPredictions.{name} has shape {tuple(value.shape)} but means has shape "
                    f"{tuple(self.means.shape)}: pass one variance per member and response, in the same order."
                )
        if self.groups is not None and (self.groups.shape != self.means.shape[1:] or self.groups.is_floating_point()):
            raise ValueError(
                f"RewardPredictions.groups must be an integer tensor of shape (B,) = ({self.means.shape[1]},), got "
                f"{self.groups.dtype} of shape {tuple(self.groups.shape)}: one prompt index per response."
            )

    def subset(self, members: slice | Sequence[int]) -> RewardPredictions:
        """The predictions of some members, e.g. `subset([0])` for member 0 of an ensemble (its MAP / LA reward)."""
        per_member = {name: vars(self)[name] for name in ("means", *UNCERTAINTY_FIELDS.values())}
        return RewardPredictions(
            **{name: None if value is None else value[members] for name, value in per_member.items()},
            groups=self.groups,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.contiguous() for name, value in vars(self).items() if value is not None}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> RewardPredictions:
        expected = [field.name for field in fields(cls)]
        unexpected = sorted(set(state) - set(expected))
        if unexpected or "means" not in state:
            raise ValueError(
                f"Not RewardPredictions: got keys {sorted(state)}, expected `means` and any of {expected[1:]}"
                f"{f' (unexpected: {unexpected})' if unexpected else ''}. Save them with `RewardPredictions.save`."
            )
        return cls(**state)

    def save(self, path: str | Path) -> None:
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> RewardPredictions:
        return cls.from_state_dict(load_file(str(path)))


def prompt_groups(prompts: Sequence[Any]) -> torch.Tensor:
    """`(B,)` integer group of each prompt in order of first appearance; equal prompts (`prompt_key`) share one."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(prompt_key(p), len(index)) for p in prompts], dtype=torch.long)


def _check_group_sizes(prompts: Sequence[Any], groups: torch.Tensor, what: str, fix: str) -> None:
    """A response alone in its group is at distance 0 from it, and has no spread to scale k by: refuse such prompts
    rather than return zeros. `what` measures against the group; `fix` says what to do instead."""
    counts = torch.bincount(groups)
    if (counts < 2).any():
        lonely = prompts[int(torch.nonzero(counts[groups] < 2)[0])]
        raise ValueError(
            f"{what} measures each completion against the other completions of its prompt, but "
            f"{int((counts < 2).sum())} prompt(s) have a single completion (e.g. {prompt_key(lonely)[:60]!r}). Score "
            f"all completions of a prompt in one call, or {fix}."
        )


def _check_options(penalty: Penalty | str, k: float, uncertainty: str, scale: str, num_members: int) -> Penalty:
    """The checks shared by `PenalizedReward` and `penalize`: one set of rules, one set of messages."""
    if penalty not in [p.value for p in Penalty]:
        raise ValueError(f"Unknown penalty {penalty!r}: choose one of {[p.value for p in Penalty]}.")
    penalty = Penalty(penalty)
    if penalty in (Penalty.WCO, Penalty.UWO) and num_members < 2:
        raise ValueError(f"penalty='{penalty.value}' is an ensemble penalty: pass at least two models.")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}.")
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"Unknown uncertainty {uncertainty!r}: choose one of {list(UNCERTAINTIES)}.")
    if scale not in PENALTY_SCALES:
        raise ValueError(f"Unknown scale {scale!r}: choose one of {list(PENALTY_SCALES)}.")
    return penalty


def penalize(
    predictions: RewardPredictions, penalty: Penalty | str, k: float, uncertainty: str, scale: str = "absolute"
) -> torch.Tensor:
    """`(B,)`: the reward `PenalizedReward(models, penalty, k, uncertainty=uncertainty, scale=scale)` gives the
    responses that `predictions` (from `PenalizedReward.predict`, `RewardPredictions.load`, or cached arrays) were
    made for, without running a model: `penalized_reward` on the variance (or squared distance) `uncertainty` names
    (`UNCERTAINTY_FIELDS`)."""
    penalty = _check_options(penalty, k, uncertainty, scale, predictions.means.shape[0])
    variances = None
    if penalty in (Penalty.STD, Penalty.VAR):
        name = UNCERTAINTY_FIELDS[uncertainty]
        variances = vars(predictions)[name]
        if variances is None:
            raise ValueError(
                f"penalty='{penalty.value}' with uncertainty='{uncertainty}' needs RewardPredictions.{name}: predict "
                f"them with `PenalizedReward(models, penalty='{penalty.value}', uncertainty='{uncertainty}').predict`."
            )
    if scale == "prompt" and penalty in SCALED_PENALTIES and predictions.groups is None:
        raise ValueError(
            "scale='prompt' needs RewardPredictions.groups, the prompt of each response: pass `groups`, e.g. "
            "`prompt_groups(prompts)`."
        )
    return penalized_reward(predictions.means, variances, penalty, k, scale, predictions.groups)


# ---------------------------------------------------------------------------------------------------------------------
# The TRL reward function.

DEFAULT_UNCERTAINTY, DEFAULT_PENALTY, DEFAULT_SCALE, DEFAULT_K = "hidden_mahalanobis", Penalty.VAR, "prompt", 4.0
"""`PenalizedReward`'s defaults, chosen by issue 16's rule from validation gold alone (README, "How the defaults were
chosen"; docs/study_typicality.md):

- the option (uncertainty, penalty, scale) a single reward model offers with the best mean validation gold at the
  largest n over the study's six Best-of-N panels (3 worlds x 2 proxy backbones, 5 seeds, k chosen per seed on
  validation): `hidden_mahalanobis`, `var`, `scale="prompt"` (3.17; `std` absolute 3.17; the best `relative` option
  3.03);
- k: the value of the base grid {0.5, 1, 2, 4} with the best validation gold pooled over those panels and seeds (4:
  2.94; 2: 2.90; 1: 2.37). The grid's extensions ran only where a seed's pick hit an edge, so they are not pooled.

`scale="prompt"` makes k a count of each prompt's reward spreads, which transfers across models and worlds; it needs
several completions per prompt in a call (Best-of-N, GRPO / RLOO groups). The option needs no posterior: the Laplace
penalties (`relative`, `marginal`) are choices, not the default, because they did not beat it (README, Results).
"""


class PenalizedReward:
    """A TRL reward function from one Bayesian reward model or an ensemble of them.

    Not an `nn.Module` on purpose: GRPO/RLOO treat module rewards as Hugging Face models and score them their own way.
    A plain class rather than a closure, so TRL names it (`__name__`) and it can carry state (the models).

    Args:
        models (`BayesianRewardModel` or a list of them): one model, or independently trained members.
        penalty (`str`, *optional*, defaults to `"var"`): `"none"`, `"std"`, `"var"`, `"wco"` or `"uwo"`. The
            defaults (penalty, k, uncertainty, scale) are `DEFAULT_*` above, chosen on validation data (issue 16).
        k (`float`, *optional*, defaults to `4.0`): penalty strength (the λ of `"uwo"`).
        batch_size (`int` or `None`, *optional*, defaults to `None`): responses per forward pass; `None`: batches of
            up to `batching.DEFAULT_MAX_TOKENS` padded tokens (the models' `predict*` default).
        uncertainty (`str`, *optional*, defaults to `"hidden_mahalanobis"`): which uncertainty the `std`/`var`
            penalties use (`UNCERTAINTY_FIELDS`); `std` subtracts k x its square root, `var` k x itself, whichever
            the option. Every option but `"marginal"` is measured within the completions of the same prompt in the
            call (Best-of-N's candidates, GRPO/RLOO's `num_generations` group), or against `reference`'s completions
            when given; a prompt with a single completion and no `reference` is refused. Ensembles: per member, then
            combined as variances of a mean (sum / M^2): with `scale="absolute"` the meaning of k then depends on M,
            with `scale="prompt"` it does not.
            `"hidden_mahalanobis"` (the default): squared Mahalanobis distance of the reward model's last hidden
            state (what its head reads) to its prompt group's mean, under the group's covariance shrunk towards its
            diagonal. Typicality: no posterior, no backward.
            `"relative"`: the Laplace variance Var(r_i - mean_j r_j); the prompt's unidentified reward offset
            cancels. A second forward-backward per response. `"marginal"`: Var(r_i) = J_i Σ J_i^T (the paper's),
            for one completion per prompt without a reference.
            Baselines of `"relative"`, grouped the same way: `"prior_relative"` (|J_i - J_mean|^2 / δ: the prior in
            place of the posterior) and `"hidden_euclidean"` (the plain distance of the hidden states). For the SFT
            policy's NLL, which no reward model holds, see `trl_bayes.typicality.completion_nll`.
        reference (mapping or callable, *optional*): with a group uncertainty (all but `"marginal"`), completions per
            prompt (a mapping from the prompt string, or a callable of the prompt) whose mean (and, for
            `"hidden_mahalanobis"`, covariance) the reward is measured against, e.g. K samples of the reference
            policy: for callers that score one completion per prompt (PPO). What each needs of them is cached per
            prompt (the mean gradient, P floats; or the hidden features, K x D).
        scale (`str`, *optional*, defaults to `"prompt"`): units of k for `std`, `var` and `uwo` (`none` and `wco`
            have no k and ignore it). `"prompt"`:
            k * sd_g(r) * u_i / mean_g(u) within the completions of each prompt in the call (see `prompt_scale`), so
            that one k fits models and prompts whose rewards and uncertainties live on different scales. Needs
            several completions per prompt in a call (Best-of-N, GRPO / RLOO groups): a prompt alone is refused.
            `"absolute"`: the penalty is k * std (or k * var) in the uncertainty's own units (the paper's); use it
            for one completion per prompt (PPO).

    Calling it is `rank(predict(prompts, completions))`. To sweep penalties and k, predict once (the models' passes)
    and `penalize` the predictions (microseconds each); `uncertainty="relative"` predicts both variances:

    Example:
    ```python
    >>> reward = PenalizedReward(BayesianRewardModel.from_pretrained("rm"))  # the defaults: hidden-state typicality
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], ...)
    >>> laplace = PenalizedReward(rm, penalty="std", k=1.0, uncertainty="relative", scale="absolute")  # the posterior

    >>> predictions = PenalizedReward(members, penalty="std", uncertainty="relative").predict(prompts, completions)
    >>> predictions.save("predictions.safetensors")  # reload with RewardPredictions.load
    >>> for penalty, uncertainty, k in itertools.product(["std", "var"], ["marginal", "relative"], [0.5, 1.0, 2.0]):
    ...     rewards = penalize(predictions, penalty, k, uncertainty)  # (B,) as PenalizedReward(members, ...) gives
    >>> penalize(predictions, "std", 1.0, "relative", scale="prompt")  # groups come with the predictions
    >>> penalize(predictions.subset([0]), "none", 0.0, "relative")  # member 0's MAP reward
    >>> # Typicality under the SFT policy (`trl_bayes.typicality.completion_nll`), through the pure penalty:
    >>> nll = completion_nll(sft_policy, sft_tokenizer, prompts, completions)  # (B,)
    >>> penalized_reward(predictions.means[:1], nll.square()[None], "std", 1.0)  # member 0's MAP reward - 1.0 * NLL
    ```
    """

    __name__ = "penalized_reward"  # TRL names reward functions (columns, metrics) by `__name__`

    def __init__(
        self,
        models: BayesianRewardModel | Sequence[BayesianRewardModel],
        penalty: Penalty | str = DEFAULT_PENALTY,
        k: float = DEFAULT_K,
        batch_size: int | None = None,
        uncertainty: str = DEFAULT_UNCERTAINTY,
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
        scale: str = DEFAULT_SCALE,
    ):
        self.models = [models] if isinstance(models, BayesianRewardModel) else list(models)
        if not self.models:
            raise ValueError("PenalizedReward needs at least one BayesianRewardModel.")
        self.penalty = _check_options(penalty, k, uncertainty, scale, len(self.models))
        if reference is not None and uncertainty not in GROUP_UNCERTAINTIES:
            raise ValueError(
                f"`reference` is the group a relative uncertainty is measured in: set uncertainty to one of "
                f"{list(GROUP_UNCERTAINTIES)} (e.g. 'relative') to use it, not '{uncertainty}'."
            )
        self.k = float(k)
        self.batch_size, self.uncertainty, self.reference, self.scale = batch_size, uncertainty, reference, scale
        # Per member, the hidden features `(K, D)` of each prompt's reference completions (hidden_* uncertainties).
        self.reference_features: list[dict[str, torch.Tensor]] = [{} for _ in self.models]

    @property
    def needs_variance(self) -> bool:
        return self.penalty in (Penalty.STD, Penalty.VAR)

    def predict(self, prompts: Sequence[Any], completions: Sequence[Any]) -> RewardPredictions:
        """The members' predictions this reward's penalty needs, `(M, B)`: `means` always; with `std` / `var`, the
        uncertainty's field (`UNCERTAINTY_FIELDS`): the marginal `variances`; with `uncertainty="relative"` also the
        `relative_variances` (the marginal ones come free with them); `prior_relative_variances`; or both hidden
        distances (either one costs the same features). `groups` always (cheap), for `scale="prompt"`."""
        groups = prompt_groups(prompts)
        if self.needs_variance and self.uncertainty in GROUP_UNCERTAINTIES and self.reference is None:
            _check_group_sizes(
                prompts, groups, f"uncertainty='{self.uncertainty}'", "pass `reference` (completions per prompt)"
            )
        if self.scale == "prompt" and self.penalty in SCALED_PENALTIES:  # k in units of each prompt's reward spread
            _check_group_sizes(
                prompts, groups, "scale='prompt'", "pass scale='absolute' (e.g. PPO, one completion per prompt)"
            )
        if not self.needs_variance or self.uncertainty == "marginal":
            outputs = [
                m.predict(prompts, completions, self.batch_size, return_var=self.needs_variance) for m in self.models
            ]
            variances = torch.stack([var for _, var in outputs]) if self.needs_variance else None
            return RewardPredictions(torch.stack([mean for mean, _ in outputs]), variances, groups=groups)
        if self.uncertainty == "relative":
            triples = [
                m.predict_relative(prompts, completions, self.batch_size, reference=self.reference)
                for m in self.models
            ]
            means, variances, relative = (torch.stack(parts) for parts in zip(*triples, strict=True))
            return RewardPredictions(means, variances, relative, groups)
        if self.uncertainty == "prior_relative":
            pairs = [
                predict_prior_relative(m, prompts, completions, self.batch_size, reference=self.reference)
                for m in self.models
            ]
            means, prior_relative = (torch.stack(parts) for parts in zip(*pairs, strict=True))
            return RewardPredictions(means, groups=groups, prior_relative_variances=prior_relative)
        # One forward per member gives the MAP rewards and the features the head reads.
        outputs = [predict_hidden(m, prompts, completions, self.batch_size, return_rewards=True) for m in self.models]
        means = torch.stack([rewards for _, rewards in outputs])
        distances = [self._hidden_distances(i, prompts, f, groups) for i, (f, _) in enumerate(outputs)]
        euclidean, mahalanobis = (torch.stack(parts) for parts in zip(*distances, strict=True))
        return RewardPredictions(means, groups=groups, hidden_euclidean=euclidean, hidden_mahalanobis=mahalanobis)

    def _hidden_distances(
        self, member: int, prompts: Sequence[Any], features: torch.Tensor, groups: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Member `member`'s squared Euclidean and Mahalanobis distances `(B,)` of the responses' hidden `features`
        `(B, D)` to their prompt group's (or to `reference`'s completions of the prompt)."""
        model = self.models[member]
        if self.reference is None:
            return group_euclidean(features, groups), group_mahalanobis(features, groups)
        cache = self.reference_features[member]
        firsts = {prompt_key(p): (p, int(g)) for p, g in zip(prompts, groups.tolist(), strict=True)}
        for key, (prompt, _) in firsts.items():
            if key not in cache:
                if callable(self.reference):
                    references = self.reference(prompt)
                elif key in self.reference:
                    references = self.reference[key]
                else:
                    raise ValueError(f"`reference` has no completions for the prompt {key[:60]!r}.")
                if len(references) == 0:
                    raise ValueError(f"The reference set of {key[:60]!r} is empty: give each prompt >= 1 completion.")
                cache[key] = predict_hidden(model, [prompt] * len(references), list(references), self.batch_size)
        reference = dict(
            reference_features=torch.cat([cache[key] for key in firsts]),
            reference_groups=torch.cat([torch.full((len(cache[key]),), g) for key, (_, g) in firsts.items()]),
        )
        return group_euclidean(features, groups, **reference), group_mahalanobis(features, groups, **reference)

    def rank(self, predictions: RewardPredictions) -> torch.Tensor:
        """`(B,)` rewards of precomputed predictions with this reward's penalty, k, uncertainty and scale."""
        if predictions.means.shape[0] != len(self.models):
            raise ValueError(
                f"RewardPredictions.means holds {predictions.means.shape[0]} members but this PenalizedReward has "
                f"{len(self.models)} models: rank predictions of the same ensemble, or call `penalize` directly."
            )
        return penalize(predictions, self.penalty, self.k, self.uncertainty, self.scale)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> dict[str, torch.Tensor]:
        """All parts of the reward: `reward` `(B,)`, member `means`/`variances` `(M, B)`, combined `mean`/`var` `(B,)`
        (`variances`/`var` are those of `uncertainty`, e.g. the relative ones with `uncertainty="relative"`, which
        also gives `marginal_variances`)."""
        predictions = self.predict(prompts, completions)
        parts = {"reward": self.rank(predictions), "means": predictions.means}
        variances = vars(predictions)[UNCERTAINTY_FIELDS[self.uncertainty]]
        if variances is not None:
            parts["variances"] = variances
            parts["mean"], parts["var"] = combine_gaussians(predictions.means, variances)
        if predictions.relative_variances is not None:
            parts["marginal_variances"] = predictions.variances
        return parts

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[list[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        # completion_ids are the policy's tokens; the reward model may use another tokenizer, so it re-tokenizes text.
        parts = self.score(prompts, completions)
        if log_metric is not None:
            log_metric("laplace/reward", parts["reward"].mean().item())
            log_metric("laplace/map_reward", parts["means"].mean().item())
            if "var" in parts:  # the Laplace std of the reward, or the square root of a typicality distance
                name = (
                    "laplace/reward_std"
                    if self.uncertainty in LAPLACE_UNCERTAINTIES
                    else f"typicality/{self.uncertainty}"
                )
                log_metric(name, parts["var"].sqrt().mean().item())
        return parts["reward"].tolist()
