"""Active reward learning: which preference pairs to label, chosen with the Laplace posterior (issue 18).

Labels are the expensive part of RLHF. Starting from a few gold-labelled pairs, each round selects more pairs from a
pool of candidates (`trl_bayes.active.select_pairs`), asks the labeller (the gold reward, with the Best-of-N world's
label noise), trains the MAP reward model on all labels so far and refits its Laplace posterior. Strategies: `random`
(passive labelling), `variance` (largest Var(r(a) - r(b))), `bald` (mutual information of the label and the weights)
and `thompson` (double Thompson sampling over a prompt's candidates).

1. world, preference pairs, Best-of-N samples and their gold: the Best-of-N recipe's cached stages;
2. pool: `pool_candidates` samples of the policy per training prompt, gold-scored (ties make no pair);
3. rounds: per seed a first model on `initial_pairs` pairs of the pairs stage, then per (strategy, seed) `num_rounds`
   rounds of `pairs_per_round` labels; each round's labels, model and metrics are a cached stage (a killed run
   resumes);
4. report: held-out pair accuracy and Bradley-Terry NLL, Best-of-n gold (MAP and LA-rel) after each round in
   `active_results.csv` and `active_curves.png`; `summary.md` with the labels saved to reach random's final accuracy,
   what was selected (distinct prompts, near-duplicates) and the cost per round.

The (strategy, seed) chains are independent jobs, dealt to one worker process per usable core (`--num_workers`).

    python recipes/active.py                                              # offline default (2 CPU cores)
    python recipes/active.py --cache_dir outputs/bon/cache                # reuse a Best-of-N run's stages
    python recipes/active.py --warm_start true --output_dir outputs/active-warm   # rounds start from the last adapter
    accelerate launch recipes/active.py --config recipes/configs/active_pythia_alpacafarm.yaml   # GPUs + Hub
    python recipes/active.py --config recipes/configs/active_pythia_alpacafarm.yaml --dry_run true  # the plan

Defaults, each in one place: `ActiveScriptArguments` (`trl_bayes.experiments.active_study`) and `WorldArguments`,
`PROXY_DEFAULTS` for the reward models' training and LoRA, `BayesianRewardConfig` for the posterior.
"""

from __future__ import annotations

from pathlib import Path

from trl_bayes.distributed import shutdown
from trl_bayes.experiments.active_study import (
    ActiveScriptArguments,
    bon_inputs,
    build_pool,
    csv_columns,
    plot_active_curves,
    run_study,
    write_active_summary,
)
from trl_bayes.experiments.best_of_n_study import sample_best_of_n, samples_gold
from trl_bayes.experiments.gold import load_gold_reward
from trl_bayes.experiments.launch import check_output_dir, fill_defaults, make_accelerator, recipe_parser
from trl_bayes.experiments.proxies import normalize_lora_targets
from trl_bayes.experiments.report import sources, write_csv, write_run_record
from trl_bayes.experiments.stages import StageClock, build_world, sample_pairs, validation_prompts, world_plan
from trl_bayes.experiments.workers import Workers, resolve_num_workers


def describe_plan(args, training_args, model_args) -> list[str]:
    """What each stage will load or build, from the config alone (no download): the shared stages' lines (no proxies:
    the rounds train their own reward models), then the pool, the labels and the evaluation."""
    rounds = f"{args.initial_pairs} + {args.num_rounds} x {args.pairs_per_round}"
    return [
        *world_plan(args, training_args, model_args, proxies=False),
        f"pool: {args.pool_candidates} candidates per training prompt, labelled by the gold reward when selected "
        f"({args.label_noise:.0%} flipped)",
        f"labels: {rounds} pairs; strategies {args.strategies}; seeds {args.seeds}",
        f"reward models: {model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r}, "
        f"{training_args.hessian_structure} Laplace, {'warm start' if args.warm_start else 'from scratch'} per round",
        f"evaluation: {args.num_eval_pairs} held-out pairs; Best-of-n {args.ns} on {args.num_bon_prompts} prompts x "
        f"{args.num_samples} samples (MAP, LA-rel k={args.la_rel_k})",
    ]


def main(script_args: ActiveScriptArguments | None = None, training_args=None, model_args=None) -> None:
    """The active-learning study; an argument left `None` takes the recipe's default (the bare command line's)."""
    import datasets
    import transformers

    args, training_args, model_args = fill_defaults(make_parser, script_args, training_args, model_args)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    output_dir = check_output_dir(training_args.output_dir)
    missing = args.missing_local_paths()
    if args.dry_run:
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        plan = describe_plan(args, training_args, model_args)
        print("\n".join(["Active learning plan:", *plan, *(f"not found here: {m}" for m in missing)]))
        return
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)} (cwd: {Path.cwd()}).")
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    num_workers = resolve_num_workers(args.num_workers, state.num_processes)
    clock = StageClock()
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "cache"
    with Workers(num_workers).start() as workers:
        # 1. the Best-of-N recipe's stages: world, pairs, samples (all held-out prompts: the stage is shared), gold
        gold = load_gold_reward(args, accelerator.device)
        train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
        train_pairs, held_out = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
        held_prompts = eval_prompts + validation_prompts(args, cache)
        completions = sample_best_of_n(args, held_prompts, policy_path, cache, accelerator, workers)
        gold_scores = samples_gold(args, held_prompts, completions, gold, cache, state)
        clock.lap("world, pairs, Best-of-N samples + gold")
        # 2. the pool of candidates
        pool = build_pool(args, train_prompts, policy_path, gold, cache, accelerator)
        clock.lap("pool")
        # 3. rounds (one process: the jobs go to the workers; other launched processes wait)
        records = None
        if state.is_main_process:
            first = slice(0, args.num_bon_prompts)
            bon = bon_inputs(eval_prompts[first], completions[first], gold_scores[first])
            records = run_study(args, training_args, model_args, pool, train_pairs, held_out, bon, policy_path,
                                cache, workers)  # fmt: skip
        clock.lap("rounds (select, train + fit, evaluate)")
    if state.is_main_process:
        # 4. report
        write_csv(output_dir / "active_results.csv", records, csv_columns(args))
        plot_active_curves(output_dir / "active_curves.png", records, args)
        cached = {path.parent.name: float(path.read_text()) for path in sorted(cache.glob("*/seconds.json"))}
        cached.update(
            {f"scores/{p.parent.name}": float(p.read_text()) for p in cache.glob("scores/gold/seconds.json")}
        )
        write_active_summary(output_dir / "summary.md", records, args, clock.finish(), cached,
                             sources(args, training_args, model_args))  # fmt: skip
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print((output_dir / "summary.md").read_text())
        print(f"Results in {output_dir}: active_results.csv, active_curves.png, summary.md.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(ActiveScriptArguments, "outputs/active")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    shutdown()
