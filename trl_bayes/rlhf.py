"""The PPO math for RLHF as pure functions: tensors in, tensors out (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et
al. 2022, arXiv 2203.02155). `PPOTrainer` (`trl_bayes.ppo_trainer`) strings them together.

Shapes are in the docstrings: B completions, T completion tokens; `mask` is the completion mask (1 on the tokens up to
and including the first EOS, 0 on padding; `generation.completion_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1. `x`, `mask`: same shape. Returns a scalar."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (population std); masked-out positions become 0.

    Args:
        x: `(B, T)` values, e.g. advantages.
        mask: `(B, T)` 1 for completion tokens, 0 for padding.
        shift_mean: subtract the mean (False: only rescale, keeping the mean, as for rewards).

    Returns:
        `(B, T)`.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens (Schulman's k1 / k3 estimators).

    With log r = ref_logprob - logprob: k1 = -log r (unbiased, can be negative), k3 = (r - 1) - log r (unbiased,
    always >= 0, lower variance).

    Args:
        logprobs, ref_logprobs: `(B, T)` log-probabilities of the sampled tokens under the policy and the reference.
        estimator: `"k1"` or `"k3"`.

    Returns:
        `(B, T)` per-token KL estimates (padding is not masked here).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"Unknown KL estimator {estimator!r}: choose 'k1' or 'k3'.")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every completion token, plus the sequence's score at its last token.

    Args:
        scores: `(B,)` the reward callable's score of each completion.
        kl: `(B, T)` per-token KL estimates.
        mask: `(B, T)` completion mask (1 up to and including the first EOS).

    Returns:
        `(B, T)`, zero on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last completion token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438) over completion tokens.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; the episode ends after the last masked
    token (V = 0 beyond it).

    Args:
        rewards: `(B, T)` per-token rewards (`shaped_rewards`).
        values: `(B, T)` the value model's estimates at each completion token.
        mask: `(B, T)` completion mask.

    Returns:
        advantages `(B, T)` and returns `(B, T)` = advantages + values, both zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss: mean over tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).

    Args:
        logprobs: `(B, T)` log-probabilities under the policy being optimized (with gradients).
        old_logprobs: `(B, T)` under the policy that sampled the completions.
        advantages: `(B, T)`.
        mask: `(B, T)` completion mask.

    Returns:
        (loss, clip fraction, approximate KL 0.5 E[(log ratio)^2]), each a scalar.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: 0.5 mean over tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    Args:
        values: `(B, T)` the value model's current estimates (with gradients).
        old_values: `(B, T)` its estimates at rollout time.
        returns: `(B, T)` GAE returns.
        mask: `(B, T)` completion mask.

    Returns:
        (loss, clip fraction), each a scalar.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac.detach()


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. (2019): the coefficient moves so that the KL tracks `target`.

    After each step with KL `kl` over `n_steps` episodes: error = clip(kl / target - 1, -0.2, 0.2) and
    kl_coef *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class Rollout:
    """One batch of experience on one process: token tensors `(B, P + T)` / `(B, T)`, scores `(B,)`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ("input_ids", "attention_mask", "mask", "logprobs", "values", "advantages", "returns")
        return {name: getattr(self, name)[index] for name in names}
