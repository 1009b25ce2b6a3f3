"""PPO with a KL penalty (issue 16, item 5): does an uncertainty penalty let PPO reach more gold within a KL budget?

Runs `recipes/ppo.py` (one subprocess per KL coefficient β, as a user would) over the grid below, every β on one
cache (the world, SFT policy, pairs, proxies and reference samples are computed once and shared; each PPO run is
cached under its method, seed and β), then writes the gold-vs-KL frontier: per method and KL budget, the best gold
reachable within that budget over every β and evaluated step, mean ± std over seeds.

The grid is fixed here, before any run (Coste et al. 2024: a KL coefficient of 0.01 with an uncertainty-weighted
objective against 0.2 for a single reward model):

- β in `KL_COEFS` = 0, 0.01, 0.05, 0.2 (PPOConfig's per-token `kl_coef`, k1 estimator);
- methods `METHODS`: MAP, LA (the paper's marginal variance), LA-rel (relative variance on 8 reference samples per
  prompt), Ens-UWO (4 MAP proxies, mean - k * their variance) and Hidden-Maha (the Mahalanobis hidden-state distance
  to the prompt's reference samples: the best typicality baseline of issue 16's Best-of-N re-check); every penalty
  `std` (Ens-UWO: `uwo`) with k = 1, recipes/ppo.py's default `--k`, for every method (no k is chosen on results);
- seeds 0, 1, 2 (each: its own proxies and PPO seed, the same for every method and β);
- the scale `SCALE`: recipes/ppo.py's default run (40 steps x 64 completions), measured to fit: the 60 runs take about
  25 CPU-minutes, 13-15 minutes on 2 CPU cores with 2 worker processes (docs/uncertainty_study.md).

    python scripts/study_kl.py                                   # the grid: 4 β x 5 methods x 3 seeds
    python scripts/study_kl.py --dry_run                         # print the runs only
    python scripts/study_kl.py --kl_coefs 0.05 --methods MAP LA --seeds 0 --output_dir /tmp/kl   # one cell
    python scripts/study_kl.py -- --world rare --num_workers 1   # flags after `--` go to every recipes/ppo.py run

Writes `<output_dir>/kl_results.csv` (every evaluation of every run, with its β), `kl_frontier.csv`,
`kl_frontier.png`, `kl_summary.md`, and each β's recipe output under `runs/kl<β>/`. A killed study resumes: finished
PPO runs come from the cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trl_bayes.experiments.report import write_csv
from trl_bayes.experiments.rl_report import (
    KL_BUDGETS,
    KL_FRONTIER_COLUMNS,
    KL_RESULTS_COLUMNS,
    kl_frontier,
    plot_kl_frontier,
    write_kl_summary,
)

REPO = Path(__file__).resolve().parents[1]
PPO = REPO / "recipes" / "ppo.py"
KL_COEFS = [0.0, 0.01, 0.05, 0.2]
METHODS = ["MAP", "LA", "LA-rel", "Ens-UWO", "Hidden-Maha"]
SEEDS = [0, 1, 2]
# The scale, pinned here so that a later change of recipes/ppo.py's defaults does not move the grid: the recipe's default
# run (40 steps x 64 completions, 4 epochs x 2 minibatches, lr 5e-5, the gold every 4 steps on the 64 held-out prompts x
# 2 completions). Measured before any grid result (docs/uncertainty_study.md): one run costs about 25 CPU-seconds
# (LA and LA-rel, 61.6 s for both with the recipe's start-up), so the 60 runs take about 25 CPU-minutes, 13-15 minutes
# on 2 idle cores with 2 worker processes: no reduction of the recipe's budget was needed to fit 40 minutes.
SCALE = ["--ppo_steps", "40", "--ppo_batch_size", "64", "--ppo_micro_batch_size", "32", "--ppo_mini_batches", "2",
         "--ppo_epochs", "4", "--ppo_eval_steps", "4", "--num_reference_samples", "8", "--penalty", "std", "--k", "1"]  # fmt: skip


def run_ppo(run_dir: Path, flags: list[str]) -> float:
    """One recipes/ppo.py run into `run_dir` (its PPO runs cached in the shared cache); its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with (run_dir / "ppo.log").open("w") as log:
        result = subprocess.run([sys.executable, str(PPO), *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"recipes/ppo.py failed in {run_dir} (exit {result.returncode}): see {run_dir / 'ppo.log'}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kl_coefs", nargs="+", type=float, default=KL_COEFS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--output_dir", default="outputs/kl_study")
    parser.add_argument("--dry_run", action="store_true", help="Print the runs and stop.")
    parser.add_argument("recipe_flags", nargs="*", help="After `--`: flags for every recipes/ppo.py run.")
    args = parser.parse_args(argv)
    if any(beta < 0 for beta in args.kl_coefs) or len(set(args.kl_coefs)) != len(args.kl_coefs):
        parser.error(f"--kl_coefs {args.kl_coefs}: give distinct values >= 0.")
    output_dir = Path(args.output_dir).resolve()
    runs = {}
    for beta in args.kl_coefs:
        run_dir = output_dir / "runs" / f"kl{beta:g}"
        runs[beta] = (run_dir, [*SCALE, "--kl_coef", f"{beta:g}", "--methods", *args.methods, "--seeds",
                                *map(str, args.seeds), "--output_dir", str(run_dir), "--cache_dir",
                                str(output_dir / "cache"), *args.recipe_flags])  # fmt: skip
    if args.dry_run:
        for _run_dir, flags in runs.values():
            print("python recipes/ppo.py " + " ".join(flags))
        return
    seconds, rows = {}, []
    for beta, (run_dir, flags) in runs.items():
        print(f"[kl study] β = {beta:g}: {len(args.methods)} methods x {len(args.seeds)} seeds", flush=True)
        seconds[f"β = {beta:g}"] = run_ppo(run_dir, flags)
        with (run_dir / "ppo_results.csv").open() as f:
            rows += [{"kl_coef": beta, **row} for row in csv.DictReader(f)]
    seconds["total"] = sum(seconds.values())
    write_csv(output_dir / "kl_results.csv", rows, KL_RESULTS_COLUMNS)
    frontier = kl_frontier(rows, KL_BUDGETS)
    write_csv(output_dir / "kl_frontier.csv", frontier, KL_FRONTIER_COLUMNS)
    plot_kl_frontier(output_dir / "kl_frontier.png", frontier,
                     f"PPO: best gold within a KL budget, over β {args.kl_coefs} (seeds {args.seeds})")  # fmt: skip
    config = json.loads((runs[args.kl_coefs[0]][0] / "config.json").read_text())["script"]
    plan = [
        f"grid: β {args.kl_coefs} x methods {args.methods} x seeds {args.seeds} ({len(rows)} evaluations), fixed "
        "before running (scripts/study_kl.py)",
        f"world: {config['world']}; PPO scale: {config['ppo_steps']} steps x {config['ppo_batch_size']} completions, "
        f"{config['ppo_epochs']} epochs x {config['ppo_mini_batches']} minibatches, lr {config['ppo_learning_rate']:g}, "
        f"max_new_tokens {config['max_new_tokens']}, {config['kl_estimator']} KL estimator",
        f"penalties: {config['penalty']} with k = {config['k']:g} for every penalized method (Ens-UWO: uwo, k = "
        f"{config['k']:g}); LA on the {config['uncertainty']} variance; LA-rel and the baselines centered on "
        f"{config['num_reference_samples']} reference samples per prompt; ensembles of {config['ensemble_size']}",
        f"gold on {config['num_eval_prompts']} held-out prompts x {config['num_eval_generations']} completions every "
        f"{config['ppo_eval_steps']} steps; KL budgets {list(KL_BUDGETS)} nats",
    ]
    write_kl_summary(output_dir / "kl_summary.md", rows, frontier, plan, seconds)
    print((output_dir / "kl_summary.md").read_text())
    print(f"[kl study] results in {output_dir}")


if __name__ == "__main__":
    main()
