"""`PPOTrainer`: PPO for RLHF whose reward is any TRL reward callable, on Accelerate.

TRL removed its `PPOTrainer` in 1.13; this is a lean replacement whose reward sees text, so the policy and the reward
model may use different tokenizers (a `PenalizedReward` over Laplace reward models, a rule, a gold oracle). Its config
keeps TRL 1.12's meanings (docs/ppo_from_trl.md maps a TRL setup onto it). One PPO step (Ziegler et al. 2019, arXiv
1909.08593; Ouyang et al. 2022, arXiv 2203.02155):

1. generate: each process samples one completion for each of its prompts (`generation.generate`);
2. score: the reward callable scores (prompt, completion) text;
3. reference: log-probabilities under the policy and the reference policy, and the value model's values;
4. advantages: per-token reward = -kl_coef * KL(token) plus the score at the last completion token; GAE; whitening;
5. optimize: `num_ppo_epochs` passes over minibatches, clipped policy loss + `vf_coef` * clipped value loss;
6. log, evaluate the gold reward on held-out prompts (`evaluation.evaluate_policy`), checkpoint, call the callbacks.

The math of steps 4-5 is in `trl_bayes.rlhf` (pure functions), the settings in `trl_bayes.ppo_config`.
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    get_scheduler,
)
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.trainer_utils import get_last_checkpoint

from . import rlhf
from .distributed import (
    configure_deepspeed,
    process_group_backend,
    unwrap_model,
    unwrapped_whole,
    whole_weights,
)
from .evaluation import MetricLog, check_reward_function, evaluate_policy, reward_scores
from .generation import (
    completion_logits,
    completion_logprobs,
    decode_completions,
    end_at_pad,
    entropy_from_logits,
    generate,
    logprobs_from_logits,
    reference_logprobs,
)
from .ppo_checkpoint import load_checkpoint, save_checkpoint
from .ppo_config import PPOConfig
from .ppo_inputs import dataset_prompts, local_prompt_indices, reward_function
from .ppo_models import PolicyAndValue, build_optimizer, check_value_model, value_model_from_policy
from .rlhf import AdaptiveKLController, Rollout

if TYPE_CHECKING:
    from .reward_model import BayesianRewardModel


class PPOTrainer:
    """PPO on Accelerate with a reward callable; see the module docstring for the steps and [`PPOConfig`].

    Args:
        model ([`~transformers.PreTrainedModel`], [`~peft.PeftModel`] or `str`): the causal-LM policy (a folder or Hub
            id is loaded with `AutoModelForCausalLM`). A PEFT policy's reference is the same model with its adapter
            disabled (no second copy).
        reward_func (`Callable` or [`BayesianRewardModel`]): a TRL reward function `(prompts, completions,
            completion_ids=..., log_metric=..., **kwargs) -> list[float]` that reads text, e.g. [`PenalizedReward`]; a
            `BayesianRewardModel` is wrapped in `PenalizedReward(model, uncertainty="marginal")`. Its signature is
            checked here; a model (TRL 1.12's `reward_model`) is refused with what to pass instead.
        args ([`PPOConfig`]).
        train_dataset ([`~datasets.Dataset`]): a `prompt` column of strings or conversations (lists of messages), or
            an `input_ids` column of token ids (TRL's PPO datasets; a `prompt` column, if any, is what rewards see).
        processing_class ([`~transformers.PreTrainedTokenizerBase`]): the policy's tokenizer; needs a pad token.
        ref_model ([`~transformers.PreTrainedModel`], *optional*): the reference policy; default: the PEFT policy with
            its adapter disabled, or a frozen copy of the policy.
        value_model ([`~transformers.PreTrainedModel`], *optional*): a model returning per-token `logits` of shape
            `(B, L, 1)`, e.g. `AutoModelForTokenClassification(num_labels=1)` (checked here); default: the policy's
            in-memory backbone with a new scalar head (`value_model_from_policy`).
        peft_config ([`~peft.LoraConfig`], *optional*): wrap `model` in this adapter.
        eval_dataset ([`~datasets.Dataset`], *optional*): held-out prompts (as `train_dataset`) for `gold_reward`.
        gold_reward (`Callable`, *optional*): a TRL reward function evaluated on `eval_dataset` every `eval_steps`.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*): called as by TRL's trainers, with a
            [`~transformers.TrainerState`] (`global_step`, `max_steps`, `log_history`) and a
            [`~transformers.TrainerControl`]: `on_train_begin`, `on_step_begin`, `on_step_end`, `on_evaluate`,
            `on_log` (the logged metrics), `on_save`, `on_train_end`. Setting `control.should_training_stop` stops the
            run after the step; `control.should_save` saves a checkpoint.
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
        callbacks: list[TrainerCallback] | None = None,
    ):
        self.args = args
        tokenizer = self.tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The policy's tokenizer has no pad token, which batching prompts needs. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked, so any token works)."
            )
        # Checked before anything loads: a reward that cannot be called fails here, not after the first generation.
        self.reward_func = reward_function(reward_func)
        if gold_reward is not None:
            check_reward_function(gold_reward, "gold_reward")
        self.gold_reward = gold_reward
        # CPU processes talk over gloo (DDP, or DeepSpeed's CPU accelerator); `cpu=use_cpu` keeps a DDP launch of
        # several CPU processes one process group. The micro batches of a minibatch accumulate through Accelerate (and
        # DeepSpeed); the scheduler steps once per PPO step, the same on every process (Accelerate's default would
        # step it once per process).
        backend = "gloo" if args.use_cpu else process_group_backend()
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            gradient_accumulation_steps=args.local_mini_batch_size // args.local_micro_batch_size,
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
        if value_model is None:
            value_model = value_model_from_policy(model)
        self.is_peft = isinstance(model, PeftModel)
        base = model.get_base_model() if self.is_peft else model
        if ref_model is None and not self.is_peft:
            ref_model = copy.deepcopy(base)  # frozen at the policy's initial weights
        if value_model.config.pad_token_id is None:
            value_model.config.pad_token_id = tokenizer.pad_token_id

        self.train_prompts, self.train_prompt_ids = dataset_prompts(train_dataset, tokenizer, "train_dataset")
        self.eval_prompts, self.eval_prompt_ids = (
            dataset_prompts(eval_dataset, tokenizer, "eval_dataset") if eval_dataset is not None else ([], [])
        )
        longest = max(len(ids) for ids in self.train_prompt_ids + self.eval_prompt_ids)
        context = getattr(base.config, "max_position_embeddings", None)  # not every architecture has one
        if context is not None and longest + args.max_new_tokens > context:
            raise ValueError(
                f"The longest prompt has {longest} tokens; with max_new_tokens={args.max_new_tokens} it exceeds the "
                f"policy's context of {context} positions. Shorten or filter the prompts, or lower max_new_tokens."
            )
        self.max_steps = args.num_ppo_steps(len(self.train_prompts), self.accelerator.num_processes)

        # Dropout stays off for good (eval mode): PPO's first epoch must see ratio = 1 exactly.
        model.eval()
        value_model.eval()
        if ref_model is not None:
            ref_model.requires_grad_(False).eval().to(self.accelerator.device)
        self.ref_model = ref_model
        policy_and_value = PolicyAndValue(model, value_model)
        optimizer = build_optimizer(args, policy_and_value)
        # As TRL: the schedule counts PPO steps (one `lr_scheduler.step()` after each, in `step`).
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            args.get_warmup_steps(self.max_steps),
            self.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        configure_deepspeed(self.accelerator, args.local_micro_batch_size, args.max_grad_norm)
        # One module for DeepSpeed (ZeRO shards both models, the optimizer states and the gradients); the reference
        # policy stays outside, whole and frozen on every process.
        self.policy_and_value, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            policy_and_value, optimizer, scheduler
        )
        ids = torch.tensor([self.train_prompt_ids[0][:2]], device=self.accelerator.device)
        with self._whole() as whole:  # one forward of two prompt tokens, on every process (gathered under ZeRO-3)
            check_value_model(whole.value_model, ids)
        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            # A KV cache while sampling, whatever the policy's config says (a config may turn it off for training):
            # one token per forward after the prompt instead of the whole sequence again.
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if args.stop_token_id is None else args.stop_token_id,
        )
        self.kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)

        self.state = TrainerState(
            max_steps=self.max_steps,
            logging_steps=args.in_ppo_steps(args.logging_steps, self.max_steps),
            eval_steps=args.in_ppo_steps(args.eval_steps, self.max_steps),
            save_steps=args.in_ppo_steps(args.save_steps, self.max_steps),
            train_batch_size=args.local_batch_size,
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        # DefaultFlowCallback first, as in every TRL trainer: it raises `should_log` / `should_save` on schedule.
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, *(callbacks or [])], self.model, tokenizer, self.optimizer, self.lr_scheduler
        )

    @property
    def model(self) -> torch.nn.Module:
        """The policy (a `PeftModel` for a LoRA policy); under ZeRO-3 its weights are sharded outside `_whole`."""
        return unwrap_model(self.accelerator, self.policy_and_value).policy

    @property
    def value_model(self) -> torch.nn.Module:
        return unwrap_model(self.accelerator, self.policy_and_value).value_model

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def log_history(self) -> list[dict[str, float]]:
        return self.state.log_history

    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        self.callback_handler.add_callback(callback)

    def _whole(self):
        """A context giving the `PolicyAndValue` module with whole weights: under ZeRO-3 gathered (DeepSpeed's hooks off),
        for the parts where processes do unequal work (generation, sharded evaluation); elsewhere just unwrapped."""
        return unwrapped_whole(self.accelerator, self.policy_and_value)

    # -- training ----------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict[str, float]]:
        """Run PPO to `max_steps`; returns the log history (one dict per logged step, with `step`)."""
        args, accelerator, state, handler = self.args, self.accelerator, self.state, self.callback_handler
        if resume_from_checkpoint:
            path = get_last_checkpoint(args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise ValueError(f"No checkpoint-<step> folder in {args.output_dir} to resume from.")
            saved = load_checkpoint(accelerator, path)  # RNG states too: the run continues as it would have
            state.global_step, self.kl_controller.value = saved["global_step"], saved["kl_coef"]
            state.log_history = saved["log_history"]
        else:
            # A different sampling stream on each process: the processes' prompts and completions differ.
            set_seed(args.seed, device_specific=True)
        if args.report_to:
            accelerator.init_trackers(args.run_name or "ppo", config=args.to_sanitized_dict())
        eval_every = state.eval_steps if args.eval_steps else None
        self.control = handler.on_train_begin(args, state, self.control)
        if state.global_step == 0 and self._has_gold:
            self._log(self.evaluate(), step=0)
        bar = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc="PPO",
            disable=args.disable_tqdm or not accelerator.is_main_process,
        )
        while state.global_step < self.max_steps:
            self.control = handler.on_step_begin(args, state, self.control)
            metrics = self.step()
            state.global_step += 1
            state.epoch = metrics["episode"] / len(self.train_prompts)
            self.control = handler.on_step_end(args, state, self.control)
            last = state.global_step == self.max_steps
            due = self.control.should_evaluate or (eval_every and state.global_step % eval_every == 0)
            if self._has_gold and (last or due):
                metrics.update(self.evaluate())
            if last or self.control.should_log or "eval/gold_reward" in metrics:
                self._log(metrics, step=state.global_step)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
            if self.control.should_save:
                self._save_checkpoint()
            if self.control.should_training_stop:
                break
        bar.close()
        self.control = handler.on_train_end(args, state, self.control)
        # Not `accelerator.end_training()`: it also destroys the process group, which a script running several
        # trainers (recipes/ppo.py) still needs.
        for tracker in accelerator.trackers:
            tracker.finish()
        return self.log_history

    def step(self) -> dict[str, float]:
        """One PPO step on this process's share of prompts; returns the metrics averaged over processes."""
        args, accelerator = self.args, self.accelerator
        indices = local_prompt_indices(
            self.global_step, args.local_batch_size, self.accelerator, len(self.train_prompts), args.seed
        )
        prompts = [self.train_prompts[i] for i in indices]
        learning_rate = self.lr_scheduler.get_last_lr()[0]  # this step's (logged as TRL logs it)
        reward_metrics = MetricLog()
        timer = time.perf_counter()

        # Steps 1-3 need no gradients: the whole weights once (under ZeRO-3 one gather; processes then run alone).
        with self._whole() as whole:
            # 1. generate: from the process's own RNG stream (seeded per process, checkpointed with the run); a pad
            # token sampled before the stop token ends the completion, as in TRL
            prompt_ids = [self.train_prompt_ids[i] for i in indices]
            output = generate(whole.policy, prompt_ids, self.generation_config, batch_size=args.rollout_batch_size)
            output = end_at_pad(output, self.generation_config)
            input_ids, attention_mask, prompt_length = output.input_ids, output.attention_mask, output.prompt_length
            mask, finished = output.completion_mask, output.finished
            t_generation, timer = time.perf_counter() - timer, time.perf_counter()

            # 2. score: the reward sees text (its tokenizer may differ from the policy's)
            completions, completion_ids = decode_completions(self.tokenizer, output, isinstance(prompts[0], list))
            scores = reward_scores(self.reward_func, prompts, completions, completion_ids, reward_metrics)
            scores = torch.tensor(scores, dtype=torch.float32, device=accelerator.device)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~finished).float()
            t_scoring, timer = time.perf_counter() - timer, time.perf_counter()

            # 3. reference: log-probabilities under the policy and the reference, and values, without gradients
            chunk = args.rollout_batch_size or len(indices)
            logprobs, ref_logprobs, values, entropy = [], [], [], []
            # Inference mode: no autograd bookkeeping (these are constants of the loss; `torch.cat` below copies them
            # into normal tensors).
            with torch.inference_mode():
                for i in range(0, len(indices), chunk):
                    ids, att = input_ids[i : i + chunk], attention_mask[i : i + chunk]
                    lp, logits = completion_logprobs(whole.policy, ids, att, prompt_length, args.temperature)
                    logprobs.append(lp)
                    entropy.append(entropy_from_logits(logits))
                    ref = reference_logprobs(whole.policy, self.ref_model, ids, att, prompt_length, args.temperature)
                    ref_logprobs.append(ref)
                    values.append(completion_logits(whole.value_model, ids, att, prompt_length)[..., 0])
        logprobs, ref_logprobs = torch.cat(logprobs).float(), torch.cat(ref_logprobs).float()
        values, entropy = torch.cat(values).float(), torch.cat(entropy).float()

        # 4. advantages: KL-shaped per-token rewards (whitened if asked), GAE, whitening
        kl_coef = self.kl_controller.value
        kl = rlhf.kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * mask
        rewards = rlhf.shaped_rewards(scores, kl, mask, kl_coef)
        if args.whiten_rewards:
            rewards = rlhf.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rlhf.gae_advantages(rewards, values * mask, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = rlhf.whiten(advantages, mask)
        rollout = Rollout(input_ids, attention_mask, prompt_length, mask, logprobs, values * mask, advantages, returns)
        t_reference, timer = time.perf_counter() - timer, time.perf_counter()

        # 5. optimize: num_ppo_epochs passes over minibatches; gradients are averaged over processes by DDP
        stats = self._optimize(rollout)
        self.lr_scheduler.step()
        t_optimization = time.perf_counter() - timer

        sequence_kl = ((logprobs - ref_logprobs) * mask).sum(1)  # k1 summed over the completion: the KL's estimate
        local = {
            "objective/scores": scores.mean(),
            "objective/kl": sequence_kl.mean(),
            "objective/kl_penalty": kl.sum(1).mean(),
            "objective/non_score_reward": -kl_coef * kl.sum(1).mean(),
            "objective/rlhf_reward": (scores - kl_coef * kl.sum(1)).mean(),
            "objective/entropy": rlhf.masked_mean(entropy, mask),
            "completions/mean_length": mask.sum(1).mean(),
            "completions/eos_fraction": finished.float().mean(),
            "val/mean": rlhf.masked_mean(values, mask),
            **stats,
            **{k: torch.tensor(v) for k, v in sorted(reward_metrics.means().items())},
        }
        names = list(local)
        averaged = accelerator.reduce(torch.stack([local[k].float().to(accelerator.device) for k in names]), "mean")
        metrics = dict(zip(names, averaged.tolist(), strict=True))
        episodes = len(indices) * accelerator.num_processes
        if args.adaptive_kl:
            # The same averaged KL on every process: the coefficient stays identical across ranks.
            self.kl_controller.update(metrics["objective/kl"], episodes)
        metrics.update({
            "kl_coef": kl_coef,
            "learning_rate": learning_rate,
            "episode": (self.global_step + 1) * episodes,
            "time/generation": t_generation,
            "time/scoring": t_scoring,
            "time/reference": t_reference,
            "time/optimization": t_optimization,
        })  # fmt: skip
        return metrics

    def _optimize(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        args, accelerator = self.args, self.accelerator
        batch = rollout.input_ids.shape[0]
        minibatch, micro = args.local_mini_batch_size, args.local_micro_batch_size
        stats = defaultdict(list)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(batch)
            for start in range(0, batch, minibatch):
                for micro_start in range(start, start + minibatch, micro):
                    mb = rollout.select(order[micro_start : micro_start + micro].to(rollout.input_ids.device))
                    # The minibatch's micro batches accumulate; gradients sync (DDP) or the optimizer steps (DeepSpeed,
                    # inside `backward`) at its last one (the accelerator's gradient_accumulation_steps).
                    with accelerator.accumulate(self.policy_and_value):
                        ids, att, length = mb["input_ids"], mb["attention_mask"], rollout.prompt_length
                        position_ids = (att.cumsum(1) - 1).clamp(min=0)
                        logits, new_values = self.policy_and_value(
                            input_ids=ids, attention_mask=att, position_ids=position_ids
                        )
                        logits = logits[:, length - 1 : -1] / args.temperature
                        new_logprobs = logprobs_from_logits(logits, ids[:, length:])
                        new_values = new_values[:, length - 1 : -1, 0]
                        pg_loss, pg_clipfrac, approx_kl = rlhf.policy_loss(
                            new_logprobs.float(), mb["logprobs"], mb["advantages"], mb["mask"], args.cliprange
                        )
                        vf_loss, vf_clipfrac = rlhf.value_loss(
                            new_values.float(), mb["values"], mb["returns"], mb["mask"], args.cliprange_value
                        )
                        loss = pg_loss + args.vf_coef * vf_loss
                        accelerator.backward(loss)  # divided by the accumulation steps by Accelerate / DeepSpeed
                    with torch.no_grad():
                        stats["policy/entropy"].append(
                            rlhf.masked_mean(entropy_from_logits(logits.float()), mb["mask"])
                        )
                    for name, value in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("policy/clipfrac", pg_clipfrac),
                                        ("policy/approxkl", approx_kl), ("val/clipfrac", vf_clipfrac)):  # fmt: skip
                        stats[name].append(value.detach())
                if args.max_grad_norm:
                    # Under DeepSpeed the engine clipped already (`gradient_clipping` in its config): a no-op here.
                    accelerator.clip_grad_norm_(self.policy_and_value.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    # -- evaluation --------------------------------------------------------------------------------------------------
    @property
    def _has_gold(self) -> bool:
        return self.gold_reward is not None and bool(self.eval_prompts)

    def evaluate(self) -> dict[str, float]:
        """Gold reward, proxy reward (and what the proxy logs, e.g. `laplace/map_reward`) and KL to the reference on
        the held-out prompts, averaged over completions: `eval/gold_reward`, `eval/reward`, `eval/kl`, `eval/...`.

        `evaluate_policy` under `eval_seed`: the same draw at every evaluation (differences reflect the policy, not the
        draw) and on any number of processes; the training RNG is left untouched.
        """
        args = self.args
        # Whole weights: the processes evaluate unequal shares (under ZeRO-3 the weights are gathered once for it).
        with self._whole() as whole:
            metrics = evaluate_policy(
                whole.policy,
                self.tokenizer,
                self.eval_prompts,
                self.gold_reward,
                self.reward_func,
                self.generation_config,
                reference=self.ref_model,
                num_generations=args.num_eval_generations,
                seed=args.seed if args.eval_seed is None else args.eval_seed,
                chunk_size=args.rollout_batch_size or args.local_batch_size,
                accelerator=self.accelerator,
                prompt_ids=self.eval_prompt_ids,
            )
        named = {"gold_reward": "eval/gold_reward", "proxy_reward": "eval/reward", "kl": "eval/kl"}
        metrics = {named.get(name, f"eval/{name}"): value for name, value in metrics.items()}
        self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics=metrics)
        return metrics

    # -- logging and checkpoints -----------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.log_history.append({"step": step, **metrics})
        if self.args.report_to:
            self.accelerator.log(metrics, step=step)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=dict(metrics))

    def _save_checkpoint(self) -> None:
        """`output_dir/checkpoint-<step>`: models, optimizer, scheduler and every process's RNG, plus the loop state."""
        loop_state = {
            "global_step": self.global_step,
            "kl_coef": self.kl_controller.value,
            "log_history": self.log_history,
        }
        save_checkpoint(
            self.accelerator, self.args.output_dir, self.global_step, loop_state, self.args.save_total_limit
        )
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

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


def mean_step_seconds(log_history: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each timed part (`time/...`) over a log history."""
    parts = defaultdict(list)
    for entry in log_history:
        for name, value in entry.items():
            if name.startswith("time/"):
                parts[name.removeprefix("time/")].append(value)
    return {name: sum(v) / len(v) for name, v in parts.items()}
