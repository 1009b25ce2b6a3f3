"""The PPO study (recipes/ppo.py) on top of the shared stages: one cached `trl_bayes.PPOTrainer` run per method and
seed, each a job for the worker processes (`trl_bayes.experiments.workers`), against the MAP proxy or a penalized
version of it (`METHODS`), the gold reward on the held-out prompts along the way; the reference samples that the
within-prompt penalties (relative variance, typicality baselines) center a PPO completion on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trl_bayes.experiments.best_of_n_study import METHOD_UNCERTAINTIES
from trl_bayes.experiments.rl_report import method_label
from trl_bayes.experiments.stages import Stage, generation_config, load_policy, world_plan, world_settings
from trl_bayes.experiments.workers import run_jobs

METHODS = ("MAP", "LA", "LA-rel", "LA-Ens", "Ens-UWO", "Prior-rel", "Hidden-Euc", "Hidden-Maha")
"""PPO's reward per method (`reward_options`): `MAP` the proxy's MAP reward; `LA` its Laplace reward penalized with
`penalty` and `k` on the `uncertainty` variance; `LA-rel` the same on the relative variance; `LA-Ens` the penalized
Laplace ensemble; `Ens-UWO` the MAP ensemble's uncertainty-weighted objective (mean - k * variance of the members'
rewards, Coste et al.); `Prior-rel`, `Hidden-Euc`, `Hidden-Maha` the typicality baselines of issue 16
(`BASELINE_UNCERTAINTIES`), each centered on the reference samples of its prompt."""
ENSEMBLE_METHODS = ("LA-Ens", "Ens-UWO")
"""Methods whose reward combines the seed's `ensemble_size` proxies (the others use member 0)."""
BASELINE_UNCERTAINTIES = {
    method: METHOD_UNCERTAINTIES[method] for method in ("Prior-rel", "Hidden-Euc", "Hidden-Maha")
}
"""The `PenalizedReward(uncertainty=...)` option of each baseline method."""
CSV_COLUMNS = ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]


def reward_options(method: str, args) -> tuple[str, str]:
    """(penalty, uncertainty) of `method`'s `PenalizedReward` (`args`: `PPOScriptArguments`); `k` is `args.k` for every
    penalized method, fixed before the run. MAP and Ens-UWO use no variance (`marginal`, unused)."""
    if method == "MAP":
        return "none", "marginal"
    if method == "Ens-UWO":
        return "uwo", "marginal"
    uncertainty = {"LA": args.uncertainty, "LA-Ens": args.uncertainty, "LA-rel": "relative"}
    return args.penalty, {**uncertainty, **BASELINE_UNCERTAINTIES}[method]


def uses_reference(method: str, args) -> bool:
    """Whether `method`'s penalty is within a prompt's group: PPO scores one completion per prompt, so the group is the
    prompt's reference samples (`sample_reference`)."""
    return reward_options(method, args)[1] != "marginal"


def check_baselines_available(methods) -> None:
    """A clear error for a baseline method whose `PenalizedReward` option this trl_bayes lacks (issue 16's
    typicality baselines land in `trl_bayes.penalties`)."""
    from trl_bayes.penalties import UNCERTAINTIES

    for method in methods:
        option = BASELINE_UNCERTAINTIES.get(method)
        if option is not None and option not in UNCERTAINTIES:
            raise ValueError(
                f"--methods {method} needs PenalizedReward(uncertainty={option!r}), which this trl_bayes does not "
                f"have (it knows {list(UNCERTAINTIES)}): drop {method} from --methods, or install a trl_bayes with "
                "issue 16's typicality baselines."
            )


def ppo_config_kwargs(args, training_args, seed: int) -> dict[str, Any]:
    """The `PPOConfig` fields of one run (but `output_dir`) from the recipe's `ppo_*` arguments (`args`:
    `PPOScriptArguments`): plain values, so that a worker process builds the config itself."""
    return dict(
        use_cpu=training_args.use_cpu, ddp_backend=training_args.ddp_backend, bf16=args.ppo_bf16,
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
    penalty, uncertainty = reward_options(method, args)
    if uses_reference(method, args):
        extra += [uncertainty, args.num_reference_samples]
    # MAP and LA-type methods keep the keys they had before Ens-UWO existed (their caches stay valid).
    return {"world": world_settings(args), "method": [method, "uwo" if penalty == "uwo" else args.penalty, args.k],
            "seed": seed, "ppo": ppo, "extra": extra, "proxies": proxies, "gold": args.gold_reward}  # fmt: skip


def ppo_run_name(method: str, seed: int, kl_coef: float) -> str:
    """The folder of one run under `<cache>/ppo/`: runs with a KL penalty are named by it too, so that the KL study's
    runs of every β live side by side in one cache."""
    return f"{method}-seed{seed}" + (f"-kl{kl_coef:g}" if kl_coef else "")


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


@dataclass
class PPOJob:
    """One PPO run for a worker (plain, picklable values): its stage, the reward's proxies and options, the policy and
    the prompts. `gold` is a TRL reward function; `reference` the reference samples per prompt, or `None`."""

    stage_dir: Path
    name: str
    key: dict[str, Any]
    config_kwargs: dict[str, Any]
    proxy_dirs: list[Path]
    penalty: str
    k: float
    uncertainty: str
    batch_size: int
    reference: dict[str, list[str]] | None
    policy_path: str
    policy_lora_r: int
    train_prompts: list[str]
    eval_prompts: list[str]
    gold: Any


def ppo_job(
    args, training_args, method, seed, proxy_dirs, policy_path, prompts, gold, cache, reference=None
) -> PPOJob:
    """The job of `method`'s PPO run on `seed` (`prompts`: training and held-out ones). The PPO seed is the proxy seed
    plus the run's seed, the same for every method."""
    penalty, uncertainty = reward_options(method, args)
    key = ppo_key(args, method, seed, proxy_dirs)
    return PPOJob(cache / "ppo", ppo_run_name(method, seed, args.kl_coef), key,
                  ppo_config_kwargs(args, training_args, training_args.seed + seed), list(proxy_dirs), penalty, args.k,
                  uncertainty, args.ppo_batch_size, reference if uses_reference(method, args) else None, policy_path,
                  args.policy_lora_r, list(prompts[0]), list(prompts[1]), gold)  # fmt: skip


def run_ppo_job(job: PPOJob, state=None) -> None:
    """One PPO run, saved with its log history: alone (`state` None: a worker or a one-process run), or data-parallel
    over the processes of `state`. A run killed mid-way resumes from its last checkpoint."""
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from trl_bayes import BayesianRewardModel, PenalizedReward, PPOConfig, PPOTrainer
    from trl_bayes.distributed import whole_weights

    state = state or PartialState()
    stage = Stage(job.stage_dir, job.name, job.key)
    if state.is_main_process and not stage.partial:
        stage.start()  # a folder from other settings is cleared; one from these settings keeps its checkpoints
    state.wait_for_everyone()
    models = [BayesianRewardModel.from_pretrained(d, device=state.device) for d in job.proxy_dirs]
    reward = PenalizedReward(models, penalty=job.penalty, k=job.k, batch_size=job.batch_size,
                             uncertainty=job.uncertainty, reference=job.reference,
                             scale="absolute")  # one completion per prompt: no group spread to scale k by  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(job.policy_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with whole_weights():  # ZeRO-3 shards it in the trainer's `prepare`; the frozen reference copy stays whole
        policy = AutoModelForCausalLM.from_pretrained(job.policy_path)
    peft_config = None
    if job.policy_lora_r:
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=job.policy_lora_r, lora_alpha=2 * job.policy_lora_r)
    run_dir = stage.path / "run"
    trainer = PPOTrainer(
        policy, reward, PPOConfig(str(run_dir), **job.config_kwargs), Dataset.from_dict({"prompt": job.train_prompts}),
        tokenizer, peft_config=peft_config, eval_dataset=Dataset.from_dict({"prompt": job.eval_prompts}),
        gold_reward=job.gold,
    )  # fmt: skip
    history = trainer.train(resume_from_checkpoint=get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None)
    if state.is_main_process:
        (stage.path / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        stage.finish()
    state.wait_for_everyone()


def run_ppo_grid(
    args, training_args, members, policy_path, prompts, gold, cache, state, workers=None, reference=None
) -> dict[tuple[str, int], list[dict]]:
    """Every PPO run of `args.methods` x `args.seeds` (`members[seed, j]`: the proxies' folders), each cached: the runs
    not done yet are jobs dealt to `workers`. Returns each run's log history."""
    jobs = {}
    for method in args.methods:
        for seed in args.seeds:
            dirs = [members[seed, j] for j in range(args.ensemble_size if method in ENSEMBLE_METHODS else 1)]
            jobs[method, seed] = ppo_job(args, training_args, method, seed, dirs, policy_path, prompts, gold, cache,
                                         reference)  # fmt: skip
    todo = [job for job in jobs.values() if not Stage(job.stage_dir, job.name, job.key).done]
    run_jobs(run_ppo_job, todo, workers, state, desc="PPO runs")
    state.wait_for_everyone()
    return {run: json.loads((job.stage_dir / job.name / "log_history.json").read_text()) for run, job in jobs.items()}


def result_rows(method: str, seed: int, history: list[dict], args) -> list[dict[str, Any]]:
    rows = []
    for entry in history:
        if "eval/gold_reward" not in entry:
            continue
        # The proxy's MAP reward (unpenalized), comparable across methods; penalized methods also log their own.
        proxy = entry.get("eval/laplace/map_reward", entry["eval/reward"])
        rows.append({"method": method, "penalty": reward_options(method, args)[0],
                     "k": 0.0 if method == "MAP" else args.k, "seed": seed, "step": entry["step"],
                     "kl": entry["eval/kl"], "proxy_reward": proxy, "gold_reward": entry["eval/gold_reward"]})  # fmt: skip
    return rows


def describe_plan(args, training_args, model_args) -> list[str]:
    """What each stage will load or build, from the config alone (no download): the shared stages' lines (only the
    proxies the methods use), then the PPO runs."""
    policy_training = f"LoRA r={args.policy_lora_r}" if args.policy_lora_r else "full fine-tuning"
    return [
        *world_plan(args, training_args, model_args, policy_note=policy_training, members=args.members_used()),
        f"PPO: methods {[method_label(m, args) for m in args.methods]}, seeds {args.seeds}, {args.ppo_steps} steps x "
        f"{args.ppo_batch_size} completions (max_new_tokens={args.max_new_tokens}), kl_coef {args.kl_coef:g}",
    ]
