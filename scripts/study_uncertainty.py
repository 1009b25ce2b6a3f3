"""The uncertainty study of issue 7: does the Laplace penalty help Best-of-N, under which options, on which world?

Runs `recipes/bon.py` (one subprocess per run, as a user would) over worlds x proxy backbones x posterior options,
each with its seeds, and writes one table of the gold reward at the largest n and at the best n, mean ± std over
seeds, with paired differences to MAP (same seed):

- worlds: `lists` (world 1: the exploit is long lists with repeated items), `off_topic` (world 2: lists padded with
  other categories' items) and `rare` (world 3: world 1's exploit, but the best answers, closed lists, are rare in the
  SFT distribution: a world whose gold does not favour typical answers); `trl_bayes.experiments.world.World`;
- backbones: `sft` (the SFT policy's tiny GPT-NeoX, recipes/bon.py's default) and `minilm` (the real all-MiniLM-L6-v2,
  recipes/configs/bon_minilm.yaml);
- posterior options (`OPTIONS`): which weights carry the posterior (LoRA + head, LoRA, head), the curvature (GGN, EF),
  its structure (kron, diag) and the prior precision (marglik, grid search on held-out pairs); within every run, the
  penalty (std, var), its scale (k absolute, or relative to each prompt's spreads) and the variance (marginal `LA`,
  relative `LA-rel`), each with k chosen per seed on validation prompts that are never reported;
- the typicality baselines of issue 16 in the `default` option's run: Prior-rel (the relative variance with the prior
  in place of the posterior), Hidden-Euc, Hidden-Maha (hidden-state distance within the prompt's candidates) and
  SFT-NLL, their k chosen on validation like LA's.

The `default` option's run trains each seed's ensemble (MAP, LA, LA-rel, Ens, LA-Ens, LA-Ens-rel, and the baselines);
the other options' runs train one proxy per seed (MAP, LA, LA-rel), the only proxy whose posterior they change.

The table: gold at the largest n and at the best n (mean ± std over seeds) with paired differences (same seed) to MAP,
to MAP at its best n (chosen on the reported gold, MAP's most favourable n), to Prior-rel (same penalty) and to the
best typicality baseline of the world and backbone: the one of Hidden-Euc / Hidden-Maha / SFT-NLL (and penalty) with
the best mean validation gold at the largest n (validation prompts only, never the reported gold). An option's run
without Prior-rel or baselines is compared with those of the `default` run of its world and backbone.

Every run of a world and backbone shares their cached stages (world + SFT policy, preference pairs, Best-of-N
samples, gold scores): they live once under `<output_dir>/shared/<world>/<backbone>/` and each run's cache links to
them; only the proxies and their scores are per run. A killed study resumes: finished runs are skipped, bon.py resumes
the others.

    python scripts/study_uncertainty.py --scale small                     # minutes: 2 seeds, 16 prompts x 64 samples
    python scripts/study_uncertainty.py                                   # the study: 5 seeds (see SCALES)
    python scripts/study_uncertainty.py --scale small --backbones sft --options default head   # a subset
    python scripts/study_uncertainty.py --options default                 # 3 worlds x 2 backbones x 5 seeds, default
    python scripts/study_uncertainty.py --dry_run                         # print the runs only

Writes `<output_dir>/study.csv`, `study.md`, `study.png`, `study_diagnostics.csv` (every finished run of the folder,
so a study run in parts ends with one table) and `runs.json` (each run's flags and wall time).
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
from statistics import mean, pstdev
from typing import Any

from trl_bayes.experiments.best_of_n_study import METHOD_UNCERTAINTIES

REPO = Path(__file__).resolve().parents[1]
BON = REPO / "recipes" / "bon.py"
# Per proxy backbone, the bon.py flags that select it: the default run's, or the MiniLM config.
BACKBONES = {"sft": [], "minilm": ["--config", str(REPO / "recipes" / "configs" / "bon_minilm.yaml")]}
WORLDS = ("lists", "off_topic", "rare")
# Posterior options: bon.py flags on top of the backbone's config (kron, all weights, GGN, marglik).
OPTIONS = {
    "default": [],
    "lora": ["--subset_of_weights", "lora"],
    "head": ["--subset_of_weights", "head"],
    "ef": ["--curvature", "ef"],
    "diag": ["--hessian_structure", "diag"],
    "gridsearch": ["--optimize_prior_precision", "gridsearch"],
}
# The typicality baselines of issue 16 (recipes/bon.py methods); the best of TYPICALITY_BASELINES per world and
# backbone, chosen on validation, is the study's "best baseline".
BASELINES = ["Prior-rel", "Hidden-Euc", "Hidden-Maha", "SFT-NLL"]
TYPICALITY_BASELINES = ("Hidden-Euc", "Hidden-Maha", "SFT-NLL")
METHODS = ["MAP", "LA", "LA-rel", "Ens", "LA-Ens", "LA-Ens-rel", *BASELINES]
COMMON = ["--penalties", "std", "var", "--penalty_scales", "absolute", "prompt"]
# The `default` option's run trains each seed's ensemble (Ens, LA-Ens); every other option only changes the posterior
# of member 0, so its run trains one proxy per seed (MAP, LA, LA-rel): the study's cost is in scoring every proxy.
OPTION_FLAGS = {True: ["--methods", *METHODS], False: ["--methods", "MAP", "LA", "LA-rel", "--ensemble_size", "1"]}
SMALL = ["--num_eval_prompts", "16", "--num_validation_prompts", "8", "--num_samples", "64", "--num_train_pairs", "300",
         "--num_eval_pairs", "128", "--ensemble_size", "2"]  # fmt: skip
SCALES = {
    # Minutes on 2 CPU cores: proves the pipeline, says nothing.
    "small": {"seeds": [0, 1], "flags": {"sft": SMALL, "minilm": SMALL}},
    # The study, 5 seeds. The tiny backbone at bon.py's default scale (64 reported prompts x 512 samples, 1000 pairs, 4
    # members per ensemble). MiniLM's proxies cost about 10x more per response on CPU (a 22M-weight BERT; the variance
    # needs its Jacobian for every response), so its world is smaller, fixed before any penalty was evaluated on it:
    # 32 reported + 8 validation prompts x 64 samples, 250 pairs, 2 members per ensemble, chosen for cost; then the
    # learning rate (3e-3 over 1e-3 at 3 epochs, and 1e-3 at 10 epochs) by the MAP's held-out pair NLL (0.62 against
    # 0.68 and 0.81-0.94, seeds 0-1), and MAP overoptimizes there (gold 2.24 / 2.27 at n=8, 1.91 / 2.11 at n=64).
    "default": {
        "seeds": [0, 1, 2, 3, 4],
        "flags": {
            "sft": [],
            "minilm": [
                "--num_eval_prompts",
                "32",
                "--num_validation_prompts",
                "8",
                "--num_samples",
                "64",
                "--num_train_pairs",
                "250",
                "--learning_rate",
                "3e-3",
                "--ensemble_size",
                "2",
            ],
        },
    },  # fmt: skip
}
# Options whose runs train their own MAP (the grid search's pairs are held out of its training).
OWN_MAP = ("gridsearch",)
# Stages a world's runs share (bon.py's cache folders that do not depend on the posterior).
# `maps`: the trained MAP adapters, on which the other options' runs fit their posteriors instead of training again.
SHARED_STAGES = ("world", "pairs", "samples", "scores/gold", "maps")


def link_shared_stages(run_cache: Path, shared_cache: Path) -> None:
    """Before a run: link every shared stage that the world's earlier runs computed into the run's cache."""
    for name in SHARED_STAGES:
        target, link = shared_cache / name, run_cache / name
        if target.is_dir() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target.resolve(), target_is_directory=True)


def share_new_stages(run_cache: Path, shared_cache: Path) -> None:
    """After a run: move the shared stages it computed itself to the world's shared cache, and link them back."""
    for name in SHARED_STAGES:
        path = run_cache / name
        if path.is_dir() and not path.is_symlink() and not (shared_cache / name).exists():
            (shared_cache / name).parent.mkdir(parents=True, exist_ok=True)
            path.rename(shared_cache / name)
            path.symlink_to((shared_cache / name).resolve(), target_is_directory=True)


def run_bon(run_dir: Path, flags: list[str], shared_cache: Path) -> float:
    """One bon.py run into `run_dir` (skipped when its summary exists); returns its wall time in seconds."""
    if (run_dir / "summary.md").is_file() and (run_dir / "k_selection.csv").is_file():
        return 0.0
    link_shared_stages(run_dir / "cache", shared_cache)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (run_dir / "bon.log").open("w") as log:
        result = subprocess.run([sys.executable, str(BON), *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"bon.py failed in {run_dir} (exit {result.returncode}): see {run_dir / 'bon.log'}")
    share_new_stages(run_dir / "cache", shared_cache)
    return time.perf_counter() - start


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run_results(run_dir: Path, seeds: list[int]) -> dict[tuple[str, str], dict]:
    """Per (method, penalty): per seed, gold at the largest n (`n_max`) and the best gold over n, with LA-type methods
    at the k each seed chose on its validation prompts (`k_selection.csv`), the k's, and the validation gold at the
    largest n of those k (`validation`, `None` for a method without k)."""
    rows = read_csv(run_dir / "bon_results.csv")
    # The curves of the ks a saturated grid added (bon.py's k-grid extension) are in a file of their own.
    extended = run_dir / "bon_results_extended.csv"
    rows += read_csv(extended) if extended.exists() else []
    picks = [r for r in read_csv(run_dir / "k_selection.csv") if r["chosen"] == "True"]
    chosen = {(r["seed"], r["method"], r["penalty"]): r["k"] for r in picks}
    validation = {(r["seed"], r["method"], r["penalty"]): float(r["validation_gold_at_max_n"]) for r in picks}
    n_max = max(int(r["n"]) for r in rows)
    curves: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for r in rows:
        curves.setdefault((r["method"], r["penalty"], r["k"], r["seed"]), {})[int(r["n"])] = float(r["gold_reward"])
    out: dict[tuple[str, str], dict] = {}
    for method, penalty in dict.fromkeys((r["method"], r["penalty"]) for r in rows):
        entry: dict = {"last": [], "best": [], "k": [], "n_max": n_max, "validation": []}
        for seed in map(str, seeds):
            k = chosen.get((seed, method, penalty), "0.0")
            curve = curves[method, penalty, k, seed]
            entry["last"].append(curve[n_max])
            entry["best"].append(max(curve.values()))
            entry["k"].append(float(k))
            entry["validation"].append(validation.get((seed, method, penalty)))
        if None in entry["validation"]:
            entry["validation"] = None
        out[method, penalty] = entry
    return out


def mean_std(values) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())


def best_baseline(per_method: dict[tuple[str, str], dict]) -> tuple[str, str] | None:
    """The (method, penalty) of `TYPICALITY_BASELINES` with the best mean validation gold at the largest n (each seed at
    its chosen k) in one run's results; `None` when the run has none."""
    import numpy as np

    candidates = {key: np.mean(e["validation"]) for key, e in per_method.items()
                  if key[0] in TYPICALITY_BASELINES and e["validation"] is not None}  # fmt: skip
    return max(candidates, key=candidates.get) if candidates else None


def table_rows(results, seeds) -> list[dict]:
    """One row per (world, backbone, option, method, penalty); MAP and Ens once per (world, backbone), from the
    `default` option's run (the other runs fit on the same MAP members), except the MAP of an option that trains its
    own (`gridsearch`: its held-out pairs leave training). Paired differences (same seed) to MAP (at the largest and
    at the best n, and the largest n against MAP's best n), to Prior-rel with the same penalty and to the best
    typicality baseline (`best_baseline`): from the same run, else from the default run of the world and backbone."""
    import numpy as np

    nan = [float("nan")] * len(seeds)
    rows = []
    for (world, backbone, option), per_method in results.items():
        map_ = per_method["MAP", "none"]
        default = results.get((world, backbone, "default"), {})
        baseline = best_baseline(per_method) or best_baseline(default)
        for (method, penalty), entry in per_method.items():
            own_map = method == "MAP" and option in OWN_MAP
            if (
                method in ("MAP", "Ens")
                and option != "default"
                and (world, backbone, "default") in results
                and not own_map
            ):
                continue
            prior = per_method.get(("Prior-rel", penalty)) or default.get(("Prior-rel", penalty))
            typical = (per_method.get(baseline) or default.get(baseline)) if baseline else None
            row = {"world": world, "backbone": backbone, "n_max": entry["n_max"],
                   "option": option if method not in ("MAP", "Ens") or own_map else "",
                   "method": method, "penalty": penalty, "seeds": len(seeds),
                   "ks": " ".join(f"{k:g}" for k in entry["k"]) if method not in ("MAP", "Ens") else "",
                   "best_baseline": " ".join(baseline) if baseline else ""}  # fmt: skip
            values = {
                "gold_last": entry["last"],
                "gold_best": entry["best"],
                "delta_last": np.subtract(entry["last"], map_["last"]),
                "delta_best": np.subtract(entry["best"], map_["best"]),
                "delta_map_best_n": np.subtract(entry["last"], map_["best"]),
                "delta_prior_last": np.subtract(entry["last"], prior["last"]) if prior else nan,
                "delta_prior_best": np.subtract(entry["best"], prior["best"]) if prior else nan,
                "delta_baseline_last": np.subtract(entry["last"], typical["last"]) if typical else nan,
                "delta_baseline_best": np.subtract(entry["best"], typical["best"]) if typical else nan,
            }
            for name, value in values.items():
                row[f"{name}_mean"], row[f"{name}_std"] = mean_std(value)
            rows.append(row)
    return rows


def diagnostics_rows(finished: dict) -> list[dict]:
    """Does each run's uncertainty flag the exploit? Per (world, backbone, option, uncertainty), mean over seeds of
    member 0's: within-prompt correlation of the std with the proxy's error over all samples (`corr_all`) and among
    each prompt's top 1/8 by the proxy (`corr_top`, the samples Best-of-8 and beyond pick from), and, for the class the
    proxy overrates most (its largest mean error), that error and the class's std z-scored within each prompt
    (`bon_classes.csv`: > 0 means the penalty hits it harder than the prompt's typical sample)."""
    import numpy as np

    rows = []
    for (world, backbone, option), run_dir in finished.items():
        along = read_csv(run_dir / "bon_diagnostics.csv")
        classes = [r for r in read_csv(run_dir / "bon_classes.csv") if r["class"] != "typical"]
        error = {}
        for r in classes:
            error.setdefault(r["class"], []).append(float(r["mean_error"]))
        worst = max(error, key=lambda c: np.nanmean(error[c]))
        for uncertainty in dict.fromkeys(r["uncertainty"] for r in along):
            within = {}
            for r in along:
                if r["uncertainty"] == uncertainty:
                    within.setdefault(int(r["n"]), []).append(float(r["corr_std_error_within"]))
            z = [float(r["mean_z_std"]) for r in classes if (r["class"], r["uncertainty"]) == (worst, uncertainty)]
            rows.append({"world": world, "backbone": backbone, "option": option, "uncertainty": uncertainty,
                         "corr_all": float(np.nanmean(within[1])), "corr_top": float(np.nanmean(within[8])),
                         "most_overrated": worst, "its_error": float(np.nanmean(error[worst])),
                         "its_z_std": float(np.nanmean(z))})  # fmt: skip
    return rows


def write_markdown(path: Path, rows: list[dict], scale: str, seeds: list[int], diagnostics=()) -> None:
    lines = [
        f"# Uncertainty study ({scale} scale, seeds {seeds})",
        "",
        "Gold reward at the largest n and at the best n (mean ± std over seeds); Δ = paired difference to MAP (same "
        "seed, same run). LA-type rows: k chosen per seed on validation prompts (never reported; the picked k per seed "
        "in the last column). Penalty `std-prompt` / `var-prompt`: k relative to each prompt's spreads. `LA-rel`: the "
        "relative variance. MAP and Ens are the same for every option but `gridsearch`, whose MAP trains without the "
        "grid search's held-out pairs.",
    ]
    f = lambda r, name: f"{r[name + '_mean']:+.3f} ± {r[name + '_std']:.3f}"  # noqa: E731
    panels = list(dict.fromkeys((r["world"], r["backbone"], r["n_max"]) for r in rows))
    lines += ["", "## Overview: Δ gold at the largest n, against MAP", "",
              "| option | method | penalty | " + " | ".join(f"{w} / {b} (n={n})" for w, b, n in panels) + " |",
              "|---|---|---|" + "---|" * len(panels)]  # fmt: skip
    cells = {(r["option"], r["method"], r["penalty"], r["world"], r["backbone"]): f(r, "delta_last") for r in rows}
    for option, method, penalty in dict.fromkeys((r["option"], r["method"], r["penalty"]) for r in rows):
        values = [cells.get((option, method, penalty, w, b), "") for w, b, _ in panels]
        lines.append(f"| {option} | {method} | {penalty} | " + " | ".join(values) + " |")
    g = lambda r, name: "" if r[name + "_mean"] != r[name + "_mean"] else f(r, name)  # noqa: E731  (NaN: no reference)
    for world, backbone, n_max in panels:
        baseline = next((r["best_baseline"] for r in rows if (r["world"], r["backbone"]) == (world, backbone)), "")
        lines += ["", f"## world `{world}`, proxy backbone `{backbone}` (largest n = {n_max})", "",
                  f"Best typicality baseline (on validation): {baseline or 'not run'}. Δ: paired differences to MAP at "
                  "the largest n, at the best n, and of the largest n to MAP at its best n; to Prior-rel (same penalty) "
                  "and to the best baseline, at the largest and at the best n.", "",
                  "| option | method | penalty | gold at largest n | Δ at largest n | best gold | Δ best | Δ vs MAP's "
                  "best n | Δ Prior-rel | Δ Prior-rel best | Δ baseline | Δ baseline best | k per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if (r["world"], r["backbone"]) == (world, backbone):
                lines.append(f"| {r['option']} | {r['method']} | {r['penalty']} | {f(r, 'gold_last')} | "
                             f"{f(r, 'delta_last')} | {f(r, 'gold_best')} | {f(r, 'delta_best')} | "
                             f"{f(r, 'delta_map_best_n')} | {g(r, 'delta_prior_last')} | {g(r, 'delta_prior_best')} | "
                             f"{g(r, 'delta_baseline_last')} | {g(r, 'delta_baseline_best')} | {r['ks']} |")  # fmt: skip
    if diagnostics:
        lines += ["", "## Does the uncertainty flag the exploit? (member 0 of each seed, mean over seeds)", "",
                  "`corr all` / `corr top 1/8`: within-prompt correlation of the std with the proxy's error z(proxy) - "
                  "z(gold), over all samples / among each prompt's top 1/8 by the proxy. Last columns: the class of "
                  "responses the proxy overrates most, its mean error, and its std z-scored within its prompt (> 0: "
                  "penalized more than the prompt's typical sample).", "",
                  "| world | backbone | option | uncertainty | corr all | corr top 1/8 | most overrated | its error | "
                  "its z-std |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for d in diagnostics:
            lines.append(f"| {d['world']} | {d['backbone']} | {d['option']} | {d['uncertainty']} | {d['corr_all']:+.3f} "
                         f"| {d['corr_top']:+.3f} | {d['most_overrated']} | {d['its_error']:+.3f} | "
                         f"{d['its_z_std']:+.3f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], penalty: str = "std") -> None:
    """Δ gold vs MAP at the largest n (mean ± std over seeds), one panel per world x backbone, the same rows in each:
    every option's LA and LA-rel with `penalty` (k in absolute units, chosen on validation), then Ens, LA-Ens,
    LA-Ens-rel and the typicality baselines. `study.md` has every penalty and scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["world"], r["backbone"], r["n_max"]) for r in rows))
    wanted = lambda r: r["penalty"] == penalty or r["method"] == "Ens"  # noqa: E731
    methods, options = ["LA", "LA-rel", "Ens", "LA-Ens", "LA-Ens-rel", *BASELINES], ["", *OPTIONS]
    keys = sorted({(r["method"], r["option"]) for r in rows if wanted(r) and r["method"] in methods},
                  key=lambda key: (methods.index(key[0]), options.index(key[1])))  # fmt: skip
    labels = [f"{method} ({option or 'MAP ensemble'})" for method, option in keys]
    colors = {"LA": "tab:blue", "LA-rel": "tab:green", "Ens": "tab:gray", "LA-Ens": "tab:purple",
              "LA-Ens-rel": "tab:olive", "Prior-rel": "tab:cyan", "Hidden-Euc": "tab:orange",
              "Hidden-Maha": "tab:red", "SFT-NLL": "tab:brown"}  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.28 * len(labels) + 1.8), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, (world, backbone, n_max) in zip(axes[0], panels, strict=True):
        cells = {f"{r['method']} ({r['option'] or 'MAP ensemble'})": r for r in rows
                 if (r["world"], r["backbone"]) == (world, backbone) and wanted(r)}  # fmt: skip
        for y, label in enumerate(labels):
            if label in cells:
                r = cells[label]
                ax.barh(y, r["delta_last_mean"], xerr=r["delta_last_std"], color=colors.get(r["method"], "k"),
                        alpha=0.85, error_kw={"lw": 0.8})  # fmt: skip
            else:
                ax.text(0, y, "  not run", va="center", fontsize=7, color="gray")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{world} world, {backbone} proxy\ngold at n={n_max} minus MAP's", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].invert_yaxis()  # once: the panels share the y axis
    fig.suptitle(f"Best-of-n: gold gained over MAP by each method and posterior option ('{penalty}' penalty, k chosen "
                 "on validation prompts; mean ± std over seeds)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# `PenalizedReward(uncertainty=...)` of each bon.py method a single reward model runs: the candidates of the defaults.
SINGLE_MODEL_OPTIONS = METHOD_UNCERTAINTIES


def choose_defaults(run_dirs: dict[tuple[str, str], Path]) -> dict[str, Any]:
    """Issue 16's rule for `PenalizedReward`'s defaults, from validation gold alone (`k_selection.csv` of each panel's
    `default` run, keyed by (world, backbone)):

    1. the option (method's uncertainty, penalty, scale) with the best mean over panels of its per-panel mean
       validation gold at the largest n, k chosen per seed on validation; options missing from a panel are left out;
    2. k: the value of the base grid (`added` False: fixed before the run) with the best validation gold pooled over
       every panel and seed; the grid's extensions ran only where a seed hit an edge, so they are not pooled.

    Returns the ranking `options` (best first), the `pick`, its `k`, the pooled gold per base-grid k (`ks`), and, for
    the report only (never for the choice), `reported`: per panel, the reported prompts' gold at the largest n of the
    pick at that fixed k and of MAP, each a list over seeds (`bon_results.csv`)."""
    panels: dict[tuple[str, str], dict[str, float]] = {}
    pooled: dict[tuple[str, str], dict[float, list[float]]] = {}
    for panel, run_dir in run_dirs.items():
        chosen: dict[tuple[str, str], list[float]] = {}
        for row in read_csv(run_dir / "k_selection.csv"):
            if row["method"] not in SINGLE_MODEL_OPTIONS:
                continue
            option, gold = (row["method"], row["penalty"]), float(row["validation_gold_at_max_n"])
            if row["chosen"] == "True":
                chosen.setdefault(option, []).append(gold)
            if row.get("added", "False") == "False":
                pooled.setdefault(option, {}).setdefault(float(row["k"]), []).append(gold)
        for option, golds in chosen.items():
            panels.setdefault(option, {})[f"{panel[0]}/{panel[1]}"] = sum(golds) / len(golds)
    complete = {option: by_panel for option, by_panel in panels.items() if len(by_panel) == len(run_dirs)}
    if not complete:
        raise ValueError(f"No single-model option was selected in every one of the {len(run_dirs)} panels.")
    options = sorted(
        ({"method": m, "penalty": p, "mean": sum(v.values()) / len(v), **v} for (m, p), v in complete.items()),
        key=lambda row: -row["mean"],
    )
    best = options[0]
    ks = {k: sum(golds) / len(golds) for k, golds in sorted(pooled[best["method"], best["penalty"]].items())}
    penalty, _, scale = best["penalty"].partition("-")
    pick = {"uncertainty": SINGLE_MODEL_OPTIONS[best["method"]], "penalty": penalty, "scale": scale or "absolute"}
    k = max(ks, key=ks.get)
    reported = {}
    for (world, backbone), run_dir in run_dirs.items():
        rows = read_csv(run_dir / "bon_results.csv")
        largest = max(int(row["n"]) for row in rows)
        gold = {
            name: [float(r["gold_reward"]) for r in rows if int(r["n"]) == largest and match(r)]
            for name, match in (
                (
                    "default",
                    lambda r: (r["method"], r["penalty"], float(r["k"])) == (best["method"], best["penalty"], k),
                ),
                ("MAP", lambda r: r["method"] == "MAP"),
            )
        }
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == "MAP":
                by_n.setdefault(int(r["n"]), []).append(float(r["gold_reward"]))
        gold["MAP at its best n"] = max(by_n.values(), key=mean)  # the n with the best mean gold over seeds
        reported[f"{world}/{backbone}"] = gold
    return {"options": options, "pick": pick, "k": k, "ks": ks, "reported": reported}


def write_defaults(path: Path, defaults: dict[str, Any]) -> None:
    """`defaults.md`: the rule's ranking and pick, for the README and `penalties.DEFAULT_*`."""
    pick, panels = defaults["pick"], [key for key in defaults["options"][0] if "/" in key]
    lines = [
        "# PenalizedReward defaults by issue 16's rule (validation gold only)",
        "",
        f"Pick: `uncertainty={pick['uncertainty']!r}`, `penalty={pick['penalty']!r}`, `scale={pick['scale']!r}`, "
        f"`k={defaults['k']}`.",
        "",
        "Base-grid k, validation gold pooled over panels and seeds: "
        + ", ".join(f"k={k}: {gold:.3f}" for k, gold in defaults["ks"].items()),
        "",
        "Reported prompts, gold at the largest n (mean ± std over seeds; for the record, not used by the rule):",
        "",
        "| panel | default at fixed k | MAP | MAP at its best n | Δ to MAP | Δ to MAP at its best n |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {panel} | "
            + " | ".join(
                f"{mean(g[name]):.2f} ± {pstdev(g[name]):.2f}" for name in ("default", "MAP", "MAP at its best n")
            )
            + f" | {mean(g['default']) - mean(g['MAP']):+.2f} | {mean(g['default']) - mean(g['MAP at its best n']):+.2f} |"
            for panel, g in defaults["reported"].items()
        ),
        "",
        "Validation gold at the largest n, k chosen per seed on validation, per panel:",
        "",
        "| method | penalty | mean | " + " | ".join(panels) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in panels) + " |",
    ]
    for row in defaults["options"]:
        lines.append(
            f"| {row['method']} | {row['penalty']} | {row['mean']:.3f} | "
            + " | ".join(f"{row[p]:.2f}" for p in panels)
            + " |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="default")
    parser.add_argument("--output_dir", default=None, help="Default: outputs/study-<scale>.")
    parser.add_argument("--worlds", nargs="+", choices=WORLDS, default=list(WORLDS))
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Default: the scale's.")
    parser.add_argument("--dry_run", action="store_true", help="Print the runs and stop.")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    seeds = args.seeds or scale["seeds"]
    output_dir = Path(args.output_dir or f"outputs/study-{args.scale}").resolve()
    plan = [(w, b, o) for b in args.backbones for w in args.worlds for o in args.options]
    runs = {}
    for world, backbone, option in plan:
        run_dir = output_dir / "runs" / world / backbone / option
        flags = [*BACKBONES[backbone], "--world", world, "--output_dir", str(run_dir),
                 "--seeds", *map(str, seeds), *COMMON, *scale["flags"][backbone], *OPTION_FLAGS[option == "default"],
                 *OPTIONS[option]]  # fmt: skip
        runs[world, backbone, option] = (run_dir, flags)
    if args.dry_run:
        for _run_dir, flags in runs.values():
            print("python recipes/bon.py " + " ".join(flags))
        return
    record_path = output_dir / "runs.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for (world, backbone, option), (run_dir, flags) in runs.items():
        print(f"[study] {world} / {backbone} / {option}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A world's runs share its stages per backbone: the backbones' scales differ, and so do their samples.
        seconds = run_bon(run_dir, flags, output_dir / "shared" / world / backbone)
        key = f"{world}/{backbone}/{option}"
        if seconds or key not in record:
            record[key] = {"flags": flags, "seconds": seconds}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[study]   {seconds:.0f} s", flush=True)
    # The table covers every finished run of this study folder with these seeds, not only this invocation's: a study
    # run in parts (e.g. one backbone at a time) ends with one table.
    finished = {}
    for world in WORLDS:
        for backbone in BACKBONES:
            for option in OPTIONS:
                run_dir = output_dir / "runs" / world / backbone / option
                if (run_dir / "k_selection.csv").is_file() and {int(r["seed"]) for r in read_csv(
                        run_dir / "bon_results.csv")} == set(seeds):  # fmt: skip
                    finished[world, backbone, option] = run_dir
    results = {key: run_results(run_dir, seeds) for key, run_dir in finished.items()}
    rows = table_rows(results, seeds)
    with (output_dir / "study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    diagnostics = diagnostics_rows(finished)
    with (output_dir / "study_diagnostics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(diagnostics[0]))
        writer.writeheader()
        writer.writerows(diagnostics)
    write_markdown(output_dir / "study.md", rows, args.scale, seeds, diagnostics)
    plot(output_dir / "study.png", rows)
    default_runs = {(w, b): run_dir for (w, b, option), run_dir in finished.items() if option == "default"}
    if default_runs:
        write_defaults(output_dir / "defaults.md", choose_defaults(default_runs))
        print((output_dir / "defaults.md").read_text())
    total = sum(r["seconds"] for r in record.values())
    print((output_dir / "study.md").read_text())
    print(f"[study] {len(runs)} runs, {total:.0f} s of bon.py in all; results in {output_dir}")


if __name__ == "__main__":
    main()
