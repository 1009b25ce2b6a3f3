"""Compatibility module: the names that `trl_bayes.reward` held before it was split, re-exported from their new homes.

- `trl_bayes.reward_model`: `BayesianRewardModel`, `scoring_mode`, saving the base model, the posterior's file names;
- `trl_bayes.penalties`: `Penalty`, `penalized_reward`, `combine_gaussians`, `prompt_scale`, `PenalizedReward`;
- `trl_bayes.generation`: `tokenize_response`, `pad_token_ids`, `eval_mode`.

New code imports from those modules (or from `trl_bayes`); `from trl_bayes.reward import ...` keeps working.
"""

from .generation import eval_mode, pad_token_ids, tokenize_response
from .penalties import (
    PENALTY_SCALES,
    UNCERTAINTIES,
    PenalizedReward,
    Penalty,
    combine_gaussians,
    penalized_reward,
    prompt_scale,
)
from .reward_model import (
    BASE_MODEL_DIR,
    FORMAT_VERSION,
    POSTERIOR_CONFIG_NAME,
    POSTERIOR_WEIGHTS_NAME,
    BayesianRewardModel,
    base_model_state_dict,
    save_base_model,
    scoring_mode,
)

__all__ = [
    "BASE_MODEL_DIR",
    "FORMAT_VERSION",
    "PENALTY_SCALES",
    "POSTERIOR_CONFIG_NAME",
    "POSTERIOR_WEIGHTS_NAME",
    "UNCERTAINTIES",
    "BayesianRewardModel",
    "PenalizedReward",
    "Penalty",
    "base_model_state_dict",
    "combine_gaussians",
    "eval_mode",
    "pad_token_ids",
    "penalized_reward",
    "prompt_scale",
    "save_base_model",
    "scoring_mode",
    "tokenize_response",
]
