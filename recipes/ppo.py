"""RLHF with Bayesian reward models: PPO against a MAP proxy vs a Laplace-penalized one (Yang et al. 2024, Sec. 5.2).

The recipe, in stages (each cached under `<cache_dir>`, by default `<output_dir>/cache/`; the world, pairs and proxies
are the very stages of recipes/bon.py, so pointing `--cache_dir` at a Best-of-N run's cache reuses its proxies):

1. world: instructions, a tokenizer, and the SFT policy (offline default: `trl_bayes.experiments.world`, trained here);
2. preference pairs: two SFT samples per training instruction, labelled by the gold reward (with `label_noise`);
3. proxies: per seed, LoRA reward models (MAP) with their Laplace posteriors; member 0 is the seed's MAP / LA model;
4. PPO: for each method (MAP = the proxy's MAP reward; LA = its `penalty`-penalized Laplace reward with strength `k`;
   LA-rel = the same on the relative variance; LA-Ens = the penalized mean of the seed's `ensemble_size` Laplace
   members; Ens-UWO = the MAP ensemble's uncertainty-weighted objective; Prior-rel, Hidden-Euc, Hidden-Maha = the
   typicality baselines of issue 16, `trl_bayes.experiments.ppo_study.METHODS`) and each seed, `trl_bayes.PPOTrainer`
   from the SFT policy, same PPO seed and budget for every method, no KL penalty by default (the paper's setting;
   `--kl_coef`, and scripts/study_kl.py for the gold-vs-KL frontier); the gold reward on the held-out prompts every
   `ppo_eval_steps`. Each run is a job for the worker processes (`--num_workers`) and checkpoints, so a killed run
   resumes;
5. results: `ppo_results.csv` (method, penalty, k, seed, step, kl, proxy_reward, gold_reward), `ppo_curves.png`
   (proxy and gold vs step and vs KL) and `summary.md` (final and best gold per method, time per stage and per step).

    accelerate launch recipes/ppo.py                                      # offline default: under 10 min on 2 CPUs
    accelerate launch recipes/ppo.py --methods MAP LA                     # without the ensemble (~4 minutes)
    accelerate launch recipes/ppo.py --methods MAP LA-rel Ens-UWO --kl_coef 0.05   # other rewards, a KL penalty
    accelerate launch recipes/ppo.py --seeds 0 1 2 3 4 --output_dir outputs/ppo5
    accelerate launch recipes/ppo.py --cache_dir outputs/bon/cache         # reuse the Best-of-N recipe's proxies
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --use_cpu true        # two CPU processes
    accelerate launch recipes/ppo.py --config recipes/configs/ppo_pythia_alpacafarm.yaml  # paper scale, GPUs + Hub
    python recipes/ppo.py --config recipes/configs/ppo_pythia_alpacafarm.yaml --dry_run true  # print the plan only

Defaults, each in one place: `PPOScriptArguments` (below) and `WorldArguments` for the script's fields,
`PROXY_DEFAULTS` (`trl_bayes.experiments.proxies`) for the proxies' training and LoRA. A `--config` YAML replaces
defaults and flags replace both; `main()` from Python runs the bare command line's run. `k` (one strength for every
penalized method) is fixed before any result is seen. The proxy reward in the results is the proxy's MAP reward (the
unpenalized mean, comparable across methods); the reward PPO optimizes is the method's (penalized) one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from trl_bayes.distributed import shutdown
from trl_bayes.experiments.gold import load_gold_reward
from trl_bayes.experiments.launch import check_output_dir, fill_defaults, make_accelerator, recipe_parser
from trl_bayes.experiments.ppo_study import (
    CSV_COLUMNS,
    ENSEMBLE_METHODS,
    METHODS,
    check_baselines_available,
    describe_plan,
    result_rows,
    run_ppo_grid,
    sample_reference,
    uses_reference,
)
from trl_bayes.experiments.proxies import normalize_lora_targets, train_proxies
from trl_bayes.experiments.report import sources, write_csv, write_run_record
from trl_bayes.experiments.rl_report import aggregate, plot_curves, step_times, write_ppo_summary
from trl_bayes.experiments.stages import StageClock, WorldArguments, build_world, sample_pairs
from trl_bayes.experiments.workers import Workers, resolve_num_workers


@dataclass
class PPOScriptArguments(WorldArguments):
    """Arguments of the PPO recipe: the world's (`WorldArguments`, `trl_bayes.experiments.stages`) and the ones below,
    beside the proxies' training (`BayesianRewardConfig`) and model/LoRA (`trl.ModelConfig`) arguments. The PPO settings
    carry a `ppo_` prefix where `BayesianRewardConfig` (the proxies' trainer) has a field of the same name. The
    defaults are the default run's.

    Parameters that control the comparison:
        methods, penalty, k: `trl_bayes.experiments.ppo_study.METHODS` (MAP, LA, LA-rel, LA-Ens, Ens-UWO and the
            typicality baselines Prior-rel, Hidden-Euc, Hidden-Maha); every penalized method uses `penalty` (Ens-UWO:
            `uwo`) with the one strength `k` (this recipe's `--k`, default 1), fixed before the run.
        uncertainty, num_reference_samples: the variance LA / LA-Ens penalize: `marginal` (J Σ J^T, the paper's) or
            `relative` (Var(r - mean of the prompt's reference completions): PPO scores one completion per prompt, so
            the group is `num_reference_samples` samples of the SFT (reference) policy per prompt, drawn once and
            cached; their mean reward gradients are computed once per prompt). LA-rel and the baselines always center
            on these reference samples.
        cache_dir: where the cached stages live (default `<output_dir>/cache`).

    Parameters that control PPO (see `trl_bayes.PPOConfig`):
        ppo_steps, ppo_batch_size (completions per step and process), ppo_mini_batches, ppo_epochs,
        ppo_learning_rate, kl_coef, kl_estimator, vf_coef, ppo_temperature, missing_eos_penalty, policy_lora_r
        (0 = full fine-tuning), ppo_eval_steps, num_eval_generations, ppo_save_steps.
    """

    methods: list[str] = field(
        default_factory=lambda: ["MAP", "LA", "LA-Ens"], metadata={"help": f"Subset of {METHODS}."}
    )
    penalty: str = field(default="std", metadata={"help": "LA / LA-Ens penalty: std or var."})
    k: float = field(default=1.0, metadata={"help": "Penalty strength, fixed before the run."})
    uncertainty: str = field(default="marginal", metadata={"help": "LA / LA-Ens variance: marginal or relative."})
    num_reference_samples: int = field(
        default=8, metadata={"help": "relative: reference-policy samples per prompt that the reward is centered on."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cached stages (default <output_dir>/cache)."})
    # PPO
    ppo_steps: int = field(default=40, metadata={"help": "PPO steps per run."})
    ppo_batch_size: int = field(default=64, metadata={"help": "Completions per step and process."})
    ppo_micro_batch_size: int = field(default=32, metadata={"help": "Completions per forward/backward pass."})
    ppo_mini_batches: int = field(default=2, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs per step."})
    ppo_learning_rate: float = field(default=5e-5, metadata={"help": "Policy and value learning rate."})
    kl_coef: float = field(default=0.0, metadata={"help": "Per-token KL coefficient (the paper: no KL penalty)."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 or k3."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    ppo_temperature: float = field(default=1.0, metadata={"help": "PPO sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Score penalty without EOS."})
    policy_lora_r: int = field(default=0, metadata={"help": "LoRA rank of the policy (0 = full fine-tuning)."})
    ppo_eval_steps: int = field(default=4, metadata={"help": "Gold evaluation every N PPO steps."})
    num_eval_generations: int = field(default=2, metadata={"help": "Completions per held-out prompt at evaluation."})
    ppo_save_steps: int = field(default=10, metadata={"help": "PPO checkpoint every N steps (resume)."})
    ppo_bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision for PPO (GPU)."})
    num_threads: int | None = field(
        default=1, metadata={"help": "torch CPU threads per process (tiny models: 1; None = torch's default)."}
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Check the config, write config.json, print the plan, and stop."}
    )

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: unknown {unknown}; choose from {list(METHODS)}.")
        if self.penalty not in ("std", "var"):
            raise ValueError(f"--penalty {self.penalty!r}: choose 'std' or 'var'.")
        if self.k < 0:
            raise ValueError(f"--k {self.k}: must be >= 0.")
        if self.uncertainty not in ("marginal", "relative"):
            raise ValueError(f"--uncertainty {self.uncertainty!r}: choose 'marginal' or 'relative'.")
        if any(uses_reference(m, self) for m in self.methods) and self.num_reference_samples < 1:
            raise ValueError("--num_reference_samples must be >= 1 with --uncertainty relative, LA-rel or a baseline.")
        for method in [m for m in self.methods if m in ENSEMBLE_METHODS]:
            if self.ensemble_size < 2:
                raise ValueError(
                    f"--ensemble_size {self.ensemble_size}: {method} needs >= 2 members; raise it or drop {method}."
                )
        check_baselines_available(self.methods)
        if self.ppo_steps < 1 or self.ppo_eval_steps < 1 or self.ppo_save_steps < 1:
            raise ValueError("--ppo_steps, --ppo_eval_steps and --ppo_save_steps must be >= 1.")
        per_minibatch = self.ppo_micro_batch_size * self.ppo_mini_batches
        if self.ppo_batch_size % per_minibatch:
            raise ValueError(
                f"--ppo_batch_size {self.ppo_batch_size} must be a multiple of --ppo_micro_batch_size x "
                f"--ppo_mini_batches = {per_minibatch}."
            )

    def members_used(self) -> int:
        """Proxies per seed the methods need (member 0 for most; the ensemble for LA-Ens and Ens-UWO)."""
        return self.ensemble_size if set(self.methods) & set(ENSEMBLE_METHODS) else 1


def main(script_args: PPOScriptArguments | None = None, training_args=None, model_args=None) -> None:
    """The PPO study; an argument left `None` takes the recipe's default (that of a bare command line)."""
    import datasets
    import torch
    import transformers

    args, training_args, model_args = fill_defaults(make_parser, script_args, training_args, model_args)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    plan = describe_plan(args, training_args, model_args)
    output_dir = check_output_dir(training_args.output_dir)
    missing = args.missing_local_paths()
    if args.dry_run:
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print("\n".join(["PPO plan:", *plan, *(f"not found here: {m}" for m in missing)]))
        return
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)} (cwd: {Path.cwd()}).")
    if args.num_threads:
        # Tiny models on a shared CPU: one thread per process avoids oversubscription (a step ran 10-40x slower).
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    clock = StageClock()

    # 1. world, 2. preference pairs
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "cache"
    gold = load_gold_reward(args, accelerator.device)
    train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
    clock.lap("world + SFT policy")
    train_pairs, _ = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    # 3. proxies: only the members the methods use (the Best-of-N recipe's cache may already hold more)
    proxy_args = replace(args, ensemble_size=args.members_used(), methods=["MAP"])
    # One job per proxy, then one per PPO run, dealt to worker processes (the results do not depend on their number).
    with Workers(resolve_num_workers(args.num_workers, state.num_processes)) as workers:
        members = train_proxies(proxy_args, training_args, model_args, train_pairs, policy_path, cache, state, workers)
        clock.lap("proxies (MAP + Laplace fit)")
        reference = None
        if any(uses_reference(m, args) for m in args.methods):
            reference = sample_reference(args, train_prompts + eval_prompts, policy_path, cache, accelerator)
            clock.lap("reference samples")
        # 4. PPO, one run per method and seed
        histories = run_ppo_grid(args, training_args, members, policy_path, (train_prompts, eval_prompts), gold,
                                 cache, state, workers, reference)  # fmt: skip
        clock.lap("PPO runs")
    # 5. results
    if state.is_main_process:
        rows = [r for (method, seed), h in histories.items() for r in result_rows(method, seed, h, args)]
        write_csv(output_dir / "ppo_results.csv", rows, CSV_COLUMNS)
        plot_curves(output_dir / "ppo_curves.png", rows, args)
        clock.lap("results")
        seconds = clock.finish()
        policy_training = f"LoRA r={args.policy_lora_r}" if args.policy_lora_r else "full fine-tuning"
        found = {
            **sources(args, training_args, model_args),
            "policy_training": policy_training,
            "seed": training_args.seed,
        }
        write_ppo_summary(output_dir / "summary.md", args, aggregate(rows, args), step_times(histories, args), seconds,
                          found)  # fmt: skip
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print((output_dir / "summary.md").read_text())
        print(f"Results in {output_dir}: ppo_results.csv, ppo_curves.png, summary.md.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(PPOScriptArguments, "outputs/ppo")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    shutdown()
