"""Penalized rewards: one Bayesian reward model, or an ensemble of them, as one number per response, and
`PenalizedReward`, the TRL reward function built on them.

Penalties (Yang et al. 2024, arXiv 2402.13210): `std` = mean - k sqrt(var), `var` = mean - k var.
Ensembles of Laplace reward models ("LA Ens") combine as the mean of independent Gaussians:
mean = (1/M) sum mean_i, var = (1/M^2) sum var_i. MAP-ensemble baselines (Coste et al., ICLR 2024,
arXiv 2310.02743): `wco` = min over members, `uwo` = mean - k * (population variance of the members' means).

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

# ---------------------------------------------------------------------------------------------------------------------
# Penalties: pure functions over tensors of shape (M, B) = (ensemble members, responses).


UNCERTAINTIES = ("marginal", "relative")
"""Which variance a penalty uses: J Σ J^T, or that of the reward minus its prompt group's mean (`relative_variance`)."""


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
        scale: units of k for `std` / `var`: `"absolute"` (mean - k u) or `"prompt"` (mean - k * prompt_scale * u,
            see `prompt_scale`, within each of `groups`).
        groups: `(B,)` integer group (prompt) of each response; needed with `scale="prompt"`.

    Returns:
        `(B,)` rewards.
    """
    if scale not in PENALTY_SCALES:
        raise ValueError(f"Unknown penalty scale {scale!r}: choose one of {list(PENALTY_SCALES)}.")
    if scale == "prompt" and groups is None:
        raise ValueError("scale='prompt' needs the `groups` (prompts) of the responses.")
    penalty = Penalty(penalty)
    if penalty == Penalty.WCO:
        return means.min(0).values
    if penalty == Penalty.UWO:
        return means.mean(0) - k * means.var(0, unbiased=False)
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

    `state_dict()` / `from_state_dict()` (the tensors that are not `None`, by field name) and `save()` / `load()` (a
    safetensors file) round-trip it; other keys or shapes are refused.
    """

    means: torch.Tensor
    variances: torch.Tensor | None = None
    relative_variances: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def __post_init__(self):
        if self.means.dim() != 2:
            raise ValueError(
                f"RewardPredictions.means must have shape (M, B) = (members, responses), got {tuple(self.means.shape)}:"
                " stack the members' rewards, e.g. `mean[None]` for a single model."
            )
        for name, value in (("variances", self.variances), ("relative_variances", self.relative_variances)):
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
        return RewardPredictions(
            self.means[members],
            None if self.variances is None else self.variances[members],
            None if self.relative_variances is None else self.relative_variances[members],
            self.groups,
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
    if scale == "prompt" and penalty not in (Penalty.STD, Penalty.VAR):
        raise ValueError(f"scale='prompt' applies to the 'std' and 'var' penalties, not '{penalty.value}'.")
    return penalty


def penalize(
    predictions: RewardPredictions, penalty: Penalty | str, k: float, uncertainty: str, scale: str = "absolute"
) -> torch.Tensor:
    """`(B,)`: the reward `PenalizedReward(models, penalty, k, uncertainty=uncertainty, scale=scale)` gives the
    responses that `predictions` (from `PenalizedReward.predict`, `RewardPredictions.load`, or cached arrays) were
    made for, without running a model: `penalized_reward` on the variance `uncertainty` names."""
    penalty = _check_options(penalty, k, uncertainty, scale, predictions.means.shape[0])
    variances = None
    if penalty in (Penalty.STD, Penalty.VAR):
        name = "variances" if uncertainty == "marginal" else "relative_variances"
        variances = predictions.variances if uncertainty == "marginal" else predictions.relative_variances
        if variances is None:
            raise ValueError(
                f"penalty='{penalty.value}' with uncertainty='{uncertainty}' needs RewardPredictions.{name}: predict "
                f"them with `PenalizedReward(models, penalty='{penalty.value}', uncertainty='{uncertainty}').predict`."
            )
    if scale == "prompt" and predictions.groups is None:
        raise ValueError(
            "scale='prompt' needs RewardPredictions.groups, the prompt of each response: pass `groups`, e.g. "
            "`prompt_groups(prompts)`."
        )
    return penalized_reward(predictions.means, variances, penalty, k, scale, predictions.groups)


# ---------------------------------------------------------------------------------------------------------------------
# The TRL reward function.


class PenalizedReward:
    """A TRL reward function from one Bayesian reward model or an ensemble of them.

    Not an `nn.Module` on purpose: GRPO/RLOO treat module rewards as Hugging Face models and score them their own way.
    A plain class rather than a closure, so TRL names it (`__name__`) and it can carry state (the models).

    Args:
        models (`BayesianRewardModel` or a list of them): one model, or independently trained members.
        penalty (`str`, *optional*, defaults to `"std"`): `"none"`, `"std"`, `"var"`, `"wco"` or `"uwo"`. The default
            is what won the uncertainty study across worlds and proxy backbones (README, issue 7).
        k (`float`, *optional*, defaults to `1.0`): penalty strength (the λ of `"uwo"`).
        batch_size (`int`, *optional*, defaults to `16`): responses per forward pass.
        uncertainty (`str`, *optional*, defaults to `"relative"`): which variance the `std`/`var` penalties use.
            `"relative"`: Var(r_i - mean_j r_j) over the completions of the same prompt in the call (Best-of-N's
            candidates, GRPO/RLOO's `num_generations` group), or over `reference`'s completions when given; the
            prompt's unidentified reward offset cancels. A prompt with a single completion and no `reference` is
            refused. Costs a second forward-backward per response. `"marginal"`: Var(r_i) = J_i Σ J_i^T (the
            paper's), for one completion per prompt without a reference. Ensembles: per member, then combined. The
            default won the uncertainty study in three of its four world x backbone panels (README, issue 7).
        reference (mapping or callable, *optional*): with `uncertainty="relative"`, completions per prompt (a mapping
            from the prompt string, or a callable of the prompt) whose mean the reward is centered on, e.g. K samples
            of the reference policy: for callers that score one completion per prompt (PPO). Their mean gradients
            are cached per prompt (P floats each).
        scale (`str`, *optional*, defaults to `"absolute"`): units of k for `std` / `var`. `"absolute"`: the penalty
            is k * std (or k * var) in reward units. `"prompt"`: k * sd_g(r) * std_i / mean_g(std) within the
            completions of each prompt in the call (the groups of `uncertainty="relative"`; see `prompt_scale`), so
            that one k fits models and prompts whose rewards and variances live on different scales. Needs several
            completions per prompt in a call (Best-of-N, GRPO / RLOO groups); a prompt alone gets no penalty.

    Calling it is `rank(predict(prompts, completions))`. To sweep penalties and k, predict once (the models' passes)
    and `penalize` the predictions (microseconds each); `uncertainty="relative"` predicts both variances:

    Example:
    ```python
    >>> reward = PenalizedReward(BayesianRewardModel.from_pretrained("rm"), penalty="std", k=1.0)
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], ...)

    >>> predictions = PenalizedReward(members, penalty="std", uncertainty="relative").predict(prompts, completions)
    >>> predictions.save("predictions.safetensors")  # reload with RewardPredictions.load
    >>> for penalty, uncertainty, k in itertools.product(["std", "var"], ["marginal", "relative"], [0.5, 1.0, 2.0]):
    ...     rewards = penalize(predictions, penalty, k, uncertainty)  # (B,) as PenalizedReward(members, ...) gives
    >>> penalize(predictions, "std", 1.0, "relative", scale="prompt")  # groups come with the predictions
    >>> penalize(predictions.subset([0]), "none", 0.0, "relative")  # member 0's MAP reward
    ```
    """

    __name__ = "penalized_reward"  # TRL names reward functions (columns, metrics) by `__name__`

    def __init__(
        self,
        models: BayesianRewardModel | Sequence[BayesianRewardModel],
        penalty: Penalty | str = Penalty.STD,
        k: float = 1.0,
        batch_size: int = 16,
        uncertainty: str = "relative",
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
        scale: str = "absolute",
    ):
        self.models = [models] if isinstance(models, BayesianRewardModel) else list(models)
        if not self.models:
            raise ValueError("PenalizedReward needs at least one BayesianRewardModel.")
        self.penalty = _check_options(penalty, k, uncertainty, scale, len(self.models))
        if reference is not None and uncertainty != "relative":
            raise ValueError("`reference` centers the relative variance: set uncertainty='relative' to use it.")
        self.k = float(k)
        self.batch_size, self.uncertainty, self.reference, self.scale = batch_size, uncertainty, reference, scale

    @property
    def needs_variance(self) -> bool:
        return self.penalty in (Penalty.STD, Penalty.VAR)

    def predict(self, prompts: Sequence[Any], completions: Sequence[Any]) -> RewardPredictions:
        """The members' predictions this reward's penalty needs, `(M, B)`: `means` always; with `std` / `var`, the
        marginal `variances`, and with `uncertainty="relative"` also the `relative_variances` (the marginal ones come
        free with them). `groups` always (cheap), for `scale="prompt"`."""
        variances = relative = None
        if self.needs_variance and self.uncertainty == "relative":
            triples = [
                m.predict_relative(prompts, completions, self.batch_size, reference=self.reference)
                for m in self.models
            ]
            means, variances, relative = (torch.stack(parts) for parts in zip(*triples, strict=True))
        else:
            outputs = [
                m.predict(prompts, completions, self.batch_size, return_var=self.needs_variance) for m in self.models
            ]
            means = torch.stack([mean for mean, _ in outputs])
            if self.needs_variance:
                variances = torch.stack([var for _, var in outputs])
        return RewardPredictions(means, variances, relative, prompt_groups(prompts))

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
        (`variances`/`var` are the relative ones with `uncertainty="relative"`, then also `marginal_variances`)."""
        predictions = self.predict(prompts, completions)
        parts = {"reward": self.rank(predictions), "means": predictions.means}
        variances = predictions.relative_variances if self.uncertainty == "relative" else predictions.variances
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
            if "var" in parts:
                log_metric("laplace/reward_std", parts["var"].sqrt().mean().item())
        return parts["reward"].tolist()
