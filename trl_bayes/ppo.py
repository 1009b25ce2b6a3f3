"""Compatibility module: the names that `trl_bayes.ppo` held before it was split, re-exported from their new homes.

- `trl_bayes.rlhf`: the PPO math as pure functions (`whiten`, `kl_penalty`, `gae_advantages`, `policy_loss`, ...),
  `AdaptiveKLController` and `Rollout`;
- `trl_bayes.ppo_config`: `PPOConfig`;
- `trl_bayes.ppo_trainer`: `PPOTrainer`, `mean_step_seconds` (and `PolicyAndValue`, from `trl_bayes.ppo_models`, with
  the default value model and the optimizer; `trl_bayes.ppo_inputs`: prompts and the reward check;
  `trl_bayes.ppo_checkpoint`: checkpoints);
- `trl_bayes.generation`: `completion_mask`, `logprobs_from_logits`, `entropy_from_logits` (shared with Best-of-n and
  the evaluation).

New code imports from those modules (or from `trl_bayes`); `from trl_bayes.ppo import ...` keeps working.
"""

from .generation import completion_mask, entropy_from_logits, logprobs_from_logits
from .ppo_config import PPOConfig
from .ppo_models import PolicyAndValue
from .ppo_trainer import PPOTrainer, mean_step_seconds
from .rlhf import (
    AdaptiveKLController,
    Rollout,
    gae_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    shaped_rewards,
    value_loss,
    whiten,
)

__all__ = [
    "AdaptiveKLController",
    "PPOConfig",
    "PPOTrainer",
    "PolicyAndValue",
    "Rollout",
    "completion_mask",
    "entropy_from_logits",
    "gae_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "mean_step_seconds",
    "policy_loss",
    "shaped_rewards",
    "value_loss",
    "whiten",
]
