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

The k values of the penalties are fixed in the config before any result is seen; the recipe reports every k, and
each seed's choice of k made on the validation prompts (`num_validation_prompts`, never reported).
"""

from __future__ import annotations

import json
import math
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
    run_script,
    sample_pairs,
    train_proxies,
    validation_prompts,
    world_settings,
    write_csv,
    write_run_record,
)

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPE_DIR / "configs" / "bon.yaml"
METHODS = ("MAP", "LA", "LA-rel", "Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel")
LAPLACE_PENALTIES = ("std", "var")
ENSEMBLE_METHODS = ("Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel")
# Methods penalized by the relative variance Var(r_i - mean_j r_j) over the prompt's N candidates (trl_bayes.
# relative_variance); the others by the marginal J Sigma J^T.
RELATIVE_METHODS = ("LA-rel", "LA-Ens-rel")
# Methods with a penalty strength k, chosen per seed on the validation prompts (`k_selection.csv`).
SELECTED_METHODS = ("LA", "LA-rel", "LA-Ens", "LA-Ens-rel")
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
        methods, penalties, ks, uwo_ks, plot_k: what the curves cover; penalty_scales: units of k, `absolute`
            (k * std, the paper's) and/or `prompt` (k * sd_p(r) * std / mean_p(std) within each prompt's N samples,
            `trl_bayes.reward.prompt_scale`; its curves are named `std-prompt` / `var-prompt`); `plot_k` is the k drawn in `bon_curves.png`
            (every k goes to the CSV and the summary). `LA-rel` / `LA-Ens-rel` penalize the relative variance
            Var(r_i - mean_j r_j) over the prompt's N candidates instead of the marginal one.
        num_validation_prompts (in `WorldArguments`): held-out prompts, never reported, on which each seed chooses
            its k from `ks` for LA, LA-rel, LA-Ens and LA-Ens-rel (the best gold at the largest n); those rows are
            marked "k chosen on validation" in the summary.
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
    """Gold (P, N), and per proxy (mean, var[, rel_var]) of shape (P, N) plus held-out pair differences (mean, var).

    `rel_var` (with a relative method in `--methods`) is Var(r_ij - mean_j' r_ij') over prompt i's N samples: each
    process scores whole prompts (their distinct responses, weighted by how often each was drawn), then all gather.
    """
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

    relative = bool(set(args.methods) & set(RELATIVE_METHODS))
    # Per prompt, its distinct responses and how often each was drawn (the weights of the relative variance's mean).
    prompt_rows = [np.unique(row, return_counts=True) for row in inverse]
    proxies, bar = {}, state.is_main_process
    for (s, j), member_dir in members.items():
        key = {**samples_key, "member": json.loads((member_dir / "done.json").read_text()), "relative": relative}
        stage = Stage(cache / "scores", f"seed{s}-member{j}", key)
        if not stage.done:
            model = BayesianRewardModel.from_pretrained(member_dir, device=state.device)

            def predict(p, c, model=model):
                mean, var = model.predict(p, c, batch_size=args.score_batch_size, progress_bar=bar)
                return list(zip(mean.tolist(), var.tolist(), strict=True))

            def predict_pairs(p, pairs, model=model):
                chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
                mean, var = model.predict_pairs(p, chosen, rejected, batch_size=args.score_batch_size)
                return list(zip(mean.tolist(), var.tolist(), strict=True))

            def predict_relative(prompt_indices, model=model):
                rows = np.concatenate([prompt_rows[i][0] for i in prompt_indices]).tolist()
                counts = np.concatenate([prompt_rows[i][1] for i in prompt_indices]).tolist()
                mean, var, rel = model.predict_relative(
                    [u_prompts[u] for u in rows], [u_completions[u] for u in rows],
                    batch_size=args.score_batch_size, weights=counts, progress_bar=bar,
                )  # fmt: skip
                return list(zip(rows, mean.tolist(), var.tolist(), rel.tolist(), strict=True))

            if relative:
                values = np.full((len(distinct), 3), np.nan)
                for u, *record in shard_prompts(predict_relative, len(prompt_rows), state):
                    values[u] = record
            else:
                values = np.asarray(score_sharded(predict, u_prompts, u_completions, state), dtype=np.float64)
            pairs = list(zip(held_out["chosen"], held_out["rejected"], strict=True))
            pair_values = np.asarray(score_sharded(predict_pairs, held_out["prompt"], pairs, state), dtype=np.float64)
            if state.is_main_process:
                stage.start()
                extra = {"rel_var": values[:, 2]} if relative else {}
                np.savez(stage.path / "scores.npz", mean=values[:, 0], var=values[:, 1], **extra,
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
        if relative:
            proxies[s, j]["rel_var"] = np.clip(data["rel_var"][inverse], 0.0, None)
    return gold_scores, proxies


def shard_prompts(score_fn, num_prompts: int, state) -> list:
    """`score_fn(prompt_indices)` -> list of records, with whole prompts split over processes, gathered."""
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(num_prompts))) as local:
        records = score_fn(list(local)) if len(local) else []
    return gather_object(records) if state.num_processes > 1 else records


# ---------------------------------------------------------------------------------------------------------------------
# Curves and diagnostics (main process)


def penalty_labels(args: BoNScriptArguments) -> list[str]:
    """The penalties of the LA methods with their scale: `std`, `var` (absolute k) then `std-prompt`, `var-prompt`."""
    return [p if scale == "absolute" else f"{p}-{scale}" for scale in args.penalty_scales for p in args.penalties]


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
        else:  # LA, LA-rel, LA-Ens, LA-Ens-rel
            specs.extend((method, p, k) for p in penalty_labels(args) for k in args.ks)
    return specs


def method_scores(method: str, penalty: str, k: float, members: list[dict]) -> tuple:
    """(rank scores, proxy scores) of shape (P, N) for one method over one seed's ensemble (member 0 = MAP / LA).

    The proxy score is the method's unpenalized reward: the member's MAP reward, or the ensemble's mean. The relative
    methods penalize with the members' relative variances (`rel_var`), the others with the marginal ones. A penalty
    `std-prompt` / `var-prompt` scales k within each prompt (row), see `trl_bayes.reward.prompt_scale`.
    """
    import numpy as np
    import torch

    from trl_bayes import penalized_reward

    used = members[:1] if method in ("MAP", "LA", "LA-rel") else members
    shape = used[0]["mean"].shape
    means = torch.from_numpy(np.stack([m["mean"].ravel() for m in used]))
    column = "rel_var" if method in RELATIVE_METHODS else "var"
    variances = torch.from_numpy(np.stack([m[column].ravel() for m in used]))
    penalty, _, scale = penalty.partition("-")
    torch_penalty = {"none": "none", "mean": "none", "wco": "wco", "uwo": "uwo"}.get(penalty, penalty)
    groups = torch.arange(shape[0]).repeat_interleave(shape[1])  # row p of the (P, N) arrays: prompt p
    rank = penalized_reward(means, variances, torch_penalty, k, scale or "absolute", groups).numpy().reshape(shape)
    proxy = means.mean(0).numpy().reshape(shape)
    return rank, proxy


def compute_curves(args, gold_scores, proxies, prompts: slice = slice(None)) -> list[dict[str, Any]]:
    """Proxy and gold reward of every method at every n, on the held-out prompts in `prompts` (rows of the arrays)."""
    from trl_bayes import best_of_n_estimate, kl_best_of_n

    gold_scores = gold_scores[prompts]
    rows = []
    for seed in args.seeds:
        members = [{key: value[prompts] for key, value in proxies[seed, j].items() if key in ("mean", "var", "rel_var")}
                   for j in range(args.ensemble_size)]  # fmt: skip
        for method, penalty, k in method_specs(args):
            rank, proxy = method_scores(method, penalty, k, members)
            gold_curve = best_of_n_estimate(rank, gold_scores, args.ns)
            proxy_curve = best_of_n_estimate(rank, proxy, args.ns)
            for n, g, p in zip(args.ns, gold_curve, proxy_curve, strict=True):
                rows.append({"method": method, "penalty": penalty, "k": k, "seed": seed, "n": n,
                             "kl": float(kl_best_of_n(n)), "proxy_reward": float(p), "gold_reward": float(g)})  # fmt: skip
    return rows


def select_ks(args, validation_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, method (LA, LA-rel, LA-Ens, LA-Ens-rel) and penalty: the k of `ks` with the best gold at the largest
    n on the validation prompts (ties: the smaller k). One row per candidate k, `chosen` marking the pick."""
    n_max = args.ns[-1]
    out = []
    for seed in args.seeds:
        for method in [m for m in args.methods if m in SELECTED_METHODS]:
            for penalty in penalty_labels(args):
                gold = {r["k"]: r["gold_reward"] for r in validation_rows
                        if (r["seed"], r["method"], r["penalty"], r["n"]) == (seed, method, penalty, n_max)}  # fmt: skip
                best = max(sorted(gold), key=lambda k: (gold[k], -k))
                out.extend({"seed": seed, "method": method, "penalty": penalty, "k": k,
                            "validation_gold_at_max_n": gold[k], "chosen": k == best} for k in sorted(gold))  # fmt: skip
    return out


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
    colors = {method: plt.cm.tab10(i) for i, method in enumerate(METHODS)}
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
    """On the reported prompts: held-out pair metrics of MAP vs LA per seed; per seed and variance (marginal, and
    relative when scored), the std-vs-proxy-error correlations along n; and the std against the completion's length.

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
        for uncertainty, column in (("marginal", "var"), ("relative", "rel_var")):
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
    """On the reported prompts of an offline world: per seed (member 0) and variance, the std of exploit-like responses
    (`trl_bayes.synthetic.response_classes`: degenerate repetition, very short, very long, off-topic) against typical
    ones, standardized within each prompt (`uncertainty_by_class`), with the proxy's mean error z(proxy) - z(gold) on
    each class. A penalty helps only if the classes the proxy overrates (error > 0) get z-std > 0."""
    import numpy as np

    from trl_bayes.diagnostics import standardize, uncertainty_by_class
    from trl_bayes.synthetic import RESPONSE_CLASSES, response_classes

    classes = [[response_classes(p, c) for c in row] for p, row in zip(prompts, completions, strict=True)]
    masks = {name: np.array([[name in c for c in row] for row in classes]) for name in RESPONSE_CLASSES}
    rows = []
    for seed in args.seeds:
        member = proxies[seed, 0]
        error = standardize(member["mean"]) - standardize(gold_scores)
        for uncertainty, column in (("marginal", "var"), ("relative", "rel_var")):
            if column in member:
                for row in uncertainty_by_class(np.sqrt(member[column]), masks, error):
                    rows.append({"seed": seed, "uncertainty": uncertainty, **row})
    return rows


def plot_diagnostics(path: Path, along_n: list[dict], length_rows: list[dict], args, class_rows=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4 if class_rows else 3, figsize=(21 if class_rows else 16, 4.5))
    uncertainties = list(dict.fromkeys(r["uncertainty"] for r in along_n))
    for uncertainty, style in zip(uncertainties, ("-", "--"), strict=False):
        for ax, column in zip(axes[:2], ("corr_std_error_within", "corr_std_error"), strict=True):
            values = np.array([[r[column] for r in along_n if (r["seed"], r["uncertainty"]) == (s, uncertainty)]
                               for s in args.seeds])  # fmt: skip
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            (line,) = ax.plot(args.ns, mean, style, marker=".", label=f"{uncertainty} std")
            ax.fill_between(args.ns, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        mine = [r for r in length_rows if r["uncertainty"] == uncertainty]
        lengths = sorted({r["words"] for r in mine})
        # Response-weighted mean over seeds of the within-prompt z-scored std, per completion length.
        z = [np.average([r["mean_z_std"] for r in mine if r["words"] == w],
                        weights=[r["num_responses"] for r in mine if r["words"] == w]) for w in lengths]  # fmt: skip
        axes[2].plot(
            lengths,
            z,
            style,
            marker=".",
            label=f"{uncertainty} std (corr {np.mean([r['corr_within'] for r in mine]):+.2f})",
        )
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
            axes[3].bar(np.arange(len(names)) + i * width, z, width, label=f"{uncertainty} std")
        errors = [np.nanmean([r["mean_error"] for r in class_rows if r["class"] == c]) for c in names]
        fractions = [np.mean([r["fraction"] for r in class_rows if r["class"] == c]) for c in names]
        axes[3].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        axes[3].set_xticklabels([f"{c}\n{f:.0%}, err {e:+.2f}" for c, f, e in zip(names, fractions, errors, strict=True)],
                                fontsize=8)  # fmt: skip
        axes[3].set_title("std standardized within its prompt, by kind of response\n(share of samples, proxy error)")
    for ax in axes:
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


def write_summary(path: Path, args, table, selection, pair_rows, along_n, length_rows, seconds, computed_seconds,
                  sources, class_rows=None) -> None:  # fmt: skip
    import numpy as np

    n_max = args.ns[-1]
    lines = [
        "# Best-of-N with Bayesian reward models",
        "",
        f"- policy: {sources['policy']}; gold reward: {sources['gold']}",
        f"- proxies: {sources['proxy']}, {args.num_train_pairs} training pairs ({args.label_noise:.0%} labels "
        f"flipped), {args.ensemble_size} members per ensemble, seeds {args.seeds}",
        f"- Best-of-n: {args.num_eval_prompts} held-out prompts x {args.num_samples} samples, n = {args.ns[0]}..{n_max},"
        " unbiased estimator (every n from one set of samples)",
        f"- penalty strengths fixed in the config before the run: k in {args.ks} (LA, LA-rel, LA-Ens, LA-Ens-rel), "
        f"{args.uwo_ks} (Ens-UWO)",
        f"- `-rel`: penalized by the relative variance Var(r_i - mean_j r_j) over the prompt's {args.num_samples} "
        "samples instead of the marginal variance J Σ J^T",
    ]
    if selection:
        lines.append(f"- 'k chosen on validation': each seed's k from {args.ks} with the best gold at n={n_max} on "
                     f"{args.num_validation_prompts} validation prompts (held out, never reported; `k_selection.csv`)")  # fmt: skip
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
    lines += ["", "## Held-out pairs (noiseless gold labels): MAP vs LA (each seed's member 0)", "",
              "| seed | accuracy | BT NLL MAP | BT NLL LA | ECE MAP | ECE LA |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in pair_rows:
        lines.append(f"| {r['seed']} | {r['map_accuracy']:.3f} | {r['map_nll']:.4f} | {r['laplace_probit_nll']:.4f} | "
                     f"{r['map_ece']:.4f} | {r['laplace_ece']:.4f} |")  # fmt: skip
    uncertainties = list(dict.fromkeys(r["uncertainty"] for r in along_n))
    lines += ["", "## Does the LA std flag the proxy's errors? (BoN samples, each seed's member 0)", "",
              "Correlation between the LA std and the proxy's error z(proxy) - z(gold) among each prompt's top",
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
                  "overrated). Classes overlap (`trl_bayes.synthetic.response_classes`); mean over seeds.", "",
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
    lines += ["", "Files: `bon_results.csv`, `bon_curves.png`, `k_selection.csv`, `bon_diagnostics.csv`, "
              "`bon_length.csv`, `bon_classes.csv`, `bon_diagnostics.png`, `pair_metrics.csv`, cached stages in `cache/`."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------


def describe_plan(args, training_args, model_args) -> list[str]:
    """What each stage will load or build, from the config alone (no download)."""
    policy = args.policy_name_or_path or "offline tiny GPT-NeoX SFT policy (trained here)"
    return [
        f"world: {'offline world, seed ' + str(args.world_seed) if args.offline else args.prompts_dataset_name}"
        f" -> {args.num_eval_prompts} held-out prompts (+ {args.num_validation_prompts} validation prompts for k)",
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
    # Validation prompts are sampled and scored with the reported ones, but only choose k: rows [P:] of the arrays.
    held_prompts = eval_prompts + validation_prompts(args, cache)
    reported, validation = slice(0, len(eval_prompts)), slice(len(eval_prompts), None)
    clock.lap("world + SFT policy")
    train_pairs, held_out = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    members = train_proxies(args, training_args, model_args, train_pairs, policy_path, cache, state)
    clock.lap("proxies (MAP + Laplace fit)")
    completions = sample_best_of_n(args, held_prompts, policy_path, cache, accelerator)
    clock.lap("Best-of-N samples")
    gold_scores, proxies = score_samples(args, held_prompts, completions, held_out, members, gold, cache, state)
    clock.lap("scores (gold + proxies)")
    if state.is_main_process:
        rows = compute_curves(args, gold_scores, proxies, reported)
        write_csv(output_dir / "bon_results.csv", rows, CSV_COLUMNS)
        selection = None
        if args.num_validation_prompts and set(args.methods) & set(SELECTED_METHODS):
            selection = select_ks(args, compute_curves(args, gold_scores, proxies, validation))
            write_csv(output_dir / "k_selection.csv", selection, list(selection[0]))
        plot_curves(output_dir / "bon_curves.png", rows, args, selection)
        reported_proxies = {key: {c: v[reported] if c in ("mean", "var", "rel_var") else v for c, v in member.items()}
                            for key, member in proxies.items()}  # fmt: skip
        pair_rows, along_n, length_rows = diagnostics(
            args, gold_scores[reported], reported_proxies, held_out, completions[reported]
        )
        write_csv(output_dir / "pair_metrics.csv", pair_rows, list(pair_rows[0]))
        write_csv(output_dir / "bon_diagnostics.csv", along_n, list(along_n[0]))
        write_csv(output_dir / "bon_length.csv", length_rows, list(length_rows[0]))
        class_rows = None
        if args.offline and args.gold_reward == "world":
            class_rows = class_diagnostics(args, eval_prompts, gold_scores[reported], reported_proxies,
                                           completions[reported])  # fmt: skip
            write_csv(output_dir / "bon_classes.csv", class_rows, list(class_rows[0]))
        plot_diagnostics(output_dir / "bon_diagnostics.png", along_n, length_rows, args, class_rows)
        clock.lap("curves + diagnostics")
        seconds = clock.finish()
        table = aggregate(rows, args, selection)
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
        write_summary(output_dir / "summary.md", args, table, selection, pair_rows, along_n, length_rows, seconds,
                      computed, sources, class_rows)  # fmt: skip
        write_run_record(output_dir, args)
        print(f"Results in {output_dir}: bon_results.csv, bon_curves.png, summary.md, diagnostics.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(BoNScriptArguments, "outputs/bon")


if __name__ == "__main__":
    run_script(make_parser, main, DEFAULT_CONFIG)
