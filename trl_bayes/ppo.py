"""PPO for RLHF whose reward is any TRL reward callable: `PPOConfig`, `PPOTrainer` and the PPO math as pure functions.

TRL removed its `PPOTrainer` in 1.13; this is a lean replacement on Accelerate whose reward sees text, so the policy
and the reward model may use different tokenizers (a `PenalizedReward` over Laplace reward models, a rule, a gold
oracle). One PPO step (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155):

1. generate: each process samples one completion for each of its prompts;
2. score: the reward callable scores (prompt, completion) text;
3. reference: log-probabilities under the policy and the reference policy, and the value model's values;
4. advantages: per-token reward = -kl_coef * KL(token) plus the score at the last completion token; GAE; whitening;
5. optimize: `num_ppo_epochs` passes over minibatches, clipped policy loss + `vf_coef` * clipped value loss;
6. log, evaluate the gold reward on held-out prompts, checkpoint.

The pure functions below take and return tensors; their shapes are in their docstrings: B completions, T completion
tokens (the completion mask marks the tokens up to and including the first EOS).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object, set_seed
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    get_scheduler,
)
from transformers.trainer_utils import get_last_checkpoint

from .distributed import process_group_backend, unwrapped_whole, whole_weights
from .reward import BayesianRewardModel, PenalizedReward, pad_token_ids

# ---------------------------------------------------------------------------------------------------------------------
# The PPO math, pure: tensors in, tensors out.


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


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which generated tokens belong to the completion: those up to and including the first EOS.

    Args:
        completion_ids: `(B, T)` generated token ids (after the first EOS, `generate` pads).

    Returns:
        mask `(B, T)` float, and finished `(B,)` bool (the completion has an EOS).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    finished = is_eos.any(1)
    length = completion_ids.shape[1]
    first_eos = torch.where(finished, is_eos.int().argmax(1), torch.full_like(finished, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device)[None]
    return (positions <= first_eos[:, None]).float(), finished


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `tokens` `(B, T)` under `logits` `(B, T, V)`. Returns `(B, T)`."""
    return torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, `(B, T, V)` -> `(B, T)`."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    Configuration class for the [`PPOTrainer`].

    Only the parameters specific to PPO are listed here; see [`~transformers.TrainingArguments`] for the others
    (`learning_rate`, `max_steps`, `seed`, `save_steps`, `report_to`, ...). A PPO step generates a batch of
    completions and optimizes on it; `max_steps` counts PPO steps.

    Parameters:
        > Parameters that control the batch

        per_device_train_batch_size (`int`, defaults to `8`): completions per forward/backward pass (micro batch).
        gradient_accumulation_steps (`int`, defaults to `1`): micro batches per optimizer step (one minibatch).
        num_mini_batches (`int`, *optional*, defaults to `1`):
            Minibatches per PPO epoch. Each process generates `per_device_train_batch_size *
            gradient_accumulation_steps * num_mini_batches` completions per step (its local batch).
        num_ppo_epochs (`int`, *optional*, defaults to `4`): passes over the batch per step.
        total_episodes (`int`, *optional*): total completions over all processes; sets `max_steps` when given.
        rollout_batch_size (`int`, *optional*): sequences per `generate` / no-grad forward call (`None` = the whole
            local batch at once); lower it for big models.

        > Parameters that control generation

        max_new_tokens (`int`, *optional*, defaults to `53`): completion length limit.
        temperature (`float`, *optional*, defaults to `0.7`): sampling temperature; log-probabilities are those of the
            tempered distribution the tokens were drawn from.
        missing_eos_penalty (`float`, *optional*): subtracted from the score of completions cut at `max_new_tokens`
            without an EOS; discourages the policy from running on.

        > Parameters that control the KL penalty

        kl_coef (`float`, *optional*, defaults to `0.05`): initial coefficient of the per-token KL penalty (beta).
        kl_estimator (`str`, *optional*, defaults to `"k1"`): `"k1"` (log ratio, unbiased, may be negative) or `"k3"`
            (always >= 0, lower variance).
        adaptive_kl (`bool`, *optional*, defaults to `False`): adapt `kl_coef` so that the KL tracks `target_kl`.
        target_kl (`float`, *optional*, defaults to `6.0`): target sequence KL (nats) of the adaptive controller.
        kl_horizon (`int`, *optional*, defaults to `10000`): episodes over which the controller adapts.

        > Parameters that control advantages and losses

        gamma (`float`, *optional*, defaults to `1.0`): discount. lam (`float`, *optional*, defaults to `0.95`): GAE
            lambda.
        whiten_advantages (`bool`, *optional*, defaults to `True`): normalize advantages over each local batch.
        cliprange (`float`, *optional*, defaults to `0.2`): policy ratio clip. cliprange_value (`float`, *optional*,
            defaults to `0.2`): value clip.
        vf_coef (`float`, *optional*, defaults to `0.1`): weight of the value loss.

        > Parameters that control evaluation

        eval_steps (`int`, *optional*): evaluate the gold reward every `eval_steps` steps (also before the first and
            after the last step) when the trainer has a `gold_reward` and an `eval_dataset`.
        num_eval_generations (`int`, *optional*, defaults to `1`): completions per held-out prompt.
        eval_seed (`int`, *optional*): seed of the evaluation draws (`None` = `seed`); fix it across runs that differ
            in `seed` to evaluate every run on the same random numbers.
    """

    # Defaults that differ from TrainingArguments'
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per forward/backward pass."})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (policy and value model)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X PPO steps."})
    # batch
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per PPO epoch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total completions; sets max_steps."})
    rollout_batch_size: int | None = field(default=None, metadata={"help": "Sequences per generate/forward call."})
    # generation
    max_new_tokens: int = field(default=53, metadata={"help": "Completion length limit."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Score penalty without EOS."})
    # KL
    kl_coef: float = field(default=0.05, metadata={"help": "Initial per-token KL coefficient (beta)."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator: 'k1' or 'k3'."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards target_kl."})
    target_kl: float = field(default=6.0, metadata={"help": "Target sequence KL of the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive controller."})
    # advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    # evaluation
    num_eval_generations: int = field(default=1, metadata={"help": "Completions per held-out prompt."})
    eval_seed: int | None = field(default=None, metadata={"help": "Seed of the evaluation draws (None = seed)."})

    def __post_init__(self):
        super().__post_init__()
        checks = [
            ("num_mini_batches", self.num_mini_batches >= 1, ">= 1"),
            ("num_ppo_epochs", self.num_ppo_epochs >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in ("k1", "k3"), "'k1' or 'k3'"),
            ("target_kl", self.target_kl > 0, "> 0"),
            ("kl_horizon", self.kl_horizon > 0, "> 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("cliprange", self.cliprange > 0, "> 0"),
            ("cliprange_value", self.cliprange_value > 0, "> 0"),
            ("vf_coef", self.vf_coef >= 0, ">= 0"),
            ("num_eval_generations", self.num_eval_generations >= 1, ">= 1"),
            ("rollout_batch_size", self.rollout_batch_size is None or self.rollout_batch_size >= 1, ">= 1 or None"),
            ("save_strategy", self.save_strategy in ("no", "steps"), "'no' or 'steps'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r}: must be {expected}.")
        if self.total_episodes is None and self.max_steps <= 0:
            raise ValueError("PPOConfig: set `max_steps` (PPO steps) or `total_episodes` (completions in all).")

    @property
    def local_batch_size(self) -> int:
        """Completions each process generates per PPO step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


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


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module: DeepSpeed takes one model per `accelerator.prepare`, and one
    forward gives both outputs (so DDP syncs both models' gradients through one wrapper)."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    # Read by TRL's `unwrap_model_for_generation` (which would switch checkpointing off around generation); this
    # trainer never checkpoints activations.
    is_gradient_checkpointing = False

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits `(B, L, V)` and values `(B, L, 1)` of the same inputs."""
        return self.policy(**inputs).logits, self.value_model(**inputs).logits


class PPOTrainer:
    """PPO on Accelerate with a reward callable; see the module docstring for the steps and [`PPOConfig`].

    Args:
        model ([`~transformers.PreTrainedModel`], [`~peft.PeftModel`] or `str`): the causal-LM policy (a folder or Hub
            id is loaded with `AutoModelForCausalLM`). A PEFT policy's reference is the same model with its adapter
            disabled (no second copy).
        reward_func (`Callable` or [`BayesianRewardModel`]): a TRL reward function `(prompts, completions,
            completion_ids=..., log_metric=..., **kwargs) -> list[float]` that reads text, e.g. [`PenalizedReward`]; a
            `BayesianRewardModel` is wrapped in `PenalizedReward(model, uncertainty="marginal")` (PPO scores one
            completion per prompt; for the relative variance pass a `PenalizedReward` with a `reference`).
        args ([`PPOConfig`]).
        train_dataset ([`~datasets.Dataset`]): a `prompt` column of strings or conversations (lists of messages).
        processing_class ([`~transformers.PreTrainedTokenizerBase`]): the policy's tokenizer; needs a pad token.
        ref_model ([`~transformers.PreTrainedModel`], *optional*): the reference policy; default: the PEFT policy with
            its adapter disabled, or a frozen copy of the policy.
        value_model ([`~transformers.PreTrainedModel`], *optional*): a model returning per-token `logits` of shape
            `(B, L, 1)`, e.g. `AutoModelForTokenClassification(num_labels=1)`; default: one loaded from the policy's
            checkpoint (its backbone with a new scalar head).
        peft_config ([`~peft.LoraConfig`], *optional*): wrap `model` in this adapter.
        eval_dataset ([`~datasets.Dataset`], *optional*): held-out prompts (a `prompt` column) for `gold_reward`.
        gold_reward (`Callable`, *optional*): a TRL reward function evaluated on `eval_dataset` every `eval_steps`.
    """

    _name = "PPO"

    def __init__(
        self,
        model: PreTrainedModel | PeftModel | str,
        reward_func: Callable[..., list[float]] | BayesianRewardModel,
        args: PPOConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        ref_model: PreTrainedModel | None = None,
        value_model: PreTrainedModel | None = None,
        peft_config=None,
        eval_dataset: Dataset | None = None,
        gold_reward: Callable[..., list[float]] | None = None,
    ):
        self.args = args
        tokenizer = self.tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The policy's tokenizer has no pad token, which batching prompts needs. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked, so any token works)."
            )
        # CPU processes talk over gloo (DDP, or DeepSpeed's CPU accelerator); `cpu=use_cpu` keeps a DDP launch of
        # several CPU processes one process group. Micro batches accumulate through Accelerate (and DeepSpeed). The
        # scheduler counts optimizer steps, the same on every process: one scheduler step per optimizer step
        # (Accelerate's default steps it once per process, for schedules counted in samples of all processes).
        backend = "gloo" if args.use_cpu else process_group_backend()
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,
            log_with=args.report_to or None,
            project_dir=args.output_dir,
            kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if backend else [],
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise RuntimeError(
                f"{launched} processes were launched but the accelerator sees {self.accelerator.num_processes}: each "
                "would train alone. On CPU set `use_cpu=True` in PPOConfig."
            )
        set_seed(args.seed)  # the same initialization (value head, LoRA) on every process

        if isinstance(model, str):
            with whole_weights():  # sharded (if at all) by `prepare` below, the frozen reference copy stays whole
                model = AutoModelForCausalLM.from_pretrained(model)
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
        self.is_peft = isinstance(model, PeftModel)
        base = model.get_base_model() if self.is_peft else model
        if ref_model is None and not self.is_peft:
            ref_model = copy.deepcopy(base)  # frozen at the policy's initial weights
        if value_model is None:
            if not base.name_or_path:
                raise ValueError("The policy has no checkpoint path to build a value model from: pass `value_model`.")
            with whole_weights():
                value_model = AutoModelForTokenClassification.from_pretrained(base.name_or_path, num_labels=1)
        if value_model.config.pad_token_id is None:
            value_model.config.pad_token_id = tokenizer.pad_token_id

        if isinstance(reward_func, BayesianRewardModel):
            # One completion per prompt: the relative variance would need a reference set, which the caller provides.
            reward_func = PenalizedReward(reward_func, uncertainty="marginal")
        self.reward_func = reward_func
        self.gold_reward = gold_reward
        self.reward_name = getattr(reward_func, "__name__", type(reward_func).__name__)

        self.train_prompts, self.train_prompt_ids = self._tokenize_prompts(train_dataset, "train_dataset")
        self.eval_prompts, self.eval_prompt_ids = (
            self._tokenize_prompts(eval_dataset, "eval_dataset") if eval_dataset is not None else ([], [])
        )
        longest = max(len(ids) for ids in self.train_prompt_ids + self.eval_prompt_ids)
        context = getattr(base.config, "max_position_embeddings", None)  # not every architecture has one
        if context is not None and longest + args.max_new_tokens > context:
            raise ValueError(
                f"The longest prompt has {longest} tokens; with max_new_tokens={args.max_new_tokens} it exceeds the "
                f"policy's context of {context} positions. Shorten or filter the prompts, or lower max_new_tokens."
            )

        num_processes = self.accelerator.num_processes
        if args.total_episodes is not None:
            self.max_steps = max(1, args.total_episodes // (args.local_batch_size * num_processes))
        else:
            self.max_steps = args.max_steps

        # Dropout stays off for good (eval mode): PPO's first epoch must see ratio = 1 exactly.
        model.eval()
        value_model.eval()
        if ref_model is not None:
            ref_model.requires_grad_(False).eval().to(self.accelerator.device)
        self.ref_model = ref_model
        params = [p for m in (model, value_model) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        updates = self.max_steps * args.num_ppo_epochs * args.num_mini_batches
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            args.get_warmup_steps(updates),
            updates,
            **(args.lr_scheduler_kwargs or {}),
        )
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:
            # DeepSpeed reads the micro batch from a dataloader, which PPO has none of, and clips gradients itself.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
            if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
                plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm or 0.0
        # One module for DeepSpeed (ZeRO shards both models, the optimizer states and the gradients); the reference
        # policy stays outside, whole and frozen on every process.
        self.policy_and_value, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            PolicyAndValue(model, value_model), optimizer, scheduler
        )
        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        self.kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
        self.global_step = 0
        self.log_history: list[dict[str, float]] = []

    @property
    def model(self) -> torch.nn.Module:
        """The policy (a `PeftModel` for a LoRA policy); under ZeRO-3 its weights are sharded outside `_whole`."""
        return self.accelerator.unwrap_model(self.policy_and_value).policy

    @property
    def value_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy_and_value).value_model

    def _whole(self):
        """A context giving the `PolicyAndValue` module with whole weights: under ZeRO-3 gathered (DeepSpeed's hooks off),
        for the parts where processes do unequal work (generation, sharded evaluation); elsewhere just unwrapped."""
        return unwrapped_whole(self.accelerator, self.policy_and_value)

    # -- data ------------------------------------------------------------------------------------------------------
    def _tokenize_prompts(self, dataset: Dataset, name: str) -> tuple[list[Any], list[list[int]]]:
        if "prompt" not in dataset.column_names:
            raise ValueError(f"{name} needs a 'prompt' column, got {dataset.column_names}.")
        prompts = list(dataset["prompt"])
        if not prompts:
            raise ValueError(f"{name} is empty.")
        kinds = {type(p) for p in prompts}
        if kinds == {list}:  # conversations, tokenized as TRL's GRPOTrainer does
            out = self.tokenizer.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            ids = [list(x) for x in out["input_ids"]]
        elif kinds == {str}:
            ids = [list(x) for x in self.tokenizer(prompts)["input_ids"]]
        else:
            raise ValueError(
                f"{name}: prompts must be all strings or all conversations, got {sorted(map(str, kinds))}."
            )
        if not all(ids):
            raise ValueError(f"{name}: a prompt tokenizes to no tokens.")
        return prompts, ids

    @functools.cache  # noqa: B019 - one permutation per data epoch, for the trainer's lifetime
    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        return torch.randperm(len(self.train_prompts), generator=generator).tolist()

    def _local_indices(self, step: int) -> list[int]:
        """This process's prompts at `step`: a function of the step alone, so a resumed run draws the same ones."""
        size = self.args.local_batch_size
        total = size * self.accelerator.num_processes
        n = len(self.train_prompts)
        positions = range(
            step * total + self.accelerator.process_index * size,
            step * total + (self.accelerator.process_index + 1) * size,
        )
        return [self._permutation(pos // n)[pos % n] for pos in positions]

    # -- rollout pieces --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, policy, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sampled sequences: input_ids and attention mask `(B, P + T)` (padding after the first EOS), and P.
        `policy`: the plain policy with whole weights (`_whole`)."""
        device = self.accelerator.device
        chunk = self.args.rollout_batch_size or len(prompt_ids)
        prompts, prompt_mask = pad_token_ids(prompt_ids, self.tokenizer.pad_token_id, side="left")
        outputs = []
        for i in range(0, len(prompt_ids), chunk):
            out = policy.generate(
                input_ids=prompts[i : i + chunk].to(device),
                attention_mask=prompt_mask[i : i + chunk].to(device),
                generation_config=self.generation_config,
                synced_gpus=False,  # whole weights: each process generates alone (see `_whole`)
            )
            outputs.append(out[:, prompts.shape[1] :])
        length = max(o.shape[1] for o in outputs)
        completions = torch.cat(
            [F.pad(o, (0, length - o.shape[1]), value=self.tokenizer.pad_token_id) for o in outputs]
        )
        mask, _ = completion_mask(completions, [self.tokenizer.eos_token_id])
        completions = torch.where(mask.bool(), completions, self.tokenizer.pad_token_id)
        input_ids = torch.cat([prompts.to(device), completions], 1)
        attention_mask = torch.cat([prompt_mask.to(device), mask.long()], 1)
        return input_ids, attention_mask, prompts.shape[1]

    def _forward(self, model, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
        """The model's outputs at the positions that predict the completion tokens, `(B, T, ...)`."""
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits[:, prompt_length - 1 : -1]

    def _logprobs(self, model, input_ids, attention_mask, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities `(B, T)` of the completion tokens at the sampling temperature, and the logits."""
        logits = self._forward(model, input_ids, attention_mask, prompt_length) / self.args.temperature
        return logprobs_from_logits(logits, input_ids[:, prompt_length:]), logits

    @torch.no_grad()
    def _ref_logprobs(self, policy, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, input_ids, attention_mask, prompt_length)[0]
        with policy.disable_adapter():  # the reference is the base model: no second copy
            return self._logprobs(policy, input_ids, attention_mask, prompt_length)[0]

    def _decode(self, prompts: list[Any], input_ids, mask, prompt_length: int) -> tuple[list[Any], list[list[int]]]:
        ids = [row[: int(m.sum())].tolist() for row, m in zip(input_ids[:, prompt_length:], mask, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if isinstance(prompts[0], list):
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        return texts, ids

    def _score(self, reward_func, prompts, completions, completion_ids, log_metric=None) -> torch.Tensor:
        """The reward callable's scores `(B,)`, refused when they are not one finite number per completion."""
        name = getattr(reward_func, "__name__", type(reward_func).__name__)
        rewards = reward_func(
            prompts=prompts, completions=completions, completion_ids=completion_ids, log_metric=log_metric
        )
        if rewards is None or len(rewards) != len(prompts):
            got = "None" if rewards is None else len(rewards)
            raise ValueError(f"The reward function {name} returned {got} rewards for {len(prompts)} completions.")
        if any(r is None for r in rewards):
            raise ValueError(f"The reward function {name} returned None for some completions: PPO needs every score.")
        scores = torch.tensor([float(r) for r in rewards], dtype=torch.float32, device=self.accelerator.device)
        if not torch.isfinite(scores).all():
            raise ValueError(f"The reward function {name} returned NaN or infinite rewards: {rewards}.")
        return scores

    # -- training ----------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict[str, float]]:
        """Run PPO to `max_steps`; returns the log history (one dict per logged step, with `step`)."""
        args, accelerator = self.args, self.accelerator
        if resume_from_checkpoint:
            path = get_last_checkpoint(args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise ValueError(f"No checkpoint-<step> folder in {args.output_dir} to resume from.")
            self._load_checkpoint(path)
        else:
            # A different sampling stream on each process: the processes' prompts and completions differ.
            set_seed(args.seed, device_specific=True)
        if args.report_to:
            accelerator.init_trackers(args.run_name or "ppo", config=args.to_sanitized_dict())
        eval_every = int(args.eval_steps) if args.eval_steps else None
        if self.global_step == 0 and self._has_gold:
            self._log(self.evaluate(), step=0)
        bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc="PPO",
            disable=args.disable_tqdm or not accelerator.is_main_process,
        )
        while self.global_step < self.max_steps:
            metrics = self.step()
            self.global_step += 1
            last = self.global_step == self.max_steps
            if self._has_gold and (last or (eval_every and self.global_step % eval_every == 0)):
                metrics.update(self.evaluate())
            if last or self.global_step % max(1, int(args.logging_steps)) == 0 or "eval/gold_reward" in metrics:
                self._log(metrics, step=self.global_step)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
            if args.save_strategy == "steps" and (self.global_step % int(args.save_steps) == 0 or last):
                self._save_checkpoint()
        bar.close()
        # Not `accelerator.end_training()`: it also destroys the process group, which a script running several
        # trainers (recipes/ppo.py) still needs.
        for tracker in accelerator.trackers:
            tracker.finish()
        return self.log_history

    def step(self) -> dict[str, float]:
        """One PPO step on this process's share of prompts; returns the metrics averaged over processes."""
        args, accelerator = self.args, self.accelerator
        indices = self._local_indices(self.global_step)
        prompts = [self.train_prompts[i] for i in indices]
        reward_metrics: dict[str, list[float]] = defaultdict(list)
        timer = time.perf_counter()

        # Steps 1-3 need no gradients: the whole weights once (under ZeRO-3 one gather; processes then run alone).
        with self._whole() as whole:
            # 1. generate
            input_ids, attention_mask, prompt_length = self._generate(
                whole.policy, [self.train_prompt_ids[i] for i in indices]
            )
            mask = attention_mask[:, prompt_length:].float()
            finished = (input_ids[:, prompt_length:] == self.tokenizer.eos_token_id).any(1)
            t_generation, timer = time.perf_counter() - timer, time.perf_counter()

            # 2. score: the reward sees text (its tokenizer may differ from the policy's)
            completions, completion_ids = self._decode(prompts, input_ids, mask, prompt_length)
            log_metric = functools.partial(_append, reward_metrics)
            scores = self._score(self.reward_func, prompts, completions, completion_ids, log_metric)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~finished).float()
            t_scoring, timer = time.perf_counter() - timer, time.perf_counter()

            # 3. reference: log-probabilities under the policy and the reference, and values, without gradients
            chunk = args.rollout_batch_size or len(indices)
            logprobs, ref_logprobs, values, entropy = [], [], [], []
            with torch.no_grad():
                for i in range(0, len(indices), chunk):
                    ids, att = input_ids[i : i + chunk], attention_mask[i : i + chunk]
                    lp, logits = self._logprobs(whole.policy, ids, att, prompt_length)
                    logprobs.append(lp)
                    entropy.append(entropy_from_logits(logits))
                    ref_logprobs.append(self._ref_logprobs(whole.policy, ids, att, prompt_length))
                    values.append(self._forward(whole.value_model, ids, att, prompt_length)[..., 0])
        logprobs, ref_logprobs = torch.cat(logprobs).float(), torch.cat(ref_logprobs).float()
        values, entropy = torch.cat(values).float(), torch.cat(entropy).float()

        # 4. advantages: KL-shaped per-token rewards, GAE, whitening
        kl_coef = self.kl_controller.value
        kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * mask
        rewards = shaped_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae_advantages(rewards, values * mask, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout = Rollout(input_ids, attention_mask, prompt_length, mask, logprobs, values * mask, advantages, returns)
        t_reference, timer = time.perf_counter() - timer, time.perf_counter()

        # 5. optimize: num_ppo_epochs passes over minibatches; gradients are averaged over processes by DDP
        stats = self._optimize(rollout)
        t_optimization = time.perf_counter() - timer

        sequence_kl = ((logprobs - ref_logprobs) * mask).sum(1)  # k1 summed over the completion: the KL's estimate
        local = {
            "objective/scores": scores.mean(),
            "objective/kl": sequence_kl.mean(),
            "objective/kl_penalty": kl.sum(1).mean(),
            "objective/non_score_reward": -kl_coef * kl.sum(1).mean(),
            "objective/rlhf_reward": (scores - kl_coef * kl.sum(1)).mean(),
            "objective/entropy": masked_mean(entropy, mask),
            "completions/mean_length": mask.sum(1).mean(),
            "completions/eos_fraction": finished.float().mean(),
            "val/mean": masked_mean(values, mask),
            **stats,
            **{k: torch.tensor(sum(v) / len(v)) for k, v in sorted(reward_metrics.items())},
        }
        names = list(local)
        averaged = accelerator.reduce(torch.stack([local[k].float().to(accelerator.device) for k in names]), "mean")
        metrics = dict(zip(names, averaged.tolist(), strict=True))
        if args.adaptive_kl:
            # The same averaged KL on every process: the coefficient stays identical across ranks.
            self.kl_controller.update(metrics["objective/kl"], len(indices) * accelerator.num_processes)
        metrics.update({
            "kl_coef": kl_coef,
            "learning_rate": self.lr_scheduler.get_last_lr()[0],
            "time/generation": t_generation,
            "time/scoring": t_scoring,
            "time/reference": t_reference,
            "time/optimization": t_optimization,
        })  # fmt: skip
        return metrics

    def _optimize(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        args, accelerator = self.args, self.accelerator
        batch = rollout.input_ids.shape[0]
        minibatch = batch // args.num_mini_batches
        micro = args.per_device_train_batch_size
        stats = defaultdict(list)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(batch)
            for start in range(0, batch, minibatch):
                for micro_start in range(start, start + minibatch, micro):
                    mb = rollout.select(order[micro_start : micro_start + micro].to(rollout.input_ids.device))
                    # The minibatch's micro batches accumulate; gradients sync (DDP) or the optimizer steps (DeepSpeed,
                    # inside `backward`) at its last one. Each minibatch is `gradient_accumulation_steps` micro batches.
                    with accelerator.accumulate(self.policy_and_value):
                        ids, att, length = mb["input_ids"], mb["attention_mask"], rollout.prompt_length
                        position_ids = (att.cumsum(1) - 1).clamp(min=0)
                        logits, new_values = self.policy_and_value(
                            input_ids=ids, attention_mask=att, position_ids=position_ids
                        )
                        logits = logits[:, length - 1 : -1] / args.temperature
                        new_logprobs = logprobs_from_logits(logits, ids[:, length:])
                        new_values = new_values[:, length - 1 : -1, 0]
                        pg_loss, pg_clipfrac, approx_kl = policy_loss(
                            new_logprobs.float(), mb["logprobs"], mb["advantages"], mb["mask"], args.cliprange
                        )
                        vf_loss, vf_clipfrac = value_loss(
                            new_values.float(), mb["values"], mb["returns"], mb["mask"], args.cliprange_value
                        )
                        loss = pg_loss + args.vf_coef * vf_loss
                        accelerator.backward(loss)  # divided by gradient_accumulation_steps by Accelerate / DeepSpeed
                    with torch.no_grad():
                        stats["policy/entropy"].append(masked_mean(entropy_from_logits(logits.float()), mb["mask"]))
                    for name, value in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("policy/clipfrac", pg_clipfrac),
                                        ("policy/approxkl", approx_kl), ("val/clipfrac", vf_clipfrac)):  # fmt: skip
                        stats[name].append(value.detach())
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    # Under DeepSpeed the engine clipped already (`gradient_clipping` in its config): a no-op here.
                    accelerator.clip_grad_norm_(self.policy_and_value.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    # -- evaluation --------------------------------------------------------------------------------------------------
    @property
    def _has_gold(self) -> bool:
        return self.gold_reward is not None and bool(self.eval_prompts)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Gold reward, proxy reward (and what the proxy logs, e.g. `laplace/map_reward`) and KL to the reference on
        the held-out prompts, averaged over completions: `eval/gold_reward`, `eval/reward`, `eval/kl`, `eval/...`.

        Sampled under a fixed seed (the training RNG is left untouched), so successive evaluations share their random
        numbers and their differences reflect the policy, not the draw.
        """
        accelerator = self.accelerator
        jobs = [i for i in range(len(self.eval_prompts)) for _ in range(self.args.num_eval_generations)]
        records, logged = [], []
        # Whole weights: the processes evaluate unequal shares (under ZeRO-3 the weights are gathered once for it).
        with accelerator.split_between_processes(jobs) as local, self._whole() as whole:
            local = list(local)
            device = accelerator.device
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
                eval_seed = self.args.seed if self.args.eval_seed is None else self.args.eval_seed
                torch.manual_seed(eval_seed + 7919 * (accelerator.process_index + 1))
                chunk = self.args.rollout_batch_size or max(1, len(local))
                for start in range(0, len(local), chunk):
                    idx = local[start : start + chunk]
                    prompts = [self.eval_prompts[i] for i in idx]
                    input_ids, attention_mask, prompt_length = self._generate(
                        whole.policy, [self.eval_prompt_ids[i] for i in idx]
                    )
                    mask = attention_mask[:, prompt_length:].float()
                    completions, completion_ids = self._decode(prompts, input_ids, mask, prompt_length)
                    logprobs = self._logprobs(whole.policy, input_ids, attention_mask, prompt_length)[0]
                    ref_logprobs = self._ref_logprobs(whole.policy, input_ids, attention_mask, prompt_length)
                    kl = ((logprobs - ref_logprobs) * mask).sum(1)
                    gold = self._score(self.gold_reward, prompts, completions, completion_ids)
                    # What the proxy logs is a batch mean: weight it by the batch size to average over completions.
                    batch_logged = defaultdict(list)
                    proxy = self._score(
                        self.reward_func,
                        prompts,
                        completions,
                        completion_ids,
                        functools.partial(_append, batch_logged),
                    )
                    logged.extend((k, sum(v) / len(v) * len(idx), len(idx)) for k, v in batch_logged.items())
                    records.extend(zip(gold.tolist(), proxy.tolist(), kl.tolist(), strict=True))
        if accelerator.num_processes > 1:
            records, logged = gather_object(records), gather_object(logged)
        gold, proxy, kl = (sum(r[j] for r in records) / len(records) for j in range(3))
        metrics = {"eval/gold_reward": gold, "eval/reward": proxy, "eval/kl": kl}
        for name in sorted({name for name, _, _ in logged}):
            mine = [(total, n) for other, total, n in logged if other == name]
            metrics[f"eval/{name}"] = sum(t for t, _ in mine) / sum(n for _, n in mine)
        return metrics

    # -- logging and checkpoints -----------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.log_history.append({"step": step, **metrics})
        if self.args.report_to:
            self.accelerator.log(metrics, step=step)

    def _save_checkpoint(self) -> None:
        """`output_dir/checkpoint-<step>`: models, optimizer, scheduler and every process's RNG, plus the loop state."""
        accelerator = self.accelerator
        path = Path(self.args.output_dir) / f"checkpoint-{self.global_step}"
        accelerator.save_state(str(path))  # all processes: each saves its own RNG state
        if accelerator.is_main_process:
            state = {
                "global_step": self.global_step,
                "kl_coef": self.kl_controller.value,
                "log_history": self.log_history,
            }
            (path / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
            limit = self.args.save_total_limit
            if limit:
                checkpoints = sorted(
                    Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                )
                for old in checkpoints[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _load_checkpoint(self, path: str | Path) -> None:
        state_file = Path(path) / "trainer_state.json"
        if not state_file.is_file():
            raise ValueError(f"{path} is not a PPOTrainer checkpoint (no trainer_state.json).")
        self.accelerator.load_state(str(path))  # restores the RNG states too: the run continues as it would have
        state = json.loads(state_file.read_text())
        self.global_step, self.kl_controller.value = state["global_step"], state["kl_coef"]
        self.log_history = state["log_history"]

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the policy (the adapter for a PEFT policy) and its tokenizer."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.wait_for_everyone()
        # Every process takes part (under ZeRO-3 the weights are gathered; that needs `zero3_save_16bit_model: true`).
        state = self.accelerator.get_state_dict(self.policy_and_value)
        if self.accelerator.is_main_process:
            policy = {name.removeprefix("policy."): t for name, t in state.items() if name.startswith("policy.")}
            self.model.save_pretrained(output_dir, state_dict=policy)
            self.tokenizer.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()


def _append(store: dict[str, list[float]], name: str, value: float) -> None:
    """A `log_metric` that collects values into `store`."""
    store[name].append(value)


def mean_step_seconds(log_history: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each timed part (`time/...`) over a log history."""
    parts = defaultdict(list)
    for entry in log_history:
        for name, value in entry.items():
            if name.startswith("time/"):
                parts[name.removeprefix("time/")].append(value)
    return {name: sum(v) / len(v) for name, v in parts.items()}


__all__ = [
    "AdaptiveKLController",
    "PPOConfig",
    "PPOTrainer",
    "completion_mask",
    "entropy_from_logits",
    "gae_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "policy_loss",
    "shaped_rewards",
    "value_loss",
    "whiten",
]
