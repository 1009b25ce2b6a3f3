"""The Best-of-N study (recipes/bon.py) on top of the shared stages: the samples and their scores (cached), and the
curves: each method's ranking of a prompt's N samples, proxy and gold reward along n by the unbiased estimator, and
the penalty strength k chosen per seed on the validation prompts.

Methods: MAP and LA (member 0 of a seed's ensemble, LA penalized by its std or variance), LA-rel (penalized by the
relative variance Var(r_i - mean_j r_j) over the prompt's N candidates), Ens (the members' mean), Ens-WCO (worst case),
Ens-UWO (mean minus k x the members' spread), LA-Ens and LA-Ens-rel (the penalized Laplace ensemble), and the
typicality baselines of issue 16 (`trl_bayes.typicality`), each member 0's MAP reward minus k x a score within the
prompt's N candidates: Prior-rel (the relative variance with the prior in place of the posterior), Hidden-Euc and
Hidden-Maha (distance of the reward model's last hidden state to the candidates' mean, plain or under their shrunk
covariance) and SFT-NLL (the SFT policy's mean per-token NLL). Their k is chosen like LA's; a grid edge chosen on
validation extends the grid (`extend_grids`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl_bayes.experiments.stages import Stage, generation_config, load_policy, world_plan, world_settings
from trl_bayes.experiments.workers import Workers, run_jobs

# The typicality baselines (issue 16) -> the column of member 0's scores they subtract k x (the square root of, with
# `std`): squared quantities, as the variances are.
TYPICALITY_COLUMNS = {
    "Prior-rel": "prior_rel_var",  # |J_i - J_mean|^2 / delta
    "Hidden-Euc": "hidden_euclidean",  # squared distance of the features to the candidates' mean
    "Hidden-Maha": "hidden_mahalanobis",  # the same under the candidates' shrunk covariance
    "SFT-NLL": "sft_nll_squared",  # the SFT policy's mean per-token NLL, squared
}
# The method of each `PenalizedReward(uncertainty=...)` option a single reward model runs (the studies' candidates).
METHOD_UNCERTAINTIES = {
    "LA": "marginal",
    "LA-rel": "relative",
    "Prior-rel": "prior_relative",
    "Hidden-Euc": "hidden_euclidean",
    "Hidden-Maha": "hidden_mahalanobis",
}
# Every uncertainty of member 0's scores -> its column (squared): the Laplace variances, then the typicality baselines'.
# Named as `PenalizedReward(uncertainty=...)`'s options (`trl_bayes.penalties.UNCERTAINTIES`; the SFT NLL, not one of
# them, `sft_nll`): the diagnostics' `uncertainty` column (best_of_n_report) asks of each "does it flag the exploit?".
UNCERTAINTY_COLUMNS = {
    "marginal": "var",
    "relative": "rel_var",
    "prior_relative": TYPICALITY_COLUMNS["Prior-rel"],
    "hidden_euclidean": TYPICALITY_COLUMNS["Hidden-Euc"],
    "hidden_mahalanobis": TYPICALITY_COLUMNS["Hidden-Maha"],
    "sft_nll": TYPICALITY_COLUMNS["SFT-NLL"],
}
METHODS = ("MAP", "LA", "LA-rel", "Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel", *TYPICALITY_COLUMNS)
LAPLACE_PENALTIES = ("std", "var")
ENSEMBLE_METHODS = ("Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel")
# Methods penalized by the relative variance Var(r_i - mean_j r_j) over the prompt's N candidates (trl_bayes.
# relative_variance); LA and LA-Ens by the marginal J Sigma J^T.
RELATIVE_METHODS = ("LA-rel", "LA-Ens-rel")
# Methods with a penalty strength k, chosen per seed on the validation prompts (`k_selection.csv`).
SELECTED_METHODS = ("LA", "LA-rel", "LA-Ens", "LA-Ens-rel", *TYPICALITY_COLUMNS)
# The (P, N) arrays of a proxy's scores, one value per sample.
SAMPLE_COLUMNS = ("mean", *UNCERTAINTY_COLUMNS.values())
CSV_COLUMNS = ["method", "penalty", "k", "seed", "n", "kl", "proxy_reward", "gold_reward"]
MAX_GRID_STEPS = 4
"""How many times `extend_grids` may double (or halve) the k of one method, penalty and seed."""


# ---------------------------------------------------------------------------------------------------------------------
# Best-of-N stages


def sample_best_of_n(args, eval_prompts, policy_path, cache, accelerator, workers: Workers | None = None):
    """N completions per held-out prompt, (P, N). Sampled in blocks of `sample_block_prompts` prompts, one job each
    (dealt to `workers`), each cached as soon as it is done: at the paper's scale (12.5M samples) a crash must not lose
    days of sampling."""
    key = {"world": world_settings(args), "N": args.num_samples, "seed": args.sampling_seed}
    key["batch"] = [args.prompt_batch_size, args.generation_batch_size, args.sample_block_prompts]
    key["generation"] = [args.max_new_tokens, args.temperature, args.top_k, args.top_p]
    stage = Stage(cache, "samples", key)
    starts = range(0, len(eval_prompts), args.sample_block_prompts)
    blocks = [eval_prompts[first : first + args.sample_block_prompts] for first in starts]
    if not stage.done:
        if accelerator.is_main_process and not stage.partial:
            stage.start()  # a folder from other settings is cleared; one from these settings keeps its blocks
        accelerator.wait_for_everyone()
        settings = {name: getattr(args, name) for name in SAMPLING_FIELDS}
        bars = workers is None or workers.inner_progress_bars(accelerator)
        jobs = [SampleJob(block_file(stage.path, b), prompts, b, policy_path, settings, bars)
                for b, prompts in enumerate(blocks) if not block_file(stage.path, b).is_file()]  # fmt: skip
        run_jobs(run_sample_job, jobs, workers, accelerator, desc="Best-of-N sample blocks")
        if accelerator.is_main_process:
            stage.finish()
        accelerator.wait_for_everyone()
    return [c for b in range(len(blocks)) for c in json.loads(block_file(stage.path, b).read_text())["completions"]]


SAMPLING_FIELDS = ("num_samples", "prompt_batch_size", "generation_batch_size", "sampling_seed", "max_new_tokens",
                   "temperature", "top_k", "top_p")  # fmt: skip
"""The script arguments a block of samples depends on (with its prompts and index): what a `SampleJob` carries."""


def block_file(path, b: int):
    return path / f"block{b:05d}.json"


@dataclass
class SampleJob:
    """One job of the samples stage: the N completions of each prompt of block `block`, written to `path`."""

    path: Path
    prompts: list[str]
    block: int
    policy_path: str
    settings: dict[str, Any]  # SAMPLING_FIELDS
    progress_bar: bool = False


def run_sample_job(job: SampleJob, accelerator=None) -> None:
    """Sample one block and write its file: alone (`accelerator` None), or with its prompt chunks split over the
    processes of `accelerator`. The block draws from its own seed, so the samples do not depend on which blocks a
    resumed run redoes, nor on where a block ran."""
    from types import SimpleNamespace

    from accelerate import PartialState

    from trl_bayes import BestOfNSampler

    state = accelerator or PartialState()
    settings = SimpleNamespace(**job.settings)
    policy, tokenizer = load_policy(job.policy_path, state.device)
    sampler = BestOfNSampler(
        policy, tokenizer, n=settings.num_samples, generation_config=generation_config(settings),
        prompt_batch_size=settings.prompt_batch_size, generation_batch_size=settings.generation_batch_size,
        seed=settings.sampling_seed + 7919 * job.block, accelerator=accelerator, progress_bar=job.progress_bar,
    )  # fmt: skip
    completions, finished = sampler.generate(job.prompts, return_finished=True)
    if state.is_main_process:
        tmp = job.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"completions": completions, "finished": finished.tolist()}))
        tmp.rename(job.path)  # atomic: a block file is complete or absent
    state.wait_for_everyone()


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


def score_samples(
    args, eval_prompts, completions, held_out, members, gold, cache, state, workers=None, policy_path=None
):
    """Gold (P, N), and per proxy (mean, var[, rel_var]) of shape (P, N) plus held-out pair differences (mean, var).

    The gold scores here; each proxy's scores are one job (dealt to `workers`). `rel_var` (with a relative method in
    `--methods`) is Var(r_ij - mean_j' r_ij') over prompt i's N samples: whole prompts (their distinct responses,
    weighted by how often each was drawn) are scored together, split over the processes of a multi-process launch.

    With typicality methods in `--methods`, each seed's member 0 also gets their columns (`TYPICALITY_COLUMNS`), each
    from a stage of its own (`typicality_stages`), so that the proxies' cached scores stay valid: the SFT NLL needs
    `policy_path`.
    """
    import numpy as np

    distinct, inverse = unique_responses(eval_prompts, completions)
    inverse = np.asarray(inverse)
    u_prompts, u_completions = [p for p, _ in distinct], [c for _, c in distinct]
    state.print(f"[scores] {len(distinct)} distinct responses out of {inverse.size}")
    # Scores follow the samples they were computed on: the samples stage's key (world, N, seeds, batching).
    samples_key = {"samples": json.loads((cache / "samples" / "done.json").read_text())}
    gold_scores = samples_gold(args, eval_prompts, completions, gold, cache, state)

    relative = bool(set(args.methods) & set(RELATIVE_METHODS))
    # Per prompt, its distinct responses and how often each was drawn (the weights of the relative variance's mean).
    grouped = relative or bool(set(args.methods) & set(TYPICALITY_COLUMNS))
    prompt_rows = [np.unique(row, return_counts=True) for row in inverse] if grouped else None
    responses = (u_prompts, u_completions, prompt_rows if relative else None, list(held_out["prompt"]),
                 list(zip(held_out["chosen"], held_out["rejected"], strict=True)))  # fmt: skip
    bars = workers is None or workers.inner_progress_bars(state)
    # The batch size moves scores in the last bits: in the key when not the default's (absent there, so that the scores
    # cached before stay valid).
    batching = {"batch_size": args.score_batch_size} if args.score_batch_size != 64 else {}
    stages, jobs = {}, []
    for (s, j), member_dir in members.items():
        member = json.loads((member_dir / "done.json").read_text())
        key = {**samples_key, "member": member, "relative": relative, **batching}
        stages[s, j] = Stage(cache / "scores", f"seed{s}-member{j}", key)
        if not stages[s, j].done:
            jobs.append(ScoreJob(stages[s, j].path, key, member_dir, *responses, args.score_batch_size, bars))
    typicality = typicality_stages(args, members, cache, samples_key, batching)
    for (quantity, member_dir), stage in typicality.items():
        if not stage.done:
            if quantity == "sft_nll" and policy_path is None:
                raise ValueError("--methods SFT-NLL scores with the SFT policy: pass `policy_path` to score_samples.")
            # The SFT policy's path is in no key: it names this run's cache folder.
            model_path = policy_path if quantity == "sft_nll" else member_dir
            job = TypicalityJob(stage.path, stage.key, quantity, model_path, u_prompts, u_completions, prompt_rows,
                                args.score_batch_size, bars)  # fmt: skip
            # A forward-backward per response: among the longest jobs, started first.
            jobs.insert(0 if quantity == "prior_relative" else len(jobs), job)
    run_jobs(run_scoring_job, jobs, workers, state, desc="Proxy scores")
    state.wait_for_everyone()
    proxies = {}
    for (s, j), stage in stages.items():
        data = np.load(stage.path / "scores.npz")
        proxies[s, j] = {
            "mean": data["mean"][inverse],
            "var": np.clip(data["var"][inverse], 0.0, None),
            "pair_mean": data["pair_mean"],
            "pair_var": data["pair_var"],
        }
        if relative:
            proxies[s, j]["rel_var"] = np.clip(data["rel_var"][inverse], 0.0, None)
    for (quantity, member_dir), stage in typicality.items():
        data = np.load(stage.path / "scores.npz")
        for s in [s for (s, j), path in members.items() if j == 0 and (quantity == "sft_nll" or path == member_dir)]:
            for column in data.files:  # clipped: squared quantities, >= 0 up to rounding
                proxies[s, 0][column] = np.clip(data[column][inverse], 0.0, None)
    return gold_scores, proxies


TYPICALITY_QUANTITIES = {
    "prior_relative": ("Prior-rel",),
    "hidden": ("Hidden-Euc", "Hidden-Maha"),
    "sft_nll": ("SFT-NLL",),
}
"""The typicality stages -> the methods that need them. `prior_relative` and `hidden` are per seed (member 0's model),
`sft_nll` once per world (the SFT policy)."""


def typicality_stages(args, members, cache, samples_key, batching) -> dict[tuple[str, Any], Stage]:
    """(quantity, member folder or None) -> the stage of the typicality scores the requested methods need. Keys extend
    the proxy scores' (`samples`, `member`, batching) with the quantity and its settings; their folders are new
    (`seed{s}-member0-<quantity>`, `sft_nll`), so no cached proxy score changes."""
    from trl_bayes.typicality import DEFAULT_SHRINKAGE

    stages = {}
    for quantity, methods in TYPICALITY_QUANTITIES.items():
        if not set(args.methods) & set(methods):
            continue
        if quantity == "sft_nll":
            key = {
                **samples_key,
                "quantity": quantity,
                "policy": args.policy_name_or_path,
                "add_eos": True,
                **batching,
            }
            stages[quantity, None] = Stage(cache / "scores", quantity, key)
            continue
        settings = {"shrinkage": DEFAULT_SHRINKAGE} if quantity == "hidden" else {}
        for s in args.seeds:
            member = json.loads((members[s, 0] / "done.json").read_text())
            key = {**samples_key, "member": member, "quantity": quantity, **settings, **batching}
            stages[quantity, members[s, 0]] = Stage(cache / "scores", f"seed{s}-member0-{quantity}", key)
    return stages


def run_scoring_job(job, state=None) -> None:
    """A job of the scores stage, a proxy's scores (`ScoreJob`) or a typicality quantity (`TypicalityJob`)."""
    if isinstance(job, TypicalityJob):
        run_typicality_job(job, state)
    else:
        run_score_job(job, state)


def samples_gold(args, prompts: list[str], completions: list[list[str]], gold, cache, state):
    """Gold `(P, N)` of the Best-of-N samples, their distinct responses scored once (split over processes) and cached
    in the `scores/gold` stage, keyed by the samples stage's key: the Best-of-N and active-learning recipes share it."""
    import numpy as np

    distinct, inverse = unique_responses(prompts, completions)
    samples_key = {"samples": json.loads((cache / "samples" / "done.json").read_text())}
    stage = Stage(cache / "scores", "gold", {**samples_key, "gold": args.gold_reward})
    if not stage.done:
        u_prompts, u_completions = [p for p, _ in distinct], [c for _, c in distinct]
        scores = score_sharded(lambda p, c: list(gold(prompts=p, completions=c)), u_prompts, u_completions, state)
        if state.is_main_process:
            stage.start()
            np.save(stage.path / "gold.npy", np.asarray(scores, dtype=np.float64))
            stage.finish()
        state.wait_for_everyone()
    return np.load(stage.path / "gold.npy")[np.asarray(inverse)]


@dataclass
class ScoreJob:
    """One job of the scores stage: one proxy's (mean, var[, rel_var]) of the distinct responses and (mean, var) of the
    held-out pairs' differences, written to its stage folder `path` (`scores.npz`)."""

    path: Path
    key: dict[str, Any]
    member_dir: Path
    prompts: list[str]  # (U,) the distinct responses' prompts
    completions: list[str]  # (U,) and completions
    prompt_rows: list | None  # per prompt, (distinct responses' indices, counts); None = no relative variance
    pair_prompts: list[str]  # the held-out pairs
    pairs: list[tuple[str, str]]  # (chosen, rejected)
    batch_size: int
    progress_bar: bool = False


def run_score_job(job: ScoreJob, state=None) -> None:
    """Score one proxy and write its stage: alone (`state` None), or split over the processes of `state`."""
    import numpy as np
    from accelerate import PartialState

    from trl_bayes import BayesianRewardModel

    state = state or PartialState()
    stage = Stage(job.path.parent, job.path.name, job.key)
    model = BayesianRewardModel.from_pretrained(job.member_dir, device=state.device)
    bar = job.progress_bar and state.is_main_process

    def predict(p, c):
        mean, var = model.predict(p, c, batch_size=job.batch_size, progress_bar=bar)
        return list(zip(mean.tolist(), var.tolist(), strict=True))

    def predict_pairs(p, pairs):
        chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
        mean, var = model.predict_pairs(p, chosen, rejected, batch_size=job.batch_size)
        return list(zip(mean.tolist(), var.tolist(), strict=True))

    def predict_relative(prompt_indices):
        rows = np.concatenate([job.prompt_rows[i][0] for i in prompt_indices]).tolist()
        counts = np.concatenate([job.prompt_rows[i][1] for i in prompt_indices]).tolist()
        mean, var, rel = model.predict_relative(
            [job.prompts[u] for u in rows], [job.completions[u] for u in rows],
            batch_size=job.batch_size, weights=counts, progress_bar=bar,
        )  # fmt: skip
        return list(zip(rows, mean.tolist(), var.tolist(), rel.tolist(), strict=True))

    if job.prompt_rows is not None:
        values = np.full((len(job.prompts), 3), np.nan)
        for u, *record in shard_prompts(predict_relative, len(job.prompt_rows), state):
            values[u] = record
    else:
        values = np.asarray(score_sharded(predict, job.prompts, job.completions, state), dtype=np.float64)
    pair_values = np.asarray(score_sharded(predict_pairs, job.pair_prompts, job.pairs, state), dtype=np.float64)
    if state.is_main_process:
        stage.start()
        extra = {"rel_var": values[:, 2]} if job.prompt_rows is not None else {}
        np.savez(stage.path / "scores.npz", mean=values[:, 0], var=values[:, 1], **extra,
                 pair_mean=pair_values[:, 0], pair_var=pair_values[:, 1])  # fmt: skip
        stage.finish()
    state.wait_for_everyone()


@dataclass
class TypicalityJob:
    """One job of the scores stage: a typicality quantity of the distinct responses, written to its stage folder
    `path` (`scores.npz`, one array per `TYPICALITY_COLUMNS` column it holds, over the distinct responses):
    `prior_relative` and `hidden` from a proxy (`model_path` its folder), within each prompt's distinct responses
    weighted by their draw counts; `sft_nll` from the SFT policy (`model_path`), per response."""

    path: Path
    key: dict[str, Any]
    quantity: str  # a key of TYPICALITY_QUANTITIES
    model_path: Path | str
    prompts: list[str]  # (U,) the distinct responses' prompts
    completions: list[str]  # (U,) and completions
    prompt_rows: list  # per prompt, (distinct responses' indices, counts)
    batch_size: int
    progress_bar: bool = False


def run_typicality_job(job: TypicalityJob, state=None) -> None:
    """Score one typicality quantity and write its stage: alone (`state` None), or split over the processes of
    `state` (whole prompts for the group quantities)."""
    import numpy as np
    import torch
    from accelerate import PartialState

    from trl_bayes import BayesianRewardModel
    from trl_bayes.typicality import (
        DEFAULT_SHRINKAGE,
        completion_nll,
        group_euclidean,
        group_mahalanobis,
        predict_hidden,
        predict_prior_relative,
    )

    state = state or PartialState()
    stage = Stage(job.path.parent, job.path.name, job.key)
    bar = job.progress_bar and state.is_main_process
    if job.quantity == "sft_nll":
        policy, tokenizer = load_policy(str(job.model_path), state.device)

        def nll(p, c):
            return completion_nll(policy, tokenizer, p, c, batch_size=job.batch_size).tolist()

        columns = {TYPICALITY_COLUMNS["SFT-NLL"]: np.square(score_sharded(nll, job.prompts, job.completions, state))}
    else:
        model = BayesianRewardModel.from_pretrained(job.model_path, device=state.device)

        def score(prompt_indices):
            rows = np.concatenate([job.prompt_rows[i][0] for i in prompt_indices])
            counts = np.concatenate([job.prompt_rows[i][1] for i in prompt_indices])
            prompts, completions = [job.prompts[u] for u in rows], [job.completions[u] for u in rows]
            if job.quantity == "prior_relative":
                _, relative = predict_prior_relative(model, prompts, completions, job.batch_size, counts.tolist(),
                                                     progress_bar=bar)  # fmt: skip
                return list(zip(rows.tolist(), relative.tolist(), strict=True))
            features = predict_hidden(model, prompts, completions, job.batch_size).double()
            groups = torch.from_numpy(np.repeat(prompt_indices, [len(job.prompt_rows[i][0]) for i in prompt_indices]))
            weights = torch.from_numpy(counts).double()
            euclidean = group_euclidean(features, groups, weights)
            mahalanobis = group_mahalanobis(features, groups, weights, shrinkage=DEFAULT_SHRINKAGE)
            return list(zip(rows.tolist(), euclidean.tolist(), mahalanobis.tolist(), strict=True))

        names = [TYPICALITY_COLUMNS[method] for method in TYPICALITY_QUANTITIES[job.quantity]]
        values = np.full((len(job.prompts), len(names)), np.nan)
        for u, *record in shard_prompts(score, len(job.prompt_rows), state):
            values[u] = record
        columns = {name: values[:, i] for i, name in enumerate(names)}
    if state.is_main_process:
        stage.start()
        np.savez(stage.path / "scores.npz", **columns)
        stage.finish()
    state.wait_for_everyone()


def shard_prompts(score_fn, num_prompts: int, state) -> list:
    """`score_fn(prompt_indices)` -> list of records, with whole prompts split over processes, gathered."""
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(num_prompts))) as local:
        records = score_fn(list(local)) if len(local) else []
    return gather_object(records) if state.num_processes > 1 else records


# ---------------------------------------------------------------------------------------------------------------------
# Curves (main process)


def penalty_labels(args) -> list[str]:
    """The penalties of the LA methods with their scale: `std`, `var` (absolute k) then `std-prompt`, `var-prompt`."""
    return [p if scale == "absolute" else f"{p}-{scale}" for scale in args.penalty_scales for p in args.penalties]


def method_specs(args) -> list[tuple[str, str, float]]:
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
    methods penalize with the members' relative variances (`rel_var`), the typicality baselines member 0's MAP reward
    with their column (`TYPICALITY_COLUMNS`, squared: `std` subtracts k x its root), the others with the marginal
    variances. A penalty `std-prompt` / `var-prompt` scales k within each prompt (row), see
    `trl_bayes.penalties.prompt_scale`.
    """
    import numpy as np
    import torch

    from trl_bayes import penalized_reward

    used = members if method in ENSEMBLE_METHODS else members[:1]
    shape = used[0]["mean"].shape
    means = torch.from_numpy(np.stack([m["mean"].ravel() for m in used]))
    column = TYPICALITY_COLUMNS.get(method, "rel_var" if method in RELATIVE_METHODS else "var")
    variances = torch.from_numpy(np.stack([m[column].ravel() for m in used]))
    penalty, _, scale = penalty.partition("-")
    torch_penalty = {"none": "none", "mean": "none", "wco": "wco", "uwo": "uwo"}.get(penalty, penalty)
    groups = torch.arange(shape[0]).repeat_interleave(shape[1])  # row p of the (P, N) arrays: prompt p
    rank = penalized_reward(means, variances, torch_penalty, k, scale or "absolute", groups).numpy().reshape(shape)
    proxy = means.mean(0).numpy().reshape(shape)
    return rank, proxy


def seed_members(args, proxies, seed: int, prompts: slice) -> list[dict]:
    """One seed's members: their (P, N) score arrays (`SAMPLE_COLUMNS`) on the held-out prompts in `prompts`."""
    return [{key: value[prompts] for key, value in proxies[seed, j].items() if key in SAMPLE_COLUMNS}
            for j in range(args.ensemble_size)]  # fmt: skip


def compute_curves(args, gold_scores, proxies, prompts: slice = slice(None), specs=None) -> list[dict[str, Any]]:
    """Proxy and gold reward of every method at every n, on the held-out prompts in `prompts` (rows of the arrays):
    of `method_specs(args)` for every seed, or of `specs`, a list of (method, penalty, k) per seed."""
    from trl_bayes import best_of_n_estimate, kl_best_of_n

    gold_scores = gold_scores[prompts]
    rows = []
    for seed in args.seeds if specs is None else specs:
        members = seed_members(args, proxies, seed, prompts)
        for method, penalty, k in method_specs(args) if specs is None else specs[seed]:
            rank, proxy = method_scores(method, penalty, k, members)
            gold_curve = best_of_n_estimate(rank, gold_scores, args.ns)
            proxy_curve = best_of_n_estimate(rank, proxy, args.ns)
            for n, g, p in zip(args.ns, gold_curve, proxy_curve, strict=True):
                rows.append({"method": method, "penalty": penalty, "k": k, "seed": seed, "n": n,
                             "kl": float(kl_best_of_n(n)), "proxy_reward": float(p), "gold_reward": float(g)})  # fmt: skip
    return rows


def select_ks(args, validation_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, selected method (`SELECTED_METHODS`) and penalty: the k with the best gold at the largest n on the
    validation prompts (ties: the smaller k), among the ks of `validation_rows` (`ks`, and those `extend_grids`
    added). One row per candidate k, `chosen` marking the pick and `added` the ks that are not in `ks`."""
    n_max = args.ns[-1]
    out = []
    for seed in args.seeds:
        for method in [m for m in args.methods if m in SELECTED_METHODS]:
            for penalty in penalty_labels(args):
                gold = {r["k"]: r["gold_reward"] for r in validation_rows
                        if (r["seed"], r["method"], r["penalty"], r["n"]) == (seed, method, penalty, n_max)}  # fmt: skip
                best = max(sorted(gold), key=lambda k: (gold[k], -k))
                out.extend({"seed": seed, "method": method, "penalty": penalty, "k": k,
                            "validation_gold_at_max_n": gold[k], "chosen": k == best, "added": k not in args.ks}
                           for k in sorted(gold))  # fmt: skip
    return out


def grid_step(ks: list[float], pick: float) -> float | None:
    """The k to add when validation picked `pick` from `ks`: twice the largest k when it is the pick, half the
    smallest nonzero one when that is the pick (so the grid is never extended below or at 0), else None."""
    nonzero = [k for k in ks if k > 0]
    if not nonzero:
        return None
    if pick == max(nonzero):
        return 2 * pick
    if pick == min(nonzero):
        return pick / 2
    return None


def extend_grids(args, gold_scores, proxies, validation: slice, validation_rows: list[dict]) -> tuple[list, dict]:
    """`select_ks` on a grid that cannot saturate: while validation picks a grid edge for a (seed, method, penalty),
    add one k beyond it (`grid_step`: x2 above, /2 below), compute the validation curves of that k only, and pick
    again; at most `MAX_GRID_STEPS` added ks per (seed, method, penalty), so bounded.

    Returns:
        the selection (`select_ks`'s rows over the extended grids) and, per seed, the added (method, penalty, k), for
        the reported curves of those k.
    """
    rows = list(validation_rows)
    added: dict[int, list[tuple[str, str, float]]] = {}
    for _ in range(MAX_GRID_STEPS):
        selection = select_ks(args, rows)
        step: dict[int, list[tuple[str, str, float]]] = {}
        for pick in [r for r in selection if r["chosen"]]:
            ks = [r["k"] for r in selection if (r["seed"], r["method"], r["penalty"]) ==
                  (pick["seed"], pick["method"], pick["penalty"])]  # fmt: skip
            k = grid_step(ks, pick["k"])
            if k is not None:
                step.setdefault(pick["seed"], []).append((pick["method"], pick["penalty"], k))
        if not step:
            return selection, added
        rows += compute_curves(args, gold_scores, proxies, validation, step)
        for seed, specs in step.items():
            added.setdefault(seed, []).extend(specs)
    return select_ks(args, rows), added


def grid_extensions(selection: list[dict]) -> list[str]:
    """One line per (method, penalty, seed) whose grid was extended: "grid extended for LA-rel/std/seed 0 to k=8, 16
    (chosen: 16)"."""
    lines = []
    for method, penalty, seed in dict.fromkeys((r["method"], r["penalty"], r["seed"]) for r in selection):
        mine = [r for r in selection if (r["method"], r["penalty"], r["seed"]) == (method, penalty, seed)]
        added = [r["k"] for r in mine if r["added"]]
        if added:
            chosen = next(r["k"] for r in mine if r["chosen"])
            ks = ", ".join(f"{k:g}" for k in added)
            lines.append(f"grid extended for {method}/{penalty}/seed {seed} to k={ks} (chosen: {chosen:g})")
    return lines


def ranking_correlations(args, proxies, selection: list[dict], prompts: slice) -> list[dict[str, Any]]:
    """How much the proxy still moves each selected method's ranking at its chosen k, on the prompts in `prompts`:
    per seed, method and penalty, the mean over prompts of the Spearman correlation, among the prompt's N samples, of
    the final score (proxy - penalty) with the proxy and with minus the penalty alone. Near 1 with the penalty and
    near 0 with the proxy: the proxy hardly matters at that k. A constant (k = 0) gives NaN, left out of the mean."""
    import numpy as np
    from scipy.stats import rankdata

    def spearman(a, b):  # row-wise, average ranks for ties
        a, b = rankdata(a, axis=1), rankdata(b, axis=1)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))

    rows = []
    for pick in [r for r in selection if r["chosen"]]:
        members = seed_members(args, proxies, pick["seed"], prompts)
        rank, proxy = method_scores(pick["method"], pick["penalty"], pick["k"], members)
        penalty = proxy - rank
        with_proxy, with_penalty = spearman(rank, proxy), spearman(rank, -penalty)
        rows.append({"method": pick["method"], "penalty": pick["penalty"], "seed": pick["seed"], "k": pick["k"],
                     "spearman_with_proxy": finite_mean(with_proxy),
                     "spearman_with_penalty": finite_mean(with_penalty)})  # fmt: skip
    return rows


def finite_mean(values) -> float:
    """The mean of the finite values, NaN when there is none (without numpy's warning about an empty slice)."""
    import numpy as np

    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def describe_plan(args, training_args, model_args) -> list[str]:
    """What each stage will load or build, from the config alone (no download): the shared stages' lines, then the
    samples and curves."""
    return [
        *world_plan(args, training_args, model_args, validation_for="k"),
        f"samples: {args.num_eval_prompts} x {args.num_samples} (max_new_tokens={args.max_new_tokens})",
        f"curves: n in {args.ns}; methods {args.methods}; penalties {args.penalties}; k {args.ks} (a grid edge "
        f"chosen on validation extends it, x2 or /2, up to {MAX_GRID_STEPS} times)",
    ]
