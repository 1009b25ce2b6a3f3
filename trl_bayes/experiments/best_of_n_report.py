"""The Best-of-N study's report (recipes/bon.py): the table per method (each seed's k chosen on validation), the
curves and the uncertainty diagnostics (CSV, figures), and `summary.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trl_bayes.experiments.best_of_n_study import (
    MAX_GRID_STEPS,
    METHODS,
    SAMPLE_COLUMNS,
    SELECTED_METHODS,
    TYPICALITY_COLUMNS,
    UNCERTAINTY_COLUMNS,
    grid_extensions,
    method_specs,
    penalty_labels,
)
from trl_bayes.experiments.report import fmt, write_csv

# Summary stage name -> its cache folders (for the time their results took to compute).
STAGE_CACHES = {
    "world + SFT policy": ["world/seconds.json"],
    "preference pairs": ["pairs/seconds.json"],
    "proxies (MAP + Laplace fit)": ["proxies/*/seconds.json"],
    "Best-of-N samples": ["samples/seconds.json"],
    "scores (gold + proxies)": ["scores/*/seconds.json"],
}


def curve_label(method: str, penalty: str, k: float) -> str:
    return method if penalty in ("none", "mean", "wco") else f"{method} ({penalty}, k={k:g})"


def seed_curves(rows, args, method: str, penalty: str, ks_per_seed: list[float], column: str):
    """`(seeds, ns)` array of `column` for one method and penalty, each seed at its own k."""
    import numpy as np

    return np.array([[r[column] for r in rows if (r["method"], r["penalty"], r["k"], r["seed"]) == (method, penalty, k, s)]
                     for s, k in zip(args.seeds, ks_per_seed, strict=True)])  # fmt: skip


def chosen_ks(selection: list[dict[str, Any]], args, method: str, penalty: str) -> list[float]:
    """Each seed's k chosen on the validation prompts, in the order of `args.seeds`."""
    chosen = {r["seed"]: r["k"] for r in selection if r["chosen"] and (r["method"], r["penalty"]) == (method, penalty)}
    return [chosen[s] for s in args.seeds]


def aggregate(rows: list[dict[str, Any]], args, selection: list[dict[str, Any]] | None = None) -> list[dict]:
    """Per (method, penalty, k), and per (method, penalty) with each seed's k chosen on validation: gold at the largest
    n and at the best n per seed (arrays over seeds, in the order of `args.seeds`)."""

    def entry(label, method, penalty, k, ks_per_seed):
        gold = seed_curves(rows, args, method, penalty, ks_per_seed, "gold_reward")
        proxy = seed_curves(rows, args, method, penalty, ks_per_seed, "proxy_reward")
        return {"label": label, "method": method, "penalty": penalty, "k": k, "ks": list(ks_per_seed),
                "gold_last": gold[:, -1], "gold_best": gold.max(axis=1),
                "best_n": [args.ns[i] for i in gold.argmax(axis=1)], "proxy_last": proxy[:, -1]}  # fmt: skip

    table = [entry(curve_label(m, p, k), m, p, k, [k] * len(args.seeds)) for m, p, k in method_specs(args)]
    for method in [m for m in args.methods if m in SELECTED_METHODS] if selection else []:
        for penalty in penalty_labels(args):
            ks = chosen_ks(selection, args, method, penalty)
            table.append(entry(f"{method} ({penalty}, k chosen on validation)", method, penalty, "val", ks))
    return table


def plot_curves(path: Path, rows: list[dict[str, Any]], args, selection: list[dict[str, Any]] | None = None) -> None:
    """Proxy gain and gold vs KL, mean ± std over seeds. Penalized methods are drawn at each seed's k chosen on the
    validation prompts when there is a `selection`, else at `plot_k` (every k is in the CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    # One color per method, solid for std and dashed for var; penalized methods at `plot_k` only (the CSV has all).
    colors = {method: plt.cm.tab20(i) for i, method in enumerate(METHODS)}
    kl = np.array([r["kl"] for r in rows if (r["method"], r["seed"]) == (rows[0]["method"], args.seeds[0])])
    drawn = set()
    for method, penalty, k in method_specs(args):
        if (method, penalty) in drawn:
            continue
        label, ks = curve_label(method, penalty, k), [k] * len(args.seeds)
        if method in SELECTED_METHODS:
            if selection:
                ks, label = chosen_ks(selection, args, method, penalty), f"{method} ({penalty}, k from validation)"
            else:
                ks, label = [args.plot_k] * len(args.seeds), curve_label(method, penalty, args.plot_k)
            drawn.add((method, penalty))
        elif method == "Ens-UWO" and k != args.uwo_ks[0]:
            continue
        style = "--" if penalty.startswith("var") else "-"
        for ax, column in zip(axes, ("proxy_reward", "gold_reward"), strict=True):
            values = seed_curves(rows, args, method, penalty, ks, column)
            if column == "proxy_reward":
                # A Bradley-Terry reward has an arbitrary offset per model: plot each seed's gain over n = 1.
                values = values - values[:, :1]
            mean, std = values.mean(0), values.std(0)
            ax.plot(kl, mean, style, marker=".", color=colors[method], label=label)
            ax.fill_between(kl, mean - std, mean + std, color=colors[method], alpha=0.08)
    titles = ("proxy reward gain over n = 1 (method's own reward, unpenalized)", "gold reward")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("KL(best-of-n || policy) = log n - (n-1)/n  [nats]")
        ax.set_title(f"{title}\nmean ± std over seeds {args.seeds}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(
        f"Best-of-n, {args.num_eval_prompts} prompts x {args.num_samples} samples (n = {args.ns[0]}..{args.ns[-1]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnostics(args, gold_scores, proxies, held_out, completions) -> tuple[list[dict], list[dict], list[dict]]:
    """On the reported prompts: held-out pair metrics of MAP vs LA per seed; per seed and uncertainty of member 0 that
    was scored (`UNCERTAINTY_COLUMNS`: the Laplace variances and the typicality baselines' squared scores; std = their
    square root), the std-vs-proxy-error correlations along n; and the std against the completion's length.

    Returns:
        pair rows, along-n rows (`seed`, `uncertainty`, ... of `uncertainty_along_n`), and length rows (`seed`,
        `uncertainty`, `words`, `num_responses`, `mean_z_std`: the std standardized within each prompt, averaged over
        the responses of that length; `corr_within` repeats the within-prompt correlation of std and length).
    """
    import numpy as np
    import torch

    from trl_bayes.diagnostics import pair_metrics, standardize_within, uncertainty_along_n, within_prompt_correlation

    words = np.array([[len(c.split()) for c in row] for row in completions])
    # The held-out pairs are noiseless; which response is chosen is the gold's verdict.
    pair_rows, along_n, length_rows = [], [], []
    for seed in args.seeds:
        member = proxies[seed, 0]
        metrics = pair_metrics(torch.from_numpy(member["pair_mean"]), torch.from_numpy(member["pair_var"]))
        pair_rows.append({"seed": seed, **metrics})
        for uncertainty, column in UNCERTAINTY_COLUMNS.items():
            if column not in member:
                continue
            std = np.sqrt(member[column])
            for row in uncertainty_along_n(member["mean"], std, gold_scores, args.ns, lengths=words):
                along_n.append({"seed": seed, "uncertainty": uncertainty, **row})
            z_std = standardize_within(std)
            corr = within_prompt_correlation(std, words)
            for length in np.unique(words):
                mask = words == length
                length_rows.append({"seed": seed, "uncertainty": uncertainty, "words": int(length),
                                    "num_responses": int(mask.sum()), "mean_z_std": float(z_std[mask].mean()),
                                    "corr_within": corr})  # fmt: skip
    return pair_rows, along_n, length_rows


def class_diagnostics(args, prompts, gold_scores, proxies, completions) -> list[dict]:
    """On the reported prompts of an offline world: per seed (member 0) and uncertainty that was scored
    (`UNCERTAINTY_COLUMNS`), the std of exploit-like responses (`trl_bayes.experiments.world.response_classes`:
    degenerate repetition, very short, very long, off-topic) against typical ones, standardized within each prompt
    (`uncertainty_by_class`), with the proxy's mean error z(proxy) - z(gold) on each class. A penalty helps only if the
    classes the proxy overrates (error > 0) get z-std > 0."""
    import numpy as np

    from trl_bayes.diagnostics import standardize, uncertainty_by_class
    from trl_bayes.experiments.world import RESPONSE_CLASSES, response_classes

    classes = [[response_classes(p, c) for c in row] for p, row in zip(prompts, completions, strict=True)]
    masks = {name: np.array([[name in c for c in row] for row in classes]) for name in RESPONSE_CLASSES}
    rows = []
    for seed in args.seeds:
        member = proxies[seed, 0]
        error = standardize(member["mean"]) - standardize(gold_scores)
        for uncertainty, column in UNCERTAINTY_COLUMNS.items():
            if column in member:
                for row in uncertainty_by_class(np.sqrt(member[column]), masks, error):
                    rows.append({"seed": seed, "uncertainty": uncertainty, **row})
    return rows


def plot_diagnostics(path: Path, along_n: list[dict], length_rows: list[dict], args, class_rows=None) -> None:
    """`bon_diagnostics.png`: per uncertainty (a color each, the same in every panel and run; solid for the Laplace
    variances, dashed for the typicality baselines), the std-vs-proxy-error correlations along n, the z-scored std by
    completion length and, with `class_rows`, by kind of response; one legend for all panels, below them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from trl_bayes.penalties import LAPLACE_UNCERTAINTIES

    panels = 4 if class_rows else 3
    # The class panel holds a bar per uncertainty and class: wider than the others.
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), width_ratios=[1, 1, 1, 1.5][:panels])
    colors = {uncertainty: plt.cm.tab10(i) for i, uncertainty in enumerate(UNCERTAINTY_COLUMNS)}
    uncertainties = list(dict.fromkeys(r["uncertainty"] for r in along_n))
    for uncertainty in uncertainties:
        style = dict(ls="-" if uncertainty in LAPLACE_UNCERTAINTIES else "--", marker=".", color=colors[uncertainty])
        for ax, column in zip(axes[:2], ("corr_std_error_within", "corr_std_error"), strict=True):
            values = np.array([[r[column] for r in along_n if (r["seed"], r["uncertainty"]) == (s, uncertainty)]
                               for s in args.seeds])  # fmt: skip
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            ax.plot(args.ns, mean, **style)
            ax.fill_between(args.ns, mean - std, mean + std, color=colors[uncertainty], alpha=0.08)
        mine = [r for r in length_rows if r["uncertainty"] == uncertainty]
        lengths = sorted({r["words"] for r in mine})
        # Response-weighted mean over seeds of the within-prompt z-scored std, per completion length.
        z = [np.average([r["mean_z_std"] for r in mine if r["words"] == w],
                        weights=[r["num_responses"] for r in mine if r["words"] == w]) for w in lengths]  # fmt: skip
        corr = np.mean([r["corr_within"] for r in mine])
        axes[2].plot(lengths, z, **style, label=f"{uncertainty} std (within-prompt corr with length {corr:+.2f})")
    axes[0].set_title("within-prompt corr(std, proxy error)\namong each prompt's top N/n (mean ± std over seeds)")
    axes[1].set_title("pooled corr(std, proxy error), same responses")
    axes[2].set_title("std standardized within its prompt, by completion length")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
    axes[2].set_xlabel("completion length (words)")
    if class_rows:
        names = list(dict.fromkeys(r["class"] for r in class_rows))
        width = 0.8 / len(uncertainties)
        for i, uncertainty in enumerate(uncertainties):
            z = [np.nanmean([r["mean_z_std"] for r in class_rows if (r["class"], r["uncertainty"]) == (c, uncertainty)])
                 for c in names]  # fmt: skip
            axes[3].bar(np.arange(len(names)) + i * width, z, width, color=colors[uncertainty])
        errors = [np.nanmean([r["mean_error"] for r in class_rows if r["class"] == c]) for c in names]
        fractions = [np.mean([r["fraction"] for r in class_rows if r["class"] == c]) for c in names]
        axes[3].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        axes[3].set_xticklabels([f"{c}\n{f:.0%}, err {e:+.2f}" for c, f, e in zip(names, fractions, errors, strict=True)],
                                fontsize=8)  # fmt: skip
        axes[3].set_title("std standardized within its prompt, by kind of response\n(share of samples, proxy error)")
    for ax in axes:
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    fig.legend(*axes[2].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_diagnostics(output_dir: Path, args, prompts, gold_scores, proxies, held_out, completions, reported: slice):
    """The uncertainty diagnostics on the reported prompts (rows `reported` of the (P, N) arrays; `prompts` are the
    reported ones): `pair_metrics.csv`, `bon_diagnostics.csv`, `bon_length.csv`, on the offline world `bon_classes.csv`,
    and `bon_diagnostics.png`. Returns (pair rows, along-n rows, length rows, class rows or None)."""
    proxies = {key: {c: v[reported] if c in SAMPLE_COLUMNS else v for c, v in member.items()}
               for key, member in proxies.items()}  # fmt: skip
    gold_scores, completions = gold_scores[reported], completions[reported]
    pair_rows, along_n, length_rows = diagnostics(args, gold_scores, proxies, held_out, completions)
    write_csv(output_dir / "pair_metrics.csv", pair_rows, list(pair_rows[0]))
    write_csv(output_dir / "bon_diagnostics.csv", along_n, list(along_n[0]))
    write_csv(output_dir / "bon_length.csv", length_rows, list(length_rows[0]))
    class_rows = None
    if args.offline and args.gold_reward == "world":
        class_rows = class_diagnostics(args, prompts, gold_scores, proxies, completions)
        write_csv(output_dir / "bon_classes.csv", class_rows, list(class_rows[0]))
    plot_diagnostics(output_dir / "bon_diagnostics.png", along_n, length_rows, args, class_rows)
    return pair_rows, along_n, length_rows, class_rows


def cached_seconds(cache: Path) -> dict[str, float | None]:
    """Per summary stage, the time its cached results took when they were computed (`cache/*/seconds.json`)."""
    computed = {}
    for stage, patterns in STAGE_CACHES.items():
        files = [f for pattern in patterns for f in cache.glob(pattern)]
        computed[stage] = sum(json.loads(f.read_text()) for f in files) if files else None
    return computed


def write_summary(
    path: Path, args, table, selection, diagnostic_rows, seconds, computed_seconds, sources, correlations=None
) -> None:
    """`summary.md`: `table` (`aggregate`), the k `selection` (with the grids `extend_grids` extended), the
    `correlations` of the rankings with the proxy and the penalty (`ranking_correlations`), the `diagnostic_rows` of
    `write_diagnostics`, the time per stage (this run's `seconds` and the cached stages' `computed_seconds`) and the
    `sources` (policy, gold, proxy)."""
    import numpy as np

    pair_rows, along_n, length_rows, class_rows = diagnostic_rows
    n_max = args.ns[-1]
    lines = [
        "# Best-of-N with Bayesian reward models",
        "",
        f"- policy: {sources['policy']}; gold reward: {sources['gold']}",
        f"- proxies: {sources['proxy']}, {args.num_train_pairs} training pairs ({args.label_noise:.0%} labels "
        f"flipped), {args.ensemble_size} members per ensemble, seeds {args.seeds}",
        f"- Best-of-n: {args.num_eval_prompts} held-out prompts x {args.num_samples} samples, n = {args.ns[0]}..{n_max},"
        " unbiased estimator (every n from one set of samples)",
        f"- penalty strengths fixed in the config before the run: k in {args.ks} "
        f"({', '.join(m for m in args.methods if m in SELECTED_METHODS)}), {args.uwo_ks} (Ens-UWO)",
        f"- `-rel`: penalized by the relative variance Var(r_i - mean_j r_j) over the prompt's {args.num_samples} "
        "samples instead of the marginal variance J Σ J^T",
    ]
    if set(args.methods) & set(TYPICALITY_COLUMNS):
        lines.append("- typicality baselines (issue 16; member 0's MAP reward minus k x the score, `std`; its square, "
                     "`var`), within each prompt's samples weighted by their draw counts: Prior-rel |J_i - J_mean|² / δ "
                     "(prior in place of the posterior), Hidden-Euc / Hidden-Maha the distance of the reward model's "
                     "last hidden state to the samples' mean (plain / under their covariance shrunk towards its "
                     "diagonal), SFT-NLL the SFT policy's mean per-token NLL")  # fmt: skip
    if selection:
        lines.append(f"- 'k chosen on validation': each seed's k from {args.ks} with the best gold at n={n_max} on "
                     f"{args.num_validation_prompts} validation prompts (held out, never reported; `k_selection.csv`); "
                     "when the pick is the grid's largest or smallest nonzero k, the grid is extended (x2 above, /2 "
                     f"below, at most {MAX_GRID_STEPS} steps) and k picked again (reported curves of added ks: "
                     "`bon_results_extended.csv`)")  # fmt: skip
    mp = next((t for t in table if t["method"] == "MAP"), None)
    lines += [
        "",
        f"## Gold reward (mean ± std over {len(args.seeds)} seeds; Δ = paired difference to MAP, same seed)",
        "",
        f"| method | gold at n={n_max} | Δ at n={n_max} | best gold over n | Δ best | best n (per seed) | "
        f"proxy at n={n_max} |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        delta_last = fmt(t["gold_last"] - mp["gold_last"]) if mp is not None else ""
        delta_best = fmt(t["gold_best"] - mp["gold_best"]) if mp is not None else ""
        label = t["label"] + (f" → k = {t['ks']}" if t["k"] == "val" else "")
        lines.append(f"| {label} | {fmt(t['gold_last'])} | {delta_last} | {fmt(t['gold_best'])} | {delta_best} | "
                     f"{t['best_n']} | {fmt(t['proxy_last'])} |")  # fmt: skip
    if mp is not None:
        lines += ["", f"MAP overoptimization: gold at the best n minus gold at n={n_max} = "
                  f"{fmt(mp['gold_best'] - mp['gold_last'])} (positive: gold falls while the proxy rises)."]  # fmt: skip
    if selection:
        lines += ["", f"## k chosen on the validation prompts (gold at n={n_max} there, per seed)", "",
                  "| method | penalty | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
                  "|---|---|" + "---|" * len(args.seeds)]  # fmt: skip
        for method in dict.fromkeys(r["method"] for r in selection):
            for penalty in penalty_labels(args):
                cells = []
                for seed in args.seeds:
                    mine = [r for r in selection if (r["method"], r["penalty"], r["seed"]) == (method, penalty, seed)]
                    pick = next(r for r in mine if r["chosen"])
                    cells.append(f"k={pick['k']:g} ({pick['validation_gold_at_max_n']:.2f})")
                lines.append(f"| {method} | {penalty} | " + " | ".join(cells) + " |")
        extended = grid_extensions(selection)
        lines += ["", *(f"- {line}" for line in extended)] if extended else ["", "No grid was extended."]
    if correlations:
        lines += ["", "## How much the proxy still moves the ranking (k chosen on validation, reported prompts)", "",
                  "Spearman correlation, among each prompt's samples, of the final score with the proxy and with minus "
                  "the penalty alone; mean over prompts, then mean ± std over seeds (`ranking_correlations.csv`). "
                  "Near 1 with the penalty and near 0 with the proxy: the penalty alone ranks.", "",
                  "| method | penalty | k (per seed) | Spearman with proxy | Spearman with −penalty |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for method, penalty in dict.fromkeys((r["method"], r["penalty"]) for r in correlations):
            mine = [r for r in correlations if (r["method"], r["penalty"]) == (method, penalty)]
            proxy, alone = (np.array([r[c] for r in mine]) for c in ("spearman_with_proxy", "spearman_with_penalty"))
            ks = [float(f"{r['k']:g}") for r in mine]
            lines.append(f"| {method} | {penalty} | {ks} | {fmt(proxy)} | {fmt(alone)} |")
    lines += ["", "## Held-out pairs (noiseless gold labels): MAP vs LA (each seed's member 0)", "",
              "| seed | accuracy | BT NLL MAP | BT NLL LA | ECE MAP | ECE LA |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in pair_rows:
        lines.append(f"| {r['seed']} | {r['map_accuracy']:.3f} | {r['map_nll']:.4f} | {r['laplace_probit_nll']:.4f} | "
                     f"{r['map_ece']:.4f} | {r['laplace_ece']:.4f} |")  # fmt: skip
    uncertainties = list(dict.fromkeys(r["uncertainty"] for r in along_n))
    lines += ["", "## Does the uncertainty flag the proxy's errors? (BoN samples, each seed's member 0)", "",
              "Correlation between the std (the square root of each uncertainty that was scored: the LA variances, the",
              "typicality baselines' squared scores) and the proxy's error z(proxy) - z(gold) among each prompt's top",
              "ceil(N/n) samples by the MAP proxy (n = 1: all samples); positive = the penalty hits overrated responses.",
              "`within`: computed within each prompt, then averaged (what a ranking within a prompt sees); `pooled`:",
              "over all prompts' responses at once. Mean over seeds.", "",
              "| n | " + " | ".join(f"{u} within | {u} pooled" for u in uncertainties) + " | mean error |",
              "|---|" + "---|---|" * len(uncertainties) + "---|"]  # fmt: skip
    for n in args.ns:
        cells = []
        for u in uncertainties:
            mine = [r for r in along_n if (r["n"], r["uncertainty"]) == (n, u)]
            within = np.array([r["corr_std_error_within"] for r in mine])
            within_cell = "n/a" if np.isnan(within).all() else f"{np.nanmean(within):+.3f}"
            cells.append(f"{within_cell} | {np.mean([r['corr_std_error'] for r in mine]):+.3f}")
        errors = [r["mean_error"] for r in along_n if (r["n"], r["uncertainty"]) == (n, uncertainties[0])]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {np.mean(errors):+.3f} |")
    lines += ["", "Within-prompt correlation of the std with the completion's length (words), mean over seeds: "
              + ", ".join(f"{u} {np.mean([r['corr_within'] for r in length_rows if r['uncertainty'] == u]):+.3f}"
                          for u in uncertainties) + "."]  # fmt: skip
    lines += ["", "Within-prompt correlation of the std with the proxy score and with the length (words) among each "
              "prompt's top ceil(N/n) samples, mean over seeds:", "",
              "| n | " + " | ".join(f"{u} std~proxy | {u} std~length" for u in uncertainties) + " |",
              "|---|" + "---|---|" * len(uncertainties)]  # fmt: skip
    for n in args.ns:
        cells = []
        for u in uncertainties:
            mine = [r for r in along_n if (r["n"], r["uncertainty"]) == (n, u)]
            for column in ("corr_std_proxy_within", "corr_std_length_within"):
                values = np.array([r[column] for r in mine])
                cells.append("n/a" if np.isnan(values).all() else f"{np.nanmean(values):+.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if class_rows:
        lines += ["", "## Exploit-like responses: is their uncertainty high? (BoN samples, each seed's member 0)", "",
                  "Mean over the class's samples of the std standardized within its prompt (> 0: penalized more than",
                  "the prompt's typical sample), and the proxy's mean error z(proxy) - z(gold) on the class (> 0:",
                  "overrated). Classes overlap (`trl_bayes.experiments.world.response_classes`); mean over seeds.", "",
                  "| class | share of samples | " + " | ".join(f"{u} z-std" for u in uncertainties) + " | proxy error |",
                  "|---|---|" + "---|" * len(uncertainties) + "---|"]  # fmt: skip
        for name in dict.fromkeys(r["class"] for r in class_rows):
            mine = [r for r in class_rows if r["class"] == name]
            cells = [
                f"{np.nanmean([r['mean_z_std'] for r in mine if r['uncertainty'] == u]):+.3f}" for u in uncertainties
            ]
            lines.append(f"| {name} | {np.mean([r['fraction'] for r in mine]):.1%} | " + " | ".join(cells)
                         + f" | {np.nanmean([r['mean_error'] for r in mine]):+.3f} |")  # fmt: skip
    lines += ["", "## Time per stage (s)", "",
              "`this run`: wall time here (a cached stage only loads); `computed`: the time its cached results took",
              "when they were computed (`cache/*/seconds.json`).", "",
              "| stage | this run | computed |", "|---|---|---|"]  # fmt: skip
    for stage, value in seconds.items():
        computed = computed_seconds.get(stage)
        lines.append(f"| {stage} | {value:.1f} | {'' if computed is None else f'{computed:.1f}'} |")
    lines += ["", "Files: `bon_results.csv` (the grid fixed before the run), `bon_results_extended.csv` (ks added on "
              "validation), `bon_curves.png`, `k_selection.csv`, `ranking_correlations.csv`, `bon_diagnostics.csv`, "
              "`bon_length.csv`, `bon_classes.csv`, `bon_diagnostics.png`, `pair_metrics.csv`, cached stages in "
              "`cache/`."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
