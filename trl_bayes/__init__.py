"""trl_bayes: Bayesian (Laplace-LoRA) reward models for LLM alignment, inside TRL."""

from .best_of_n import BestOfNOutput, BestOfNSampler, best_of_n_estimate, kl_best_of_n
from .laplace_lora import Curvature, HessianStructure, KFACApprox, PriorPrecisionMethod, SubsetOfWeights
from .ppo import AdaptiveKLController, PPOConfig, PPOTrainer
from .reward import BayesianRewardModel, PenalizedReward, Penalty, combine_gaussians, penalized_reward
from .reward_config import BayesianRewardConfig
from .reward_trainer import BayesianRewardTrainer

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "BayesianRewardConfig",
    "BayesianRewardModel",
    "BayesianRewardTrainer",
    "BestOfNOutput",
    "BestOfNSampler",
    "Curvature",
    "HessianStructure",
    "KFACApprox",
    "PPOConfig",
    "PPOTrainer",
    "PenalizedReward",
    "Penalty",
    "PriorPrecisionMethod",
    "SubsetOfWeights",
    "best_of_n_estimate",
    "combine_gaussians",
    "kl_best_of_n",
    "penalized_reward",
]
