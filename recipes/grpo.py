"""The drop-in for existing TRL setups: TRL's own `GRPOTrainer` (or `RLOOTrainer`) with
`reward_funcs=[PenalizedReward(...)]`, MAP vs Laplace-penalized proxies on the offline world.

The recipe, in stages (the world, pairs and proxies are the cached stages of recipes/bon.py and recipes/ppo.py):

1. world, 2. preference pairs, 3. proxies (`trl_bayes.experiments.stages`, `trl_bayes.experiments.proxies`);
4. GRPO: for each method (MAP: `PenalizedReward(model, penalty="none")`; LA: `penalty` with strength `k`) and each
   seed, TRL's trainer from the SFT policy, the same seed and budget per method, no KL penalty (beta 0, the paper's
   setting). A `TrainerCallback` samples the held-out prompts every `grpo_eval_steps` steps and scores them with the
   gold reward and the proxy, and measures the KL to the SFT policy on them;
5. results: `grpo_results.csv` (method, penalty, k, seed, step, kl, proxy_reward, gold_reward), `grpo_curves.png`,
   `summary.md`.

    accelerate launch recipes/grpo.py                                     # offline default: a few minutes on 2 CPUs
    accelerate launch recipes/grpo.py --trainer rloo --output_dir outputs/rloo   # the same with TRL's RLOOTrainer
    accelerate launch recipes/grpo.py --cache_dir outputs/ppo/cache       # reuse the PPO / Best-of-N recipes' proxies

Defaults, each in one place: `GRPOScriptArguments` (below) and `WorldArguments` for the script's fields,
`PROXY_DEFAULTS` (`trl_bayes.experiments.proxies`) for the proxies' training and LoRA; `main()` from Python runs the
bare command line's run. In your own TRL script the drop-in is two lines:

    reward = PenalizedReward(BayesianRewardModel.from_pretrained("my-laplace-rm"))  # or uncertainty="relative", ...
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=prompts)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from trl_bayes.distributed import shutdown
from trl_bayes.experiments.gold import load_gold_reward
from trl_bayes.experiments.grpo_study import CSV_COLUMNS, METHODS, mean_step_seconds, result_rows, run_grpo
from trl_bayes.experiments.launch import check_output_dir, fill_defaults, make_accelerator, recipe_parser
from trl_bayes.experiments.proxies import normalize_lora_targets, train_proxies
from trl_bayes.experiments.report import write_csv, write_run_record
from trl_bayes.experiments.rl_report import aggregate, method_label, plot_curves, write_grpo_summary
from trl_bayes.experiments.stages import StageClock, WorldArguments, build_world, sample_pairs
from trl_bayes.experiments.workers import Workers, resolve_num_workers


@dataclass
class GRPOScriptArguments(WorldArguments):
    """Arguments of the GRPO recipe: the world's (`WorldArguments`), the ones below (`grpo_` where TRL's `GRPOConfig`
    would clash with the proxies' `BayesianRewardConfig`), the proxies' training and `trl.ModelConfig` arguments. The
    defaults are the default run's: two seeds, one proxy each (member 0 of the other recipes' ensembles).

    Parameters:
        trainer: `grpo` (TRL's GRPOTrainer) or `rloo` (TRL's RLOOTrainer).
        methods, penalty, k: MAP and LA (`penalty` with strength `k`, fixed before the run).
        uncertainty: the variance LA penalizes: `marginal` (J Σ J^T) or `relative` (Var(r_i - mean_j r_j) over the
            `num_generations` completions of the prompt, which TRL scores together).
        grpo_steps, grpo_prompts_per_step, num_generations, grpo_learning_rate, beta (KL coefficient; 0 = none, the
        paper's setting), grpo_temperature, grpo_eval_steps, num_eval_generations, cache_dir, num_threads.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Independent repetitions."})
    ensemble_size: int = field(default=1, metadata={"help": "Proxies per seed (GRPO uses member 0)."})
    trainer: str = field(default="grpo", metadata={"help": "grpo or rloo."})
    methods: list[str] = field(default_factory=lambda: ["MAP", "LA"], metadata={"help": f"Subset of {METHODS}."})
    penalty: str = field(default="std", metadata={"help": "LA penalty: std or var."})
    k: float = field(default=1.0, metadata={"help": "Penalty strength, fixed before the run."})
    uncertainty: str = field(default="marginal", metadata={"help": "LA variance: marginal or relative."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cached stages (default <output_dir>/cache)."})
    grpo_steps: int = field(default=30, metadata={"help": "Optimizer steps per run."})
    grpo_prompts_per_step: int = field(default=8, metadata={"help": "Prompts per step (per process)."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group)."})
    grpo_learning_rate: float = field(
        default=4e-4, metadata={"help": "Policy learning rate (one optimizer step per step; PPO takes 8 at 5e-5)."}
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (0 = no KL penalty, no reference model)."})
    grpo_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    grpo_eval_steps: int = field(default=5, metadata={"help": "Gold evaluation every N steps."})
    num_eval_generations: int = field(default=2, metadata={"help": "Completions per held-out prompt at evaluation."})
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
        if self.trainer not in ("grpo", "rloo"):
            raise ValueError(f"--trainer {self.trainer!r}: choose 'grpo' or 'rloo'.")
        if self.penalty not in ("std", "var") or self.k < 0:
            raise ValueError(f"--penalty {self.penalty!r} / --k {self.k}: penalty 'std' or 'var', k >= 0.")
        if self.uncertainty not in ("marginal", "relative"):
            raise ValueError(f"--uncertainty {self.uncertainty!r}: choose 'marginal' or 'relative'.")
        if self.num_generations < 2:
            raise ValueError(f"--num_generations {self.num_generations}: a group needs >= 2 completions.")
        if self.grpo_steps < 1 or self.grpo_eval_steps < 1:
            raise ValueError("--grpo_steps and --grpo_eval_steps must be >= 1.")


def main(script_args: GRPOScriptArguments | None = None, training_args=None, model_args=None) -> None:
    """The GRPO (or RLOO) study; an argument left `None` takes the recipe's default (that of a bare command line)."""
    import datasets
    import torch
    import transformers

    args, training_args, model_args = fill_defaults(make_parser, script_args, training_args, model_args)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    output_dir = check_output_dir(training_args.output_dir)
    if args.dry_run:
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print(f"{args.trainer.upper()} plan: methods {args.methods}, seeds {args.seeds}, {args.grpo_steps} steps")
        return
    if not args.offline:
        raise ValueError("recipes/grpo.py runs on the offline world only; use recipes/ppo.py for a Hub policy.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)  # tiny models on a shared CPU: avoid oversubscription
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    clock = StageClock()

    # 1. world, 2. preference pairs, 3. proxies (member 0 of each seed)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "cache"
    gold = load_gold_reward(args, accelerator.device)
    train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
    clock.lap("world + SFT policy")
    train_pairs, _ = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    with Workers(resolve_num_workers(args.num_workers, state.num_processes)) as workers:  # one job per proxy
        members = train_proxies(replace(args, ensemble_size=1), training_args, model_args, train_pairs, policy_path,
                                cache, state, workers)  # fmt: skip
    clock.lap("proxies (MAP + Laplace fit)")
    # 4. GRPO, one run per method and seed
    results = {}
    for method in args.methods:
        for seed in args.seeds:
            state.print(f"[{args.trainer}] {method_label(method, args)}, seed {seed}")
            results[method, seed] = run_grpo(args, training_args, method, seed, members[seed, 0], policy_path,
                                             (train_prompts, eval_prompts), gold, cache, state)  # fmt: skip
            clock.lap(f"{args.trainer.upper()} {method_label(method, args)}")
    # 5. results
    if state.is_main_process:
        rows = result_rows(results, args)
        write_csv(output_dir / f"{args.trainer}_results.csv", rows, CSV_COLUMNS)
        plot_curves(output_dir / f"{args.trainer}_curves.png", rows, args)
        table = aggregate(rows, args)
        clock.lap("results")
        seconds = {**clock.finish(), **mean_step_seconds(results, args)}
        write_grpo_summary(output_dir / "summary.md", args, table, seconds)
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print((output_dir / "summary.md").read_text())
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(GRPOScriptArguments, "outputs/grpo")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    shutdown()
