"""The PPO and GRPO studies' report (recipes/ppo.py, grpo.py): per method, gold at step 0, at the last and at the best
evaluated step; proxy and gold vs step and vs KL (`*_curves.png`); time per step; `summary.md`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl_bayes.experiments.report import fmt

# Parts of a PPO step that `trl_bayes.PPOTrainer` times (`time/<part>` in its logs).
TIMED_PARTS = ("generation", "scoring", "reference", "optimization")


def method_label(method: str, args) -> str:
    """`MAP`, or e.g. `LA (std, k=1)`: the method with its penalty (`args`: the PPO or GRPO script arguments). LA and
    LA-Ens name the relative variance when `args.uncertainty` picks it; the other methods' names say their variance."""
    if method == "MAP":
        return method
    if method == "Ens-UWO":
        return f"{method} (uwo, k={args.k:g})"
    relative = ", relative" if method in ("LA", "LA-Ens") and args.uncertainty == "relative" else ""
    return f"{method} ({args.penalty}, k={args.k:g}{relative})"


def aggregate(rows, args) -> list[dict[str, Any]]:
    """Per method: gold at step 0, at the last step and at the best evaluated step, per seed."""
    import numpy as np

    table = []
    for method in args.methods:
        per_seed = [[r for r in rows if r["method"] == method and r["seed"] == s] for s in args.seeds]
        gold, kl, proxy = (
            np.array([[r[c] for r in mine] for mine in per_seed]) for c in ("gold_reward", "kl", "proxy_reward")
        )
        steps = [r["step"] for r in per_seed[0]]
        table.append({
            "method": method, "label": method_label(method, args), "gold_first": gold[:, 0], "gold_last": gold[:, -1],
            "gold_best": gold.max(1), "best_step": [steps[i] for i in gold.argmax(1)], "kl_last": kl[:, -1],
            "proxy_last": proxy[:, -1],
        })  # fmt: skip
    return table


def step_times(histories, args) -> dict[str, dict[str, float]]:
    """Per method, the mean seconds per PPO step of each timed part, over steps and seeds."""
    import numpy as np

    return {
        method: {p: float(np.mean([h[f"time/{p}"] for s in args.seeds for h in histories[method, s] if f"time/{p}" in h]))
                 for p in TIMED_PARTS}
        for method in args.methods
    }  # fmt: skip


def plot_curves(path: Path, rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for method in args.methods:
        mine = [[r for r in rows if r["method"] == method and r["seed"] == s] for s in args.seeds]
        steps = np.array([r["step"] for r in mine[0]])
        label = method_label(method, args)
        for row, column in enumerate(("proxy_reward", "gold_reward")):
            values = np.array([[r[column] for r in seed_rows] for seed_rows in mine])
            kls = np.array([[r["kl"] for r in seed_rows] for seed_rows in mine])
            mean, std = values.mean(0), values.std(0)
            (line,) = axes[row, 0].plot(steps, mean, marker=".", label=label)
            axes[row, 0].fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            for s, (k, v) in enumerate(zip(kls, values, strict=True)):
                axes[row, 1].plot(k, v, marker=".", color=line.get_color(), alpha=0.7, label=label if s == 0 else None)
    for row, name in enumerate(("proxy reward (the proxy's MAP reward)", "gold reward")):
        axes[row, 0].set(xlabel="PPO step", ylabel=name, title=f"{name} vs step, mean ± std over seeds {args.seeds}")
        axes[row, 1].set(
            xlabel="KL(policy || SFT) on held-out prompts [nats]", ylabel=name, title=f"{name} vs KL, per seed"
        )
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"PPO on the {'offline world' if args.offline else args.prompts_dataset_name}: MAP vs Laplace proxies"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_ppo_summary(path: Path, args, table, times, seconds, sources) -> None:
    lines = [
        "# PPO with Bayesian reward models",
        "",
        f"- policy: {sources['policy']} ({sources['policy_training']}); gold reward: {sources['gold']}",
        f"- proxies: {sources['proxy']}, {args.num_train_pairs} training pairs ({args.label_noise:.0%} labels flipped)",
        f"- PPO: {args.ppo_steps} steps x {args.ppo_batch_size} completions, {args.ppo_epochs} epochs x "
        f"{args.ppo_mini_batches} minibatches, lr {args.ppo_learning_rate:g}, kl_coef {args.kl_coef:g}, "
        f"max_new_tokens {args.max_new_tokens}; seed s = the proxies of seed s and PPO seed {sources['seed']} + s "
        "(the same for every method)",
        f"- gold on {args.num_eval_prompts} held-out prompts x {args.num_eval_generations} completions every "
        f"{args.ppo_eval_steps} steps; penalty fixed before the run: {args.penalty}, k = {args.k:g}",
        "",
        *gold_table(table, args.seeds),
    ]
    lines += ["", "Per seed (final / best gold):", "", "| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
              "|---|" + "---|" * len(args.seeds)]  # fmt: skip
    for t in table:
        cells = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(t["gold_last"], t["gold_best"], strict=True))
        lines.append(f"| {t['label']} | {cells} |")
    lines += ["", "## Time per PPO step (s, mean over steps and seeds)", "",
              "| method | " + " | ".join(TIMED_PARTS) + " | total |", "|---|" + "---|" * (len(TIMED_PARTS) + 1)]  # fmt: skip
    for t in table:
        parts = [times[t["method"]][p] for p in TIMED_PARTS]
        lines.append(f"| {t['label']} | " + " | ".join(f"{v:.3f}" for v in parts) + f" | {sum(parts):.3f} |")
    lines += ["", "`scoring` = the proxy reward callable; `reference` = no-grad log-probabilities of policy and reference "
              "and the values; evaluation time is not in the steps.", "", "## Time per stage (s, this run)", "",
              "| stage | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {stage} | {value:.1f} |" for stage, value in seconds.items()]
    lines += ["", "Files: `ppo_results.csv`, `ppo_curves.png`, cached stages and PPO logs in the cache folder."]
    path.write_text("\n".join(lines) + "\n")


def write_grpo_summary(path: Path, args, table, seconds) -> None:
    lines = [
        f"# {args.trainer.upper()} (TRL's trainer) with Bayesian reward models: the `PenalizedReward` drop-in",
        "",
        "- policy: offline SFT policy (tiny GPT-NeoX), full fine-tuning; gold: the offline world's known function",
        f"- proxies: member 0 of each seed (LoRA + Laplace), {args.num_train_pairs} pairs, "
        f"{args.label_noise:.0%} labels flipped",
        f"- {args.trainer.upper()}: {args.grpo_steps} steps x {args.grpo_prompts_per_step} prompts x "
        f"{args.num_generations} completions, lr {args.grpo_learning_rate:g}, beta {args.beta:g}; penalty {args.penalty}, "
        f"k = {args.k:g} (fixed before the run)",
        f"- gold on {args.num_eval_prompts} held-out prompts x {args.num_eval_generations} every {args.grpo_eval_steps} "
        "steps; proxy = the proxy's MAP reward (unpenalized)",
        "",
        *gold_table(table, args.seeds),
    ]
    lines += ["", "## Time (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value:.2f} |" for stage, value in seconds.items()]
    lines += ["", f"Files: `{args.trainer}_results.csv`, `{args.trainer}_curves.png`."]
    path.write_text("\n".join(lines) + "\n")


def gold_table(table: list[dict[str, Any]], seeds) -> list[str]:
    """The "Gold reward" section of a PPO or GRPO summary: one row per method of `aggregate`'s table."""
    lines = [
        f"## Gold reward (mean ± std over seeds {seeds})",
        "",
        "| method | gold at step 0 | final gold | best gold | best step (per seed) | final KL | final proxy (MAP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['label']} | {fmt(t['gold_first'])} | {fmt(t['gold_last'])} | {fmt(t['gold_best'])} | "
            f"{t['best_step']} | {fmt(t['kl_last'])} | {fmt(t['proxy_last'])} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# The KL study (scripts/study_kl.py): PPO over KL coefficients β, and the gold-vs-KL frontier.

KL_BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""KL budgets (nats, KL(policy || SFT) per completion on the held-out prompts) at which the frontier is read; fixed
before any run (PPO without a KL penalty ends at 20-35 nats in 40 steps, docs/results.md)."""
KL_RESULTS_COLUMNS = ["kl_coef", "method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]
KL_FRONTIER_COLUMNS = ["method", "kl_budget", "gold_mean", "gold_std", "seeds", "gold_per_seed", "kl_coef_per_seed",
                       "step_per_seed"]  # fmt: skip


def kl_frontier(rows: list[dict[str, Any]], budgets=KL_BUDGETS) -> list[dict[str, Any]]:
    """The gold-vs-KL frontier: per method and KL budget B, each seed's best gold over every evaluation (any β, any
    step) whose KL is at most B, then mean ± std (population) over seeds. `rows`: `kl_results.csv`'s rows (numbers or
    strings). A seed with no evaluation within B (only possible below the SFT policy's own KL of 0) gives NaN."""
    import numpy as np

    table = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        for budget in budgets:
            best = []
            for seed in seeds:
                within = [r for r in mine if int(r["seed"]) == seed and float(r["kl"]) <= budget]
                best.append(max(within, key=lambda r: float(r["gold_reward"])) if within else None)
            gold = np.array([float(b["gold_reward"]) if b else np.nan for b in best])
            table.append({
                "method": method, "kl_budget": budget, "gold_mean": float(np.mean(gold)), "gold_std": float(np.std(gold)),
                "seeds": len(seeds), "gold_per_seed": " ".join(f"{g:.4f}" for g in gold),
                "kl_coef_per_seed": " ".join(f"{float(b['kl_coef']):g}" if b else "-" for b in best),
                "step_per_seed": " ".join(str(int(b["step"])) if b else "-" for b in best),
            })  # fmt: skip
    return table


def plot_kl_frontier(path: Path, frontier: list[dict[str, Any]], title: str) -> None:
    """Gold vs KL budget, one line per method (mean ± std over seeds), log-scaled KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in dict.fromkeys(f["method"] for f in frontier):
        mine = [f for f in frontier if f["method"] == method]
        budgets = np.array([f["kl_budget"] for f in mine])
        mean, std = np.array([f["gold_mean"] for f in mine]), np.array([f["gold_std"] for f in mine])
        (line,) = ax.plot(budgets, mean, marker="o", label=method)
        ax.fill_between(budgets, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="KL budget: KL(policy || SFT) on held-out prompts [nats]",
           ylabel="best gold within the budget (over β and steps)", title=title)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_kl_summary(path: Path, rows, frontier, plan: list[str], seconds: dict[str, float]) -> None:
    """`kl_summary.md`: the plan (grid, scale, k per method), the frontier table, and per β and method the final and
    best gold and the final KL (mean ± std over seeds), and the time of each β's runs."""
    import numpy as np

    budgets = list(dict.fromkeys(f["kl_budget"] for f in frontier))
    lines = ["# PPO with a KL penalty: the gold-vs-KL frontier", "", *[f"- {p}" for p in plan], "",
             "## Frontier: best gold within each KL budget (over β and steps; mean ± std over seeds)", "",
             "| method | " + " | ".join(f"KL ≤ {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]  # fmt: skip
    for method in dict.fromkeys(f["method"] for f in frontier):
        cells = {
            f["kl_budget"]: f"{f['gold_mean']:.2f} ± {f['gold_std']:.2f}" for f in frontier if f["method"] == method
        }
        lines.append(f"| {method} | " + " | ".join(cells[b] for b in budgets) + " |")
    lines += ["", "## Per β (mean ± std over seeds)", "",
              "| β | method | gold at step 0 | final gold | best gold | final KL | final proxy (MAP) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for beta in sorted({float(r["kl_coef"]) for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            runs: dict[int, list] = {}
            for r in rows:
                if float(r["kl_coef"]) == beta and r["method"] == method:
                    runs.setdefault(int(r["seed"]), []).append(r)
            if not runs:
                continue
            curves = [sorted(rs, key=lambda r: int(r["step"])) for rs in runs.values()]
            stat = lambda values: f"{np.mean(values):.2f} ± {np.std(values):.2f}"  # noqa: E731
            first, last = [float(c[0]["gold_reward"]) for c in curves], [float(c[-1]["gold_reward"]) for c in curves]
            best = [max(float(r["gold_reward"]) for r in c) for c in curves]
            lines.append(f"| {beta:g} | {method} | {stat(first)} | {stat(last)} | {stat(best)} | "
                         f"{stat([float(c[-1]['kl']) for c in curves])} | "
                         f"{stat([float(c[-1]['proxy_reward']) for c in curves])} |")  # fmt: skip
    lines += ["", "## Time (s, wall)", "", "| runs | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    lines += ["", "Files: `kl_results.csv` (every evaluation of every run), `kl_frontier.csv`, `kl_frontier.png`; each "
              "β's PPO recipe output (`ppo_results.csv`, `ppo_curves.png`, `summary.md` with time per PPO step) under "
              "`runs/`."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
