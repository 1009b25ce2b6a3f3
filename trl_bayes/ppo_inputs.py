"""What `PPOTrainer` reads from its arguments: the prompts of a dataset (text, conversations, or TRL 1.12's
pre-tokenized `input_ids`), which of them each process takes at each step, and the reward function it calls (checked
up front)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .evaluation import check_reward_function
from .generation import tokenize_prompts

if TYPE_CHECKING:
    from .reward_model import BayesianRewardModel


def dataset_prompts(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, name: str
) -> tuple[list[Any], list[list[int]]]:
    """The prompts the rewards see and the token ids the policy continues.

    From a `prompt` column (strings or conversations): tokenized as TRL's GRPOTrainer (and `BestOfNSampler`) tokenize
    prompts, conversations through the chat template. From an `input_ids` column (TRL 1.12's PPO datasets): the ids
    as given, pad tokens dropped as TRL masked them; the rewards see the `prompt` column if there is one, else the ids
    decoded without special tokens.

    Args:
        name: the dataset's argument name in error messages (e.g. `train_dataset`).
    """
    columns = dataset.column_names
    if "input_ids" in columns:
        ids = [[t for t in row if t != tokenizer.pad_token_id] for row in dataset["input_ids"]]
        if not all(ids):
            raise ValueError(f"{name}['input_ids']: a row has no token but padding; the policy needs one to continue.")
        if "prompt" in columns:
            return list(dataset["prompt"]), ids
        return tokenizer.batch_decode(ids, skip_special_tokens=True), ids
    if "prompt" not in columns:
        raise ValueError(
            f"{name} needs a 'prompt' column (strings or conversations) or an 'input_ids' column (token ids, as TRL's "
            f"PPO example tokenizes its datasets), got {columns}."
        )
    prompts = list(dataset["prompt"])
    return prompts, tokenize_prompts(tokenizer, prompts, f"{name}['prompt']")[0]


@functools.cache
def prompt_permutation(num_prompts: int, seed: int) -> list[int]:
    """The order of the prompts in one pass over them (the pass's seed: the run's seed plus the pass's index)."""
    return torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed)).tolist()


def local_prompt_indices(
    step: int, batch_size: int, accelerator: Accelerator, num_prompts: int, seed: int
) -> list[int]:
    """This process's `batch_size` prompts at PPO step `step`: consecutive slices of the global batch, through one
    shuffled pass over the prompts after another. A function of the step alone, so a resumed run draws the same ones."""
    total = batch_size * accelerator.num_processes
    start = step * total + accelerator.process_index * batch_size
    positions = range(start, start + batch_size)
    return [prompt_permutation(num_prompts, seed + pos // num_prompts)[pos % num_prompts] for pos in positions]


def reward_function(reward_func: Callable[..., list[float]] | BayesianRewardModel) -> Callable[..., list[float]]:
    """The reward PPO calls: a `BayesianRewardModel` becomes the paper's penalty, `PenalizedReward(model, "std", 1.0,
    uncertainty="marginal", scale="absolute")`: PPO scores one completion per prompt, which the library's group
    defaults (`penalties.DEFAULT_*`) refuse. For a group uncertainty pass a `PenalizedReward` with a `reference`."""
    # A BayesianRewardModel exists only once its module was imported: looking there keeps PPO on a plain reward
    # function free of laplace-torch.
    reward_model = sys.modules.get(f"{__package__}.reward_model")
    if reward_model is not None and isinstance(reward_func, reward_model.BayesianRewardModel):
        from .penalties import PenalizedReward

        return PenalizedReward(reward_func, penalty="std", k=1.0, uncertainty="marginal", scale="absolute")
    check_reward_function(reward_func, "reward_func")
    return reward_func
