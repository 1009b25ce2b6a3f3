"""The PPO study (recipes/ppo.py) on top of the shared stages: one cached `trl_bayes.PPOTrainer` run per method and
seed against the MAP proxy, its Laplace-penalized version (LA) or the penalized Laplace ensemble (LA-Ens), the gold
reward on the held-out prompts along the way; the reference samples the relative variance centers on."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trl_bayes.experiments.rl_report import method_label
from trl_bayes.experiments.stages import Stage, generation_config, load_policy, world_settings

METHODS = ("MAP", "LA", "LA-Ens")
CSV_COLUMNS = ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]


def ppo_config(args, training_args, output_dir: Path, seed: int):
    """The `PPOConfig` of one run from the recipe's `ppo_*` arguments (`args`: `PPOScriptArguments`)."""
    from trl_bayes import PPOConfig

    return PPOConfig(
        str(output_dir), use_cpu=training_args.use_cpu, ddp_backend=training_args.ddp_backend, bf16=args.ppo_bf16,
        report_to=training_args.report_to, disable_tqdm=True,  # `--report_to tensorboard`: files in the run folder
        seed=seed, max_steps=args.ppo_steps, per_device_train_batch_size=args.ppo_micro_batch_size,
        # PPOConfig (as TRL's): per_device_train_batch_size x gradient_accumulation_steps completions per update.
        gradient_accumulation_steps=args.ppo_batch_size // args.ppo_micro_batch_size,
        num_mini_batches=args.ppo_mini_batches, num_ppo_epochs=args.ppo_epochs, learning_rate=args.ppo_learning_rate,
        lr_scheduler_type="constant", kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, vf_coef=args.vf_coef,
        max_new_tokens=args.max_new_tokens, temperature=args.ppo_temperature,
        missing_eos_penalty=args.missing_eos_penalty, eval_steps=args.ppo_eval_steps,
        num_eval_generations=args.num_eval_generations, eval_seed=1234, save_strategy="steps", save_steps=args.ppo_save_steps,
        save_total_limit=1, logging_steps=1,
    )  # fmt: skip


def ppo_key(args, method: str, seed: int, proxy_dirs: list[Path]) -> dict[str, Any]:
    """What one PPO run's results depend on (its stage is redone when any of it changes)."""
    ppo = {name: value for name, value in asdict(args).items() if name.startswith(("ppo_", "kl_", "vf_"))}
    extra = [args.max_new_tokens, args.missing_eos_penalty, args.policy_lora_r, args.num_eval_generations]
    proxies = [json.loads((d / "done.json").read_text()) for d in proxy_dirs]
    if method != "MAP" and args.uncertainty == "relative":
        extra += ["relative", args.num_reference_samples]
    return {"world": world_settings(args), "method": [method, args.penalty, args.k], "seed": seed, "ppo": ppo,
            "extra": extra, "proxies": proxies, "gold": args.gold_reward}  # fmt: skip


def sample_reference(args, prompts: list[str], policy_path: str, cache: Path, accelerator) -> dict[str, list[str]]:
    """`num_reference_samples` completions of the SFT (reference) policy per prompt, drawn once (cached): the group
    the relative variance centers a PPO completion on."""
    from trl_bayes import BestOfNSampler

    key = {"world": world_settings(args), "K": args.num_reference_samples, "max_new_tokens": args.max_new_tokens,
           "sampling": [args.temperature, args.top_k, args.top_p]}  # fmt: skip
    stage = Stage(cache, "reference_samples", key)
    if not stage.done:
        policy, tokenizer = load_policy(policy_path, accelerator.device)
        sampler = BestOfNSampler(
            policy, tokenizer, n=args.num_reference_samples, generation_config=generation_config(args), seed=4321,
            accelerator=accelerator,
        )  # fmt: skip
        completions = sampler.generate(prompts)
        if accelerator.is_main_process:
            stage.start()
            (stage.path / "reference.json").write_text(json.dumps(dict(zip(prompts, completions, strict=True))))
            stage.finish()
        accelerator.wait_for_everyone()
    return json.loads((stage.path / "reference.json").read_text())


def run_ppo(args, training_args, method, seed, proxy_dirs, policy_path, prompts, gold, cache, state, reference=None):
    """One PPO run (cached): its log history. A run killed mid-way resumes from its last checkpoint."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from trl_bayes import BayesianRewardModel, PenalizedReward, PPOTrainer
    from trl_bayes.distributed import whole_weights

    stage = Stage(cache / "ppo", f"{method}-seed{seed}", ppo_key(args, method, seed, proxy_dirs))
    if not stage.done:
        if state.is_main_process and not stage.partial:
            stage.start()  # a folder from other settings is cleared; one from these settings keeps its checkpoints
        state.wait_for_everyone()
        models = [BayesianRewardModel.from_pretrained(d, device=state.device) for d in proxy_dirs]
        penalty = "none" if method == "MAP" else args.penalty
        relative = method != "MAP" and args.uncertainty == "relative"
        reward = PenalizedReward(
            models, penalty=penalty, k=args.k, batch_size=args.ppo_batch_size,
            uncertainty="relative" if relative else "marginal", reference=reference if relative else None,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with whole_weights():  # ZeRO-3 shards it in the trainer's `prepare`; the frozen reference copy stays whole
            policy = AutoModelForCausalLM.from_pretrained(policy_path)
        peft_config = None
        if args.policy_lora_r:
            peft_config = LoraConfig(task_type="CAUSAL_LM", r=args.policy_lora_r, lora_alpha=2 * args.policy_lora_r)
        # The PPO seed: the proxy seed plus the run's seed, the same for every method.
        config = ppo_config(args, training_args, stage.path / "run", seed=training_args.seed + seed)
        trainer = PPOTrainer(
            policy, reward, config, Dataset.from_dict({"prompt": prompts[0]}), tokenizer, peft_config=peft_config,
            eval_dataset=Dataset.from_dict({"prompt": prompts[1]}), gold_reward=gold,
        )  # fmt: skip
        run_dir = stage.path / "run"
        history = trainer.train(resume_from_checkpoint=get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None)
        if state.is_main_process:
            (stage.path / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
            stage.finish()
        state.wait_for_everyone()
    return json.loads((stage.path / "log_history.json").read_text())


def result_rows(method: str, seed: int, history: list[dict], args) -> list[dict[str, Any]]:
    rows = []
    for entry in history:
        if "eval/gold_reward" not in entry:
            continue
        # The proxy's MAP reward (unpenalized), comparable across methods; penalized methods also log their own.
        proxy = entry.get("eval/laplace/map_reward", entry["eval/reward"])
        rows.append({"method": method, "penalty": "none" if method == "MAP" else args.penalty,
                     "k": 0.0 if method == "MAP" else args.k, "seed": seed, "step": entry["step"],
                     "kl": entry["eval/kl"], "proxy_reward": proxy, "gold_reward": entry["eval/gold_reward"]})  # fmt: skip
    return rows


def describe_plan(args, training_args, model_args) -> list[str]:
    policy = args.policy_name_or_path or "offline tiny GPT-NeoX SFT policy (trained here)"
    return [
        f"world: {'offline world, seed ' + str(args.world_seed) if args.offline else args.prompts_dataset_name}"
        f" -> {args.num_eval_prompts} held-out prompts",
        f"policy: {policy} ({'LoRA r=' + str(args.policy_lora_r) if args.policy_lora_r else 'full fine-tuning'})",
        f"gold reward: {args.gold_reward}",
        f"pairs: {args.num_train_pairs} sampled + gold-labelled ({args.label_noise:.0%} flipped)",
        f"proxies: {model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r} "
        f"alpha={model_args.lora_alpha}, {training_args.hessian_structure} Laplace, "
        f"{len(args.seeds)} seeds x {args.members_used()} members",
        f"PPO: methods {[method_label(m, args) for m in args.methods]}, seeds {args.seeds}, {args.ppo_steps} steps x "
        f"{args.ppo_batch_size} completions (max_new_tokens={args.max_new_tokens}), kl_coef {args.kl_coef:g}",
    ]
