"""trl_bayes: Bayesian (Laplace-LoRA) reward models for LLM alignment, inside TRL.

Data flows one way: preference pairs -> `BayesianRewardTrainer` (TRL's MAP reward training, then the Laplace fit) ->
`BayesianRewardModel` (every reward a Gaussian) -> `PenalizedReward` (a TRL reward function) -> Best-of-n
(`BestOfNSampler`), PPO (`PPOTrainer`) or TRL's own GRPO / RLOO trainers; `evaluate_policy` scores a policy on held-out
prompts (gold and proxy reward, KL to the reference).

Names load lazily (PEP 562, as transformers and TRL load theirs): `from trl_bayes import PPOTrainer` imports the PPO
modules only, so PPO with a plain reward function loads neither laplace-torch nor DeepSpeed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the submodule that holds it.
_MODULES = {
    "active": ["CandidatePool", "SelectionStrategy", "select_pairs"],
    "best_of_n": ["BestOfNOutput", "BestOfNSampler", "best_of_n_estimate", "kl_best_of_n"],
    "evaluation": ["evaluate_policy"],
    "generation": [
        "GenerationOutput",
        "chunk_seed",
        "generate",
        "tokenize_prompts",
        "tokenize_response",
        "tokenize_responses",
    ],
    "enums": ["Curvature", "HessianStructure", "KFACApprox", "PriorPrecisionMethod", "SubsetOfWeights"],
    "penalties": [
        "PenalizedReward",
        "Penalty",
        "RewardPredictions",
        "combine_gaussians",
        "penalize",
        "penalized_reward",
        "prompt_groups",
    ],
    "ppo_config": ["PPOConfig"],
    "preference_formats": ["preference_format", "preference_pairs"],
    "ppo_trainer": ["PPOTrainer"],
    "reward_config": ["BayesianRewardConfig"],
    "reward_model": ["BayesianRewardModel"],
    "reward_trainer": ["BayesianRewardTrainer"],
    "rlhf": ["AdaptiveKLController"],
    "typicality": ["PriorScale", "completion_nll", "group_euclidean", "group_mahalanobis", "hidden_features"],
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "AdaptiveKLController",
    "BayesianRewardConfig",
    "BayesianRewardModel",
    "BayesianRewardTrainer",
    "BestOfNOutput",
    "BestOfNSampler",
    "CandidatePool",
    "Curvature",
    "GenerationOutput",
    "HessianStructure",
    "KFACApprox",
    "PPOConfig",
    "PPOTrainer",
    "PenalizedReward",
    "Penalty",
    "PriorPrecisionMethod",
    "PriorScale",
    "RewardPredictions",
    "SelectionStrategy",
    "SubsetOfWeights",
    "best_of_n_estimate",
    "chunk_seed",
    "combine_gaussians",
    "completion_nll",
    "evaluate_policy",
    "generate",
    "group_euclidean",
    "group_mahalanobis",
    "hidden_features",
    "kl_best_of_n",
    "penalize",
    "penalized_reward",
    "preference_format",
    "preference_pairs",
    "prompt_groups",
    "select_pairs",
    "tokenize_prompts",
    "tokenize_response",
    "tokenize_responses",
]

if TYPE_CHECKING:
    from .active import CandidatePool, SelectionStrategy, select_pairs
    from .best_of_n import BestOfNOutput, BestOfNSampler, best_of_n_estimate, kl_best_of_n
    from .enums import Curvature, HessianStructure, KFACApprox, PriorPrecisionMethod, SubsetOfWeights
    from .evaluation import evaluate_policy
    from .generation import (
        GenerationOutput,
        chunk_seed,
        generate,
        tokenize_prompts,
        tokenize_response,
        tokenize_responses,
    )
    from .penalties import (
        PenalizedReward,
        Penalty,
        RewardPredictions,
        combine_gaussians,
        penalize,
        penalized_reward,
        prompt_groups,
    )
    from .ppo_config import PPOConfig
    from .ppo_trainer import PPOTrainer
    from .preference_formats import preference_format, preference_pairs
    from .reward_config import BayesianRewardConfig
    from .reward_model import BayesianRewardModel
    from .reward_trainer import BayesianRewardTrainer
    from .rlhf import AdaptiveKLController
    from .typicality import PriorScale, completion_nll, group_euclidean, group_mahalanobis, hidden_features


def __getattr__(name: str) -> Any:
    """A public name on first use, imported from its submodule (then cached in this module); a submodule by name, as
    `trl_bayes.reward_model` resolved when this package imported everything eagerly."""
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
