"""`PPOConfig`: the settings of `PPOTrainer`, a `TrainingArguments` with the PPO fields (`--help` lists them).

The batch fields, `total_episodes`, the schedule and the optimizer mean what they meant in TRL 1.12's `PPOConfig`;
docs/ppo_from_trl.md maps every TRL field (and the few deliberate differences) onto this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    Configuration class for the [`PPOTrainer`].

    Only the parameters specific to PPO are listed here; see [`~transformers.TrainingArguments`] for the others. A PPO
    step (TRL: an *update*) generates a batch of completions and optimizes on it. Coming from TRL 1.12's `PPOConfig`:
    the names below mean the same there unless a *TRL:* note says otherwise; docs/ppo_from_trl.md has the full table.

    Parameters:
        > Parameters that control the batch (as in TRL)

        per_device_train_batch_size (`int`, defaults to `8`):
            Completions per forward/backward pass (micro batch); a minibatch smaller than this is one micro batch.
        gradient_accumulation_steps (`int`, defaults to `1`):
            Micro batches per rollout batch: each process generates `local_batch_size = per_device_train_batch_size *
            gradient_accumulation_steps` completions per PPO step, as in TRL. Not `Trainer`'s meaning (micro batches
            per optimizer step): here the optimizer steps once per minibatch.
        num_mini_batches (`int`, *optional*, defaults to `1`):
            Minibatches per PPO epoch, one optimizer step each; must divide `local_batch_size`.
        num_ppo_epochs (`int`, *optional*, defaults to `4`): passes over the batch per PPO step.
        total_episodes (`int`, *optional*):
            Total completions over all processes; PPO steps = ceil(total_episodes / (local_batch_size * processes)),
            rounded up as in TRL. Without it: `max_steps` PPO steps when set (> 0), else (TRL's default)
            `num_train_epochs * len(train_dataset)` episodes. Setting both `total_episodes` and `max_steps` is an error.
        rollout_batch_size (`int`, *optional*):
            Sequences per `generate` / no-grad forward call (`None` = the whole local batch at once); lower it for big
            models. *TRL:* `local_rollout_forward_batch_size` (accepted as an alias).

        > Parameters that control generation

        max_new_tokens (`int`, *optional*, defaults to `53`): completion length limit. *TRL:* `response_length`
            (accepted as an alias).
        temperature (`float`, *optional*, defaults to `0.7`): sampling temperature; log-probabilities are those of the
            tempered distribution the tokens were drawn from.
        stop_token_id (`int`, *optional*):
            The token that ends a completion (it is part of it); `None` = the tokenizer's EOS. *TRL:* the same, but
            TRL's default (no stop token at all, every completion `response_length` long) is not offered:
            `stop_token="eos"` is accepted (it is the default here) and any other value is refused. A generated pad
            token (when it is not the stop token) ends the completion before it, as in TRL.
        missing_eos_penalty (`float`, *optional*): subtracted from the score of completions without the stop token
            (cut at `max_new_tokens`, or ended by a pad token); discourages the policy from running on.

        > Parameters that control the KL penalty

        kl_coef (`float`, *optional*, defaults to `0.05`): initial coefficient of the per-token KL penalty (beta).
        kl_estimator (`str`, *optional*, defaults to `"k1"`): `"k1"` (log ratio, unbiased, may be negative) or `"k3"`
            (always >= 0, lower variance).
        adaptive_kl (`bool`, *optional*, defaults to `False`): adapt `kl_coef` so that the KL tracks `target_kl`
            (Ziegler et al. 2019). Not in TRL 1.12.
        target_kl (`float`, *optional*, defaults to `6.0`): target sequence KL (nats) of the adaptive controller.
        kl_horizon (`int`, *optional*, defaults to `10000`): episodes over which the controller adapts.

        > Parameters that control advantages and losses

        gamma (`float`, *optional*, defaults to `1.0`): discount. lam (`float`, *optional*, defaults to `0.95`): GAE
            lambda.
        whiten_rewards (`bool`, *optional*, defaults to `False`): rescale the per-token rewards by their std over each
            local batch (mean kept), as TRL's `whiten_rewards` (which divides by the unbiased std).
        whiten_advantages (`bool`, *optional*, defaults to `True`): normalize advantages over each local batch (TRL
            always does, with the unbiased std; here the population std).
        cliprange (`float`, *optional*, defaults to `0.2`): policy ratio clip. cliprange_value (`float`, *optional*,
            defaults to `0.2`): value clip.
        vf_coef (`float`, *optional*, defaults to `0.1`): weight of the value loss.

        > Parameters that control optimization (`TrainingArguments` fields, with their `Trainer` meaning)

        optim, optim_args, adam_beta1, adam_beta2, adam_epsilon, weight_decay:
            the optimizer `Trainer.create_optimizer` builds (default `adamw_torch_fused`), over the policy's and the
            value model's trainable parameters, weight decay on all but biases and norms (TRL builds the same one).
        max_grad_norm (`float`, defaults to `1.0`):
            clip the gradient norm of each optimizer step (`0` or `None`: no clipping). *TRL:* 1.12's PPO ignored
            this field and never clipped outside DeepSpeed; set `max_grad_norm=0` for its behaviour. Clipping is the
            default here because it keeps one large advantage from moving the policy far in one step.
        lr_scheduler_type, warmup_steps, warmup_ratio:
            the schedule counts PPO steps and steps once after each of them, as in TRL: every optimizer step of a PPO
            step uses the same learning rate, and the logged `learning_rate` is the one that step used.

        > Parameters that control evaluation

        eval_steps (`int`, *optional*): evaluate the gold reward every `eval_steps` steps (also before the first and
            after the last step) when the trainer has a `gold_reward` and an `eval_dataset`.
        num_eval_generations (`int`, *optional*, defaults to `1`): completions per held-out prompt.
        eval_seed (`int`, *optional*): seed of the evaluation draws (`None` = `seed`); fix it across runs that differ
            in `seed` to evaluate every run on the same random numbers. The held-out completions are drawn in chunks
            of `rollout_batch_size` (else `local_batch_size`) completions, each under its own seed from `eval_seed`
            (`trl_bayes.evaluate_policy`): the same numbers on any number of processes.

        > TRL 1.12 names (accepted so that a TRL config ports unchanged)

        response_length (`int`, *optional*): sets `max_new_tokens`.
        local_rollout_forward_batch_size (`int`, *optional*): sets `rollout_batch_size`.
        stop_token (`str`, *optional*): `"eos"` only (this trainer's behaviour); see `stop_token_id`.
        num_sample_generations (`int`, *optional*, defaults to `0`): TRL printed tables of sample completions; not
            offered (0 only): evaluate held-out prompts with `eval_steps`, and read completions in a callback.
    """

    # Defaults that differ from TrainingArguments'
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per forward/backward pass."})
    learning_rate: float = field(default=3e-6, metadata={"help": "Learning rate (policy and value model)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X PPO steps."})
    # batch
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total completions; sets the PPO steps."})
    rollout_batch_size: int | None = field(default=None, metadata={"help": "Sequences per generate/forward call."})
    # generation
    max_new_tokens: int = field(default=53, metadata={"help": "Completion length limit."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Token that ends completions (None: EOS)."})
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
    whiten_rewards: bool = field(default=False, metadata={"help": "Rescale per-token rewards by their std."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    # evaluation
    num_eval_generations: int = field(default=1, metadata={"help": "Completions per held-out prompt."})
    eval_seed: int | None = field(default=None, metadata={"help": "Seed of the evaluation draws (None = seed)."})
    # TRL 1.12 names
    response_length: int | None = field(default=None, metadata={"help": "TRL's name for max_new_tokens."})
    local_rollout_forward_batch_size: int | None = field(
        default=None, metadata={"help": "TRL's name for rollout_batch_size."}
    )
    stop_token: str | None = field(default=None, metadata={"help": "TRL's stop token: 'eos' only (the default)."})
    num_sample_generations: int = field(default=0, metadata={"help": "TRL's sample tables: not offered (0 only)."})

    def __post_init__(self):
        self._take_trl_names()
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
            ("total_episodes", self.total_episodes is None or self.total_episodes >= 1, ">= 1 or None"),
            ("save_strategy", self.save_strategy in ("no", "steps"), "'no' or 'steps'"),
            # Silently ignored otherwise: the models train in eval mode (dropout off), where checkpointing is off too,
            # and nothing here pushes.
            ("gradient_checkpointing", not self.gradient_checkpointing, "False (PPOTrainer does not checkpoint)"),
            ("push_to_hub", not self.push_to_hub, "False (call save_model, then push the folder)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r}: must be {expected}.")
        if self.total_episodes is not None and self.max_steps > 0:
            raise ValueError(
                f"PPOConfig: total_episodes={self.total_episodes} and max_steps={self.max_steps} both set the number "
                "of PPO steps; set one."
            )
        if self.local_batch_size % self.num_mini_batches:
            raise ValueError(
                f"PPOConfig: local_batch_size = per_device_train_batch_size * gradient_accumulation_steps = "
                f"{self.per_device_train_batch_size} * {self.gradient_accumulation_steps} = {self.local_batch_size} "
                f"completions per process must split into num_mini_batches={self.num_mini_batches} equal minibatches."
            )
        if self.local_mini_batch_size % self.local_micro_batch_size:
            raise ValueError(
                f"PPOConfig: a minibatch of {self.local_mini_batch_size} completions (local_batch_size / "
                f"num_mini_batches) must split into micro batches of per_device_train_batch_size="
                f"{self.per_device_train_batch_size}; change one of them."
            )

    def _take_trl_names(self) -> None:
        """Move TRL 1.12's names onto ours, refusing what this trainer does not do (before the checks)."""
        if self.response_length is not None:
            if self.max_new_tokens not in (53, self.response_length):  # 53: the default of both
                raise ValueError(
                    f"PPOConfig: response_length={self.response_length} (TRL's name) and max_new_tokens="
                    f"{self.max_new_tokens} disagree; set max_new_tokens."
                )
            self.max_new_tokens = self.response_length
        if self.local_rollout_forward_batch_size is not None:
            if self.rollout_batch_size not in (None, self.local_rollout_forward_batch_size):
                raise ValueError(
                    f"PPOConfig: local_rollout_forward_batch_size={self.local_rollout_forward_batch_size} (TRL's name) "
                    f"and rollout_batch_size={self.rollout_batch_size} disagree; set rollout_batch_size."
                )
            self.rollout_batch_size = self.local_rollout_forward_batch_size
        if self.stop_token not in (None, "eos"):
            raise ValueError(
                f"PPOConfig.stop_token={self.stop_token!r}: only 'eos' (completions end at the tokenizer's EOS, the "
                "default here); for another token set stop_token_id."
            )
        if self.stop_token == "eos" and self.stop_token_id is not None:
            raise ValueError("PPOConfig: set stop_token='eos' or stop_token_id, not both (as in TRL).")
        if self.num_sample_generations:
            raise ValueError(
                f"PPOConfig.num_sample_generations={self.num_sample_generations}: PPOTrainer prints no sample tables. "
                "Set it to 0; for held-out completions scored by a gold reward set eval_steps (with the trainer's "
                "eval_dataset and gold_reward), and read any logged metric in a TrainerCallback's on_log."
            )

    @property
    def local_batch_size(self) -> int:
        """Completions each process generates per PPO step (TRL's `local_batch_size`)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_mini_batch_size(self) -> int:
        """Completions per optimizer step on each process (TRL's `local_mini_batch_size`)."""
        return self.local_batch_size // self.num_mini_batches

    @property
    def local_micro_batch_size(self) -> int:
        """Completions per forward/backward pass: `per_device_train_batch_size`, at most one minibatch."""
        return min(self.per_device_train_batch_size, self.local_mini_batch_size)

    @staticmethod
    def in_ppo_steps(steps: float | None, max_steps: int) -> int:
        """`logging_steps`, `eval_steps` or `save_steps` in PPO steps: below 1 a fraction of the run, as in `Trainer`
        (`None`: `TrainerState`'s default, 500)."""
        if not steps:
            return 500
        return math.ceil(max_steps * steps) if steps < 1 else int(steps)

    def num_ppo_steps(self, num_prompts: int, num_processes: int) -> int:
        """PPO steps of a run on `num_prompts` training prompts: `max_steps`, or the episodes (`total_episodes`, else
        `num_train_epochs` passes over the prompts) over the global batch, rounded up (TRL's `num_total_batches`)."""
        if self.total_episodes is None and self.max_steps > 0:
            return self.max_steps
        episodes = self.total_episodes if self.total_episodes is not None else int(self.num_train_epochs * num_prompts)
        return max(1, math.ceil(episodes / (self.local_batch_size * num_processes)))
