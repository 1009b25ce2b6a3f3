"""Best-of-N with Bayesian reward models: the paper's BoN experiment (Yang et al. 2024, Fig. 2), end to end.

The recipe, in stages (each cached under `<output_dir>/cache/`, so a run killed mid-way resumes where it stopped):

1. world: instructions, a tokenizer, and the SFT policy (offline default: `trl_bayes.experiments.world`, trained here);
2. preference pairs: two samples of the SFT policy per training instruction, labelled by the gold reward (with
   `label_noise`), plus noiseless held-out pairs for the diagnostics;
3. proxies: for each seed, an ensemble of `ensemble_size` LoRA reward models (MAP, TRL's `RewardTrainer`) each with
   its Laplace posterior (`BayesianRewardTrainer`); member 0 of each seed is that seed's MAP / LA model;
4. samples: `num_samples` (N) completions per held-out prompt (P), drawn once (`BestOfNSampler`);
5. scores: the gold reward and every proxy's (mean, var) on every sample, once;
6. curves: the unbiased Best-of-n estimator gives proxy and gold reward vs KL_bon = log n - (n-1)/n for each method
   (MAP, LA, LA-rel, Ens, Ens-WCO, Ens-UWO, LA-Ens, LA-Ens-rel, and issue 16's typicality baselines Prior-rel,
   Hidden-Euc, Hidden-Maha, SFT-NLL; std and var penalties, a few k), written to `bon_results.csv` and
   `bon_curves.png`; each seed's k chosen on the validation prompts (`k_selection.csv`), the grid extended where the
   pick is an edge of it (`bon_results_extended.csv`), and how much the proxy still moves each ranking
   (`ranking_correlations.csv`);
7. diagnostics: does the uncertainty flag the proxy's errors (`bon_diagnostics.png`, CSV files), and `summary.md`.

Stages 3 to 5 are independent jobs (each proxy, each block of samples, each proxy's scores): on a machine without CUDA
they are dealt to one worker process per usable core (`--num_workers`, 1 torch thread each), with the same results as
one process (`trl_bayes.experiments.workers`).

    accelerate launch recipes/bon.py                                     # offline default (`make bon`)
    accelerate launch recipes/bon.py --seeds 0 1 2 3 4 --output_dir outputs/bon5
    python recipes/bon.py --num_eval_prompts 8 --num_samples 64 --output_dir /tmp/bon   # a quick look
    accelerate launch recipes/bon.py --num_workers 1                    # every job in this one process
    accelerate launch --multi_gpu --num_processes 2 recipes/bon.py --use_cpu true       # two CPU processes, DDP
    accelerate launch recipes/bon.py --config recipes/configs/bon_minilm.yaml           # a pretrained proxy backbone
    accelerate launch recipes/bon.py --config recipes/configs/bon_pythia_alpacafarm.yaml  # paper scale, GPUs + Hub
    python recipes/bon.py --config recipes/configs/bon_pythia_alpacafarm.yaml --dry_run true  # print the plan only

Defaults, each in one place: `BoNScriptArguments` (below) and `WorldArguments` for the script's fields,
`PROXY_DEFAULTS` (`trl_bayes.experiments.proxies`) for the proxies' training, LoRA and K-FAC, `BayesianRewardConfig`
for the rest of the posterior. A `--config` YAML replaces defaults and flags replace both; `main()` from Python runs
the bare command line's run. The k values of the penalties are fixed before any result is seen; the recipe reports every k, and each seed's
choice of k made on the validation prompts (`num_validation_prompts`, never reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from trl_bayes.distributed import shutdown
from trl_bayes.experiments.best_of_n_report import (
    aggregate,
    cached_seconds,
    plot_curves,
    write_diagnostics,
    write_summary,
)
from trl_bayes.experiments.best_of_n_study import (
    CSV_COLUMNS,
    ENSEMBLE_METHODS,
    LAPLACE_PENALTIES,
    METHODS,
    SELECTED_METHODS,
    compute_curves,
    describe_plan,
    extend_grids,
    ranking_correlations,
    sample_best_of_n,
    score_samples,
)
from trl_bayes.experiments.gold import load_gold_reward
from trl_bayes.experiments.launch import check_output_dir, fill_defaults, make_accelerator, recipe_parser
from trl_bayes.experiments.proxies import normalize_lora_targets, train_proxies
from trl_bayes.experiments.report import sources, write_csv, write_run_record
from trl_bayes.experiments.stages import StageClock, WorldArguments, build_world, sample_pairs, validation_prompts
from trl_bayes.experiments.workers import Workers, resolve_num_workers


@dataclass
class BoNScriptArguments(WorldArguments):
    """Arguments of the Best-of-N recipe: the world's (`WorldArguments`, `trl_bayes.experiments.stages`) and the ones
    below, beside the proxy's training (`BayesianRewardConfig`) and model/LoRA (`trl.ModelConfig`) arguments. The
    defaults are the default run's (`make bon`).

    Parameters that control Best-of-N:
        num_eval_prompts (P), num_samples (N), ns, max_new_tokens, temperature, top_k, top_p.
        methods, penalties, ks, uwo_ks, plot_k: what the curves cover; penalty_scales: units of k, `absolute`
            (k * std, the paper's) and/or `prompt` (k * sd_p(r) * std / mean_p(std) within each prompt's N samples,
            `prompt_scale`; its curves are named `std-prompt` / `var-prompt`); `plot_k` is the k drawn in
            `bon_curves.png` (every k goes to the CSV and the summary). `LA-rel` / `LA-Ens-rel` penalize the relative
            variance Var(r_i - mean_j r_j) over the prompt's N candidates instead of the marginal one. The default
            methods include issue 16's typicality baselines (Prior-rel, Hidden-Euc, Hidden-Maha, SFT-NLL), so that
            every result stands beside them; left out of `methods`, they cost nothing and change no other number.
        num_validation_prompts (in `WorldArguments`): held-out prompts, never reported, on which each seed chooses
            its k from `ks` for LA, LA-rel, LA-Ens, LA-Ens-rel and the typicality baselines (the best gold at the
            largest n; a pick at the grid's largest or smallest nonzero k extends the grid, x2 or /2, at most 4
            times); those rows are marked "k chosen on validation" in the summary.
    """

    # Best-of-N
    num_samples: int = field(default=512, metadata={"help": "N: completions per held-out prompt."})
    ns: list[int] | None = field(default=None, metadata={"help": "n values; unset = 1, 2, 4, ... <= N."})
    prompt_batch_size: int = field(default=8, metadata={"help": "Prompts per sampling chunk."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Sequences per generate call (None = prompt_batch_size x N); lower for big N."}
    )
    sample_block_prompts: int = field(default=16, metadata={"help": "Prompts per cached block of samples."})
    sampling_seed: int = field(default=1234, metadata={"help": "Seed of the Best-of-N samples."})
    score_batch_size: int = field(default=64, metadata={"help": "Responses per proxy forward pass."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Subset of {METHODS}."})
    penalties: list[str] = field(default_factory=lambda: list(LAPLACE_PENALTIES), metadata={"help": "std, var."})
    penalty_scales: list[str] = field(
        default_factory=lambda: ["absolute"], metadata={"help": "Units of k: absolute (k * std) and/or prompt."}
    )
    ks: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0], metadata={"help": "LA / LA-Ens strengths, fixed before the run."}
    )
    uwo_ks: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "Ens-UWO strengths."})
    plot_k: float = field(default=1.0, metadata={"help": "The k drawn in bon_curves.png."})
    dry_run: bool = field(
        default=False, metadata={"help": "Check the config, write config.json, print the plan, and stop."}
    )

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: unknown {unknown}; choose from {list(METHODS)}.")
        unknown = sorted(set(self.penalties) - set(LAPLACE_PENALTIES))
        if unknown or not self.penalties:
            raise ValueError(
                f"--penalties {self.penalties}: unknown {unknown}; choose from {list(LAPLACE_PENALTIES)}."
            )
        if not self.penalty_scales or set(self.penalty_scales) - {"absolute", "prompt"}:
            raise ValueError(f"--penalty_scales {self.penalty_scales}: choose from ['absolute', 'prompt'].")
        if any(k < 0 for k in [*self.ks, *self.uwo_ks]) or not self.ks:
            raise ValueError(
                f"--ks {self.ks} / --uwo_ks {self.uwo_ks}: penalty strengths must be >= 0 (ks non-empty)."
            )
        if self.num_samples < 1:
            raise ValueError("--num_samples must be >= 1.")
        if self.ns is None:
            self.ns = [2**i for i in range(int(math.log2(self.num_samples)) + 1)]
        bad = [n for n in self.ns if not 1 <= n <= self.num_samples]
        if bad:
            raise ValueError(
                f"--ns {self.ns}: n = {bad} outside [1, num_samples={self.num_samples}]; Best-of-n needs n <= N "
                "samples per prompt. Raise --num_samples or drop those n."
            )
        self.ns = sorted(set(self.ns))
        if set(self.methods) & set(ENSEMBLE_METHODS) and self.ensemble_size < 2:
            raise ValueError(
                f"--ensemble_size {self.ensemble_size}: the ensemble methods {sorted(ENSEMBLE_METHODS)} need >= 2 "
                "members; raise it or drop them from --methods."
            )
        if self.score_batch_size < 1:
            raise ValueError(f"--score_batch_size {self.score_batch_size}: must be >= 1.")
        if self.plot_k not in self.ks:
            raise ValueError(f"--plot_k {self.plot_k} is not one of --ks {self.ks}.")


# ---------------------------------------------------------------------------------------------------------------------


def main(script_args: BoNScriptArguments | None = None, training_args=None, model_args=None) -> None:
    """The Best-of-N study; an argument left `None` takes the recipe's default (that of a bare command line)."""
    import datasets
    import transformers

    args, training_args, model_args = fill_defaults(make_parser, script_args, training_args, model_args)
    # One progress bar per stage is what a user wants to see, not a load report for each of a dozen proxies.
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    plan = describe_plan(args, training_args, model_args)
    output_dir = check_output_dir(training_args.output_dir)
    missing = args.missing_local_paths()
    if args.dry_run:
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print("\n".join(["Best-of-N plan:", *plan, *(f"not found here: {m}" for m in missing)]))
        return
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)} (cwd: {Path.cwd()}).")
    # CPU processes talk over gloo; `cpu=use_cpu` keeps a CPU-only launch of several processes a real process group.
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    num_workers = resolve_num_workers(args.num_workers, state.num_processes)
    state.print(f"[jobs] proxies, sample blocks and scores on {num_workers} worker process(es)")
    clock = StageClock()

    # Stages 3 to 5 are independent jobs (one per proxy, block of samples, proxy's scores) dealt to worker processes,
    # started now: they import their libraries while this process builds the world.
    with Workers(num_workers).start() as workers:
        # 1. world (the gold first: a bad gold fails before any long work)
        cache = output_dir / "cache"
        gold = load_gold_reward(args, accelerator.device)
        train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
        # Validation prompts are sampled and scored with the reported ones, but only choose k: rows [P:] of the arrays.
        held_prompts = eval_prompts + validation_prompts(args, cache)
        reported, validation = slice(0, len(eval_prompts)), slice(len(eval_prompts), None)
        clock.lap("world + SFT policy")
        # 2. preference pairs
        train_pairs, held_out = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
        clock.lap("preference pairs")
        # 3. proxies
        members = train_proxies(args, training_args, model_args, train_pairs, policy_path, cache, state, workers)
        clock.lap("proxies (MAP + Laplace fit)")
        # 4. samples
        completions = sample_best_of_n(args, held_prompts, policy_path, cache, accelerator, workers)
        clock.lap("Best-of-N samples")
        # 5. scores
        gold_scores, proxies = score_samples(args, held_prompts, completions, held_out, members, gold, cache, state,
                                             workers, policy_path)  # fmt: skip
        clock.lap("scores (gold + proxies)")
    if state.is_main_process:
        # 6. curves on the reported prompts; each seed's k chosen on the validation prompts
        rows = compute_curves(args, gold_scores, proxies, reported)
        write_csv(output_dir / "bon_results.csv", rows, CSV_COLUMNS)
        selection = correlations = None
        if args.num_validation_prompts and set(args.methods) & set(SELECTED_METHODS):
            validation_rows = compute_curves(args, gold_scores, proxies, validation)
            selection, added = extend_grids(args, gold_scores, proxies, validation, validation_rows)
            write_csv(output_dir / "k_selection.csv", selection, list(selection[0]))
            # The reported curves of the added ks, beside the grid's (bon_results.csv holds the grid fixed before).
            extended = compute_curves(args, gold_scores, proxies, reported, added) if added else []
            write_csv(output_dir / "bon_results_extended.csv", extended, CSV_COLUMNS)
            rows = rows + extended
            correlations = ranking_correlations(args, proxies, selection, reported)
            write_csv(output_dir / "ranking_correlations.csv", correlations, list(correlations[0]))
        plot_curves(output_dir / "bon_curves.png", rows, args, selection)
        # 7. diagnostics on the reported prompts, and the summary
        found = write_diagnostics(
            output_dir, args, eval_prompts, gold_scores, proxies, held_out, completions, reported
        )
        clock.lap("curves + diagnostics")
        write_summary(output_dir / "summary.md", args, aggregate(rows, args, selection), selection, found,
                      clock.finish(), cached_seconds(cache), sources(args, training_args, model_args),
                      correlations)  # fmt: skip
        write_run_record(output_dir / "config.json", args, training_args, model_args)
        print((output_dir / "summary.md").read_text())
        print(f"Results in {output_dir}: bon_results.csv, bon_curves.png, summary.md, diagnostics.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(BoNScriptArguments, "outputs/bon")


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    shutdown()
