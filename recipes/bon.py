"""Best-of-N with Bayesian reward models: the paper's BoN experiment (Yang et al. 2024, Fig. 2), end to end.

The recipe, in stages (each cached under `<output_dir>/cache/`, so a run killed mid-way resumes where it stopped):

1. world: instructions, a tokenizer, and the SFT policy (offline default: `trl_bayes.synthetic`, trained here);
2. preference pairs: two samples of the SFT policy per training instruction, labelled by the gold reward (with
   `label_noise`), plus noiseless held-out pairs for the diagnostics;
3. proxies: for each seed, an ensemble of `ensemble_size` LoRA reward models (MAP, TRL's `RewardTrainer`) each with
   its Laplace posterior (`BayesianRewardTrainer`); member 0 of each seed is that seed's MAP / LA model;
4. samples: `num_samples` (N) completions per held-out prompt (P), drawn once (`BestOfNSampler`);
5. scores: the gold reward and every proxy's (mean, var) on every sample, once;
6. curves: the unbiased Best-of-n estimator gives proxy and gold reward vs KL_bon = log n - (n-1)/n for each method
   (MAP, LA, Ens, Ens-WCO, Ens-UWO, LA-Ens; std and var penalties, a few k), written to `bon_results.csv`,
   `bon_curves.png` and `summary.md`, with the uncertainty diagnostics in `diagnostics.md` / `bon_diagnostics.png`.

    accelerate launch recipes/bon.py                                     # offline default (recipes/configs/bon.yaml)
    accelerate launch recipes/bon.py --seeds 0 1 2 3 4 --output_dir outputs/bon5
    python recipes/bon.py --num_eval_prompts 8 --num_samples 64 --output_dir /tmp/bon   # a quick look
    accelerate launch --multi_gpu --num_processes 2 recipes/bon.py --use_cpu true       # two CPU processes
    accelerate launch recipes/bon.py --config recipes/configs/bon_pythia_alpacafarm.yaml  # paper scale, GPUs + Hub
    python recipes/bon.py --config recipes/configs/bon_pythia_alpacafarm.yaml --dry_run true  # print the plan only

The k values of the penalties are fixed in the config before any result is seen; the recipe reports every k.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from world_stages import (
    Stage,
    StageClock,
    WorldArguments,
    build_world,
    check_output_dir,
    generation_config,
    load_gold_reward,
    load_policy,
    make_accelerator,
    normalize_lora_targets,
    recipe_parser,
    sample_pairs,
    train_proxies,
    with_default_config,
    world_settings,
    write_csv,
    write_run_record,
)

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPE_DIR / "configs" / "bon.yaml"
METHODS = ("MAP", "LA", "Ens", "Ens-WCO", "Ens-UWO", "LA-Ens")
LAPLACE_PENALTIES = ("std", "var")
ENSEMBLE_METHODS = ("Ens", "Ens-WCO", "Ens-UWO", "LA-Ens")
# Summary stage name -> its cache folders (for the time their results took to compute).
STAGE_CACHES = {
    "world + SFT policy": ["world/seconds.json"],
    "preference pairs": ["pairs/seconds.json"],
    "proxies (MAP + Laplace fit)": ["proxies/*/seconds.json"],
    "Best-of-N samples": ["samples/seconds.json"],
    "scores (gold + proxies)": ["scores/*/seconds.json"],
}
CSV_COLUMNS = ["method", "penalty", "k", "seed", "n", "kl", "proxy_reward", "gold_reward"]


@dataclass
class BoNScriptArguments(WorldArguments):
    """Arguments of the Best-of-N recipe: the world's (`WorldArguments`, recipes/world_stages.py) and the ones below,
    beside the proxy's training (`BayesianRewardConfig`) and model/LoRA (`trl.ModelConfig`) arguments.

    Parameters that control Best-of-N:
        num_eval_prompts (P), num_samples (N), ns, max_new_tokens, temperature, top_k, top_p.
        methods, penalties, ks, uwo_ks, plot_k: what the curves cover; `plot_k` is the k drawn in `bon_curves.png`
            (every k goes to the CSV and the summary).
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
    ks: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "LA / LA-Ens strengths."})
    uwo_ks: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "Ens-UWO strengths."})
    plot_k: float = field(default=1.0, metadata={"help": "The k drawn in bon_curves.png."})
    dry_run: bool = field(default=False, metadata={"help": "Check the config, print the plan, and stop."})

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
        if self.plot_k not in self.ks:
            raise ValueError(f"--plot_k {self.plot_k} is not one of --ks {self.ks}.")


# ---------------------------------------------------------------------------------------------------------------------
# Best-of-N stages


def sample_best_of_n(args, eval_prompts, policy_path, cache, accelerator) -> list[list[str]]:
    """N completions per held-out prompt, (P, N). Sampled in blocks of `sample_block_prompts` prompts, each cached as
    soon as it is done: at the paper's scale (12.5M samples) a crash must not lose days of sampling."""
    from trl_bayes import BestOfNSampler

    key = {"world": world_settings(args), "N": args.num_samples, "seed": args.sampling_seed}
    key["batch"] = [args.prompt_batch_size, args.generation_batch_size, args.sample_block_prompts]
    key["generation"] = [args.max_new_tokens, args.temperature, args.top_k, args.top_p]
    stage = Stage(cache, "samples", key)
    blocks = list(range(0, len(eval_prompts), args.sample_block_prompts))
    block_file = lambda b: stage.path / f"block{b:05d}.json"  # noqa: E731
    if not stage.done:
        if accelerator.is_main_process and not stage.partial:
            stage.start()  # a folder from other settings is cleared; one from these settings keeps its blocks
        accelerator.wait_for_everyone()
        policy, tokenizer = load_policy(policy_path, accelerator.device)
        for b, first in enumerate(blocks):
            if block_file(b).is_file():
                continue
            # Each block draws from its own seed: the samples do not depend on which blocks a resumed run redoes.
            sampler = BestOfNSampler(
                policy, tokenizer, n=args.num_samples, generation_config=generation_config(args),
                prompt_batch_size=args.prompt_batch_size, generation_batch_size=args.generation_batch_size,
                seed=args.sampling_seed + 7919 * b, accelerator=accelerator,
            )  # fmt: skip
            block_prompts = eval_prompts[first : first + args.sample_block_prompts]
            completions, finished = sampler.generate(block_prompts, return_finished=True)
            if accelerator.is_main_process:
                record = {"completions": completions, "finished": finished.tolist()}
                tmp = block_file(b).with_suffix(".tmp")
                tmp.write_text(json.dumps(record))
                tmp.rename(block_file(b))  # atomic: a block file is complete or absent
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stage.finish()
        accelerator.wait_for_everyone()
    return [c for b in range(len(blocks)) for c in json.loads(block_file(b).read_text())["completions"]]


def score_sharded(score_fn, prompts: list[str], completions: list[str], state) -> list:
    """`score_fn(prompts, completions)` -> list of per-response records, split over processes and gathered."""
    from accelerate.utils import gather_object

    indices = list(range(len(prompts)))
    with state.split_between_processes(indices) as local:
        local = list(local)
        records = score_fn([prompts[i] for i in local], [completions[i] for i in local]) if local else []
    return gather_object(records) if state.num_processes > 1 else records


def unique_responses(prompts: list[str], completions: list[list[str]]):
    """Distinct (prompt, completion) pairs and, per (p, j), the index of its distinct pair: sampled lists repeat."""
    index: dict[tuple[str, str], int] = {}
    inverse = [
        [index.setdefault((p, c), len(index)) for c in row] for p, row in zip(prompts, completions, strict=True)
    ]
    return list(index), inverse


def score_samples(args, eval_prompts, completions, held_out, members, gold, cache, state):
    """Gold (P, N), and per proxy (mean, var) of shape (P, N) plus held-out pair differences (mean, var)."""
    import numpy as np

    from trl_bayes import BayesianRewardModel

    distinct, inverse = unique_responses(eval_prompts, completions)
    inverse = np.asarray(inverse)
    u_prompts, u_completions = [p for p, _ in distinct], [c for _, c in distinct]
    state.print(f"[scores] {len(distinct)} distinct responses out of {inverse.size}")
    # Scores follow the samples they were computed on: the samples stage's key (world, N, seeds, batching).
    samples_key = {"samples": json.loads((cache / "samples" / "done.json").read_text())}
    stage = Stage(cache / "scores", "gold", {**samples_key, "gold": args.gold_reward})
    if not stage.done:
        scores = score_sharded(lambda p, c: list(gold(prompts=p, completions=c)), u_prompts, u_completions, state)
        if state.is_main_process:
            stage.start()
            np.save(stage.path / "gold.npy", np.asarray(scores, dtype=np.float64))
            stage.finish()
        state.wait_for_everyone()
    gold_scores = np.load(stage.path / "gold.npy")[inverse]

    proxies = {}
    for (s, j), member_dir in members.items():
        key = {**samples_key, "member": json.loads((member_dir / "done.json").read_text())}
        stage = Stage(cache / "scores", f"seed{s}-member{j}", key)
        if not stage.done:
            model = BayesianRewardModel.from_pretrained(member_dir, device=state.device)

            def predict(p, c, model=model):
                mean, var = model.predict(p, c, batch_size=args.score_batch_size, progress_bar=state.is_main_process)
                return list(zip(mean.tolist(), var.tolist(), strict=True))

            def predict_pairs(p, pairs, model=model):
                chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
                mean, var = model.predict_pairs(p, chosen, rejected, batch_size=args.score_batch_size)
                return list(zip(mean.tolist(), var.tolist(), strict=True))

            records = score_sharded(predict, u_prompts, u_completions, state)
            pairs = list(zip(held_out["chosen"], held_out["rejected"], strict=True))
            pair_records = score_sharded(predict_pairs, held_out["prompt"], pairs, state)
            if state.is_main_process:
                stage.start()
                values, pair_values = np.asarray(records, dtype=np.float64), np.asarray(pair_records, dtype=np.float64)
                np.savez(stage.path / "scores.npz", mean=values[:, 0], var=values[:, 1],
                         pair_mean=pair_values[:, 0], pair_var=pair_values[:, 1])  # fmt: skip
                stage.finish()
            state.wait_for_everyone()
        data = np.load(stage.path / "scores.npz")
        proxies[s, j] = {
            "mean": data["mean"][inverse],
            "var": np.clip(data["var"][inverse], 0.0, None),
            "pair_mean": data["pair_mean"],
            "pair_var": data["pair_var"],
        }
    return gold_scores, proxies


# ---------------------------------------------------------------------------------------------------------------------
# Curves and diagnostics (main process)


def method_specs(args: BoNScriptArguments) -> list[tuple[str, str, float]]:
    """(method, penalty, k) of every curve, in the order of the table."""
    specs: list[tuple[str, str, float]] = []
    for method in args.methods:
        if method == "MAP":
            specs.append(("MAP", "none", 0.0))
        elif method == "Ens":
            specs.append(("Ens", "mean", 0.0))
        elif method == "Ens-WCO":
            specs.append(("Ens-WCO", "wco", 0.0))
        elif method == "Ens-UWO":
            specs.extend(("Ens-UWO", "uwo", k) for k in args.uwo_ks)
        else:  # LA, LA-Ens
            specs.extend((method, p, k) for p in args.penalties for k in args.ks)
    return specs


def method_scores(method: str, penalty: str, k: float, members: list[dict]) -> tuple:
    """(rank scores, proxy scores) of shape (P, N) for one method over one seed's ensemble (member 0 = MAP / LA).

    The proxy score is the method's unpenalized reward: the member's MAP reward, or the ensemble's mean.
    """
    import numpy as np
    import torch

    from trl_bayes import penalized_reward

    used = members[:1] if method in ("MAP", "LA") else members
    shape = used[0]["mean"].shape
    means = torch.from_numpy(np.stack([m["mean"].ravel() for m in used]))
    variances = torch.from_numpy(np.stack([m["var"].ravel() for m in used]))
    torch_penalty = {"none": "none", "mean": "none", "wco": "wco", "uwo": "uwo"}.get(penalty, penalty)
    rank = penalized_reward(means, variances, torch_penalty, k).numpy().reshape(shape)
    proxy = means.mean(0).numpy().reshape(shape)
    return rank, proxy


def compute_curves(args, gold_scores, proxies) -> list[dict[str, Any]]:
    from trl_bayes import best_of_n_estimate, kl_best_of_n

    rows = []
    for seed in args.seeds:
        members = [proxies[seed, j] for j in range(args.ensemble_size)]
        for method, penalty, k in method_specs(args):
            rank, proxy = method_scores(method, penalty, k, members)
            gold_curve = best_of_n_estimate(rank, gold_scores, args.ns)
            proxy_curve = best_of_n_estimate(rank, proxy, args.ns)
            for n, g, p in zip(args.ns, gold_curve, proxy_curve, strict=True):
                rows.append({"method": method, "penalty": penalty, "k": k, "seed": seed, "n": n,
                             "kl": float(kl_best_of_n(n)), "proxy_reward": float(p), "gold_reward": float(g)})  # fmt: skip
    return rows


def curve_label(method: str, penalty: str, k: float) -> str:
    return method if penalty in ("none", "mean", "wco") else f"{method} ({penalty}, k={k:g})"


def aggregate(rows: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    """Per (method, penalty, k): gold at the largest n and at the best n, mean and std over seeds."""
    import numpy as np

    table = []
    for method, penalty, k in method_specs(args):
        mine = [r for r in rows if (r["method"], r["penalty"], r["k"]) == (method, penalty, k)]
        gold = np.array([[r["gold_reward"] for r in mine if r["seed"] == s] for s in args.seeds])  # (seeds, ns)
        proxy = np.array([[r["proxy_reward"] for r in mine if r["seed"] == s] for s in args.seeds])
        best = gold.max(axis=1)
        best_n = [args.ns[i] for i in gold.argmax(axis=1)]
        table.append({
            "label": curve_label(method, penalty, k), "method": method, "penalty": penalty, "k": k,
            "gold_last": gold[:, -1], "gold_best": best, "best_n": best_n, "proxy_last": proxy[:, -1],
        })  # fmt: skip
    return table


def plot_curves(path: Path, rows: list[dict[str, Any]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for method, penalty, k in method_specs(args):
        if method in ("LA", "LA-Ens", "Ens-UWO") and k != (args.plot_k if method != "Ens-UWO" else args.uwo_ks[0]):
            continue
        mine = [r for r in rows if (r["method"], r["penalty"], r["k"]) == (method, penalty, k)]
        kl = np.array([r["kl"] for r in mine if r["seed"] == args.seeds[0]])
        style = "--" if penalty == "var" else "-"
        for ax, column in zip(axes, ("proxy_reward", "gold_reward"), strict=True):
            values = np.array([[r[column] for r in mine if r["seed"] == s] for s in args.seeds])
            if column == "proxy_reward":
                # A Bradley-Terry reward has an arbitrary offset per model: plot each seed's gain over n = 1.
                values = values - values[:, :1]
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(kl, mean, style, marker=".", label=curve_label(method, penalty, k))
            ax.fill_between(kl, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    titles = ("proxy reward gain over n = 1 (method's own reward, unpenalized)", "gold reward")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("KL(best-of-n || policy) = log n - (n-1)/n  [nats]")
        ax.set_title(f"{title}\nmean ± std over seeds {args.seeds}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Best-of-n, {args.num_eval_prompts} prompts x {args.num_samples} samples (n = {args.ns[0]}..{args.ns[-1]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnostics(args, gold_scores, proxies, held_out) -> tuple[list[dict], list[dict]]:
    """Held-out pair metrics of MAP vs LA per seed, and std-vs-error correlations along n on the BoN samples."""
    import numpy as np
    import torch

    from trl_bayes.diagnostics import pair_metrics, uncertainty_along_n

    # The held-out pairs are noiseless; which response is chosen is the gold's verdict.
    pair_rows, along_n = [], []
    for seed in args.seeds:
        member = proxies[seed, 0]
        metrics = pair_metrics(torch.from_numpy(member["pair_mean"]), torch.from_numpy(member["pair_var"]))
        pair_rows.append({"seed": seed, **metrics})
        for row in uncertainty_along_n(member["mean"], np.sqrt(member["var"]), gold_scores, args.ns):
            along_n.append({"seed": seed, **row})
    return pair_rows, along_n


def plot_diagnostics(path: Path, along_n: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed in args.seeds:
        mine = [r for r in along_n if r["seed"] == seed]
        ns = [r["n"] for r in mine]
        axes[0].plot(ns, [r["corr_std_error"] for r in mine], marker=".", label=f"seed {seed}")
        axes[1].plot(ns, [r["mean_error"] for r in mine], marker=".", label=f"seed {seed}")
    axes[0].set_title("corr(LA std, proxy error) among each prompt's top N/n")
    axes[1].set_title("mean proxy error z(proxy) - z(gold), same responses")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(values) -> str:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def write_summary(path: Path, args, table, pair_rows, along_n, seconds, computed_seconds, sources) -> None:
    import numpy as np

    lines = [
        "# Best-of-N with Bayesian reward models",
        "",
        f"- policy: {sources['policy']}; gold reward: {sources['gold']}",
        f"- proxies: {sources['proxy']}, {args.num_train_pairs} training pairs ({args.label_noise:.0%} labels "
        f"flipped), {args.ensemble_size} members per ensemble, seeds {args.seeds}",
        f"- Best-of-n: {args.num_eval_prompts} held-out prompts x {args.num_samples} samples, n = {args.ns[0]}..{args.ns[-1]},"
        " unbiased estimator (every n from one set of samples)",
        f"- penalty strengths fixed in the config before the run: k in {args.ks} (LA, LA-Ens), {args.uwo_ks} (Ens-UWO)",
        "",
        f"## Gold reward (mean ± std over {len(args.seeds)} seeds)",
        "",
        f"| method | gold at n={args.ns[-1]} | best gold over n | best n (per seed) | proxy at n={args.ns[-1]} |",
        "|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['label']} | {fmt(t['gold_last'])} | {fmt(t['gold_best'])} | {t['best_n']} | {fmt(t['proxy_last'])} |"
        )
    mp = next((t for t in table if t["method"] == "MAP"), None)
    if mp is not None:
        lines += ["", f"MAP overoptimization: gold at the best n minus gold at n={args.ns[-1]} = "
                  f"{fmt(mp['gold_best'] - mp['gold_last'])} (positive: gold falls while the proxy rises)."]  # fmt: skip
    lines += ["", "## Held-out pairs (noiseless gold labels): MAP vs LA (each seed's member 0)", "",
              "| seed | accuracy | BT NLL MAP | BT NLL LA | ECE MAP | ECE LA |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in pair_rows:
        lines.append(f"| {r['seed']} | {r['map_accuracy']:.3f} | {r['map_nll']:.4f} | {r['laplace_probit_nll']:.4f} | "
                     f"{r['map_ece']:.4f} | {r['laplace_ece']:.4f} |")  # fmt: skip
    lines += ["", "## Does the LA std flag the proxy's errors? (BoN samples, each seed's member 0)", "",
              "Correlation between the LA std and the proxy's error z(proxy) - z(gold), among each prompt's top",
              "ceil(N/n) samples by the MAP proxy (n = 1: all samples); positive = the penalty hits overrated responses.",
              "", "| n | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean error |",
              "|---|" + "---|" * (len(args.seeds) + 1)]  # fmt: skip
    for n in args.ns:
        mine = [r for r in along_n if r["n"] == n]
        cells = " | ".join(f"{r['corr_std_error']:+.3f}" for r in mine)
        lines.append(f"| {n} | {cells} | {np.mean([r['mean_error'] for r in mine]):+.3f} |")
    lines += ["", "## Time per stage (s)", "",
              "`this run`: wall time here (a cached stage only loads); `computed`: the time its cached results took",
              "when they were computed (`cache/*/seconds.json`).", "",
              "| stage | this run | computed |", "|---|---|---|"]  # fmt: skip
    for stage, value in seconds.items():
        computed = computed_seconds.get(stage)
        lines.append(f"| {stage} | {value:.1f} | {'' if computed is None else f'{computed:.1f}'} |")
    lines += ["", "Files: `bon_results.csv`, `bon_curves.png`, `bon_diagnostics.csv`, `bon_diagnostics.png`, "
              "`pair_metrics.csv`, cached stages in `cache/`."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------


def describe_plan(args, training_args, model_args) -> list[str]:
    """What each stage will load or build, from the config alone (no download)."""
    policy = args.policy_name_or_path or "offline tiny GPT-NeoX SFT policy (trained here)"
    return [
        f"world: {'offline world, seed ' + str(args.world_seed) if args.offline else args.prompts_dataset_name}"
        f" -> {args.num_eval_prompts} held-out prompts",
        f"policy: {policy}",
        f"gold reward: {args.gold_reward}",
        f"pairs: {args.num_train_pairs} sampled + gold-labelled ({args.label_noise:.0%} flipped), "
        f"{args.num_eval_pairs} held out",
        f"proxies: {model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r} "
        f"alpha={model_args.lora_alpha}, {training_args.hessian_structure} Laplace, "
        f"{len(args.seeds)} seeds x {args.ensemble_size} members",
        f"samples: {args.num_eval_prompts} x {args.num_samples} (max_new_tokens={args.max_new_tokens})",
        f"curves: n in {args.ns}; methods {args.methods}; penalties {args.penalties}; k {args.ks}",
    ]


def main(args: BoNScriptArguments, training_args, model_args) -> None:
    import datasets
    import transformers

    # One progress bar per stage is what a user wants to see, not a load report for each of a dozen proxies.
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    plan = describe_plan(args, training_args, model_args)
    output_dir = check_output_dir(training_args.output_dir)
    missing = args.missing_local_paths()
    if args.dry_run:
        print("\n".join(["Best-of-N plan:", *plan, *(f"not found here: {m}" for m in missing)]))
        return
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)} (cwd: {Path.cwd()}).")
    # CPU processes talk over gloo; `cpu=use_cpu` keeps a CPU-only launch of several processes a real process group.
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    clock = StageClock()

    cache = output_dir / "cache"
    gold = load_gold_reward(args, accelerator.device)  # before any long work: a bad gold fails here
    train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
    clock.lap("world + SFT policy")
    train_pairs, held_out = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    members = train_proxies(args, training_args, model_args, train_pairs, policy_path, cache, state)
    clock.lap("proxies (MAP + Laplace fit)")
    completions = sample_best_of_n(args, eval_prompts, policy_path, cache, accelerator)
    clock.lap("Best-of-N samples")
    gold_scores, proxies = score_samples(args, eval_prompts, completions, held_out, members, gold, cache, state)
    clock.lap("scores (gold + proxies)")
    if state.is_main_process:
        rows = compute_curves(args, gold_scores, proxies)
        write_csv(output_dir / "bon_results.csv", rows, CSV_COLUMNS)
        plot_curves(output_dir / "bon_curves.png", rows, args)
        pair_rows, along_n = diagnostics(args, gold_scores, proxies, held_out)
        write_csv(output_dir / "pair_metrics.csv", pair_rows, list(pair_rows[0]))
        write_csv(output_dir / "bon_diagnostics.csv", along_n, list(along_n[0]))
        plot_diagnostics(output_dir / "bon_diagnostics.png", along_n, args)
        clock.lap("curves + diagnostics")
        seconds = clock.finish()
        table = aggregate(rows, args)
        sources = {
            "policy": args.policy_name_or_path or "offline SFT policy (tiny GPT-NeoX)",
            "gold": "the offline world's known function" if args.gold_reward == "world" else args.gold_reward,
            "proxy": f"{model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r}, "
            f"{training_args.hessian_structure} Laplace",
        }
        computed = {}
        for stage, patterns in STAGE_CACHES.items():
            files = [f for pattern in patterns for f in cache.glob(pattern)]
            computed[stage] = sum(json.loads(f.read_text()) for f in files) if files else None
        write_summary(output_dir / "summary.md", args, table, pair_rows, along_n, seconds, computed, sources)
        write_run_record(output_dir, args)
        print(f"Results in {output_dir}: bon_results.csv, bon_curves.png, summary.md, diagnostics.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(BoNScriptArguments, "outputs/bon")


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        with_default_config(sys.argv[1:], DEFAULT_CONFIG)
    )
    main(script_args, training_args, model_args)
