"""The active reward learning study (recipes/active.py) on the shared stages: which preference pairs to label.

Per seed, a reward model starts from `initial_pairs` gold-labelled pairs of the pairs stage (the Best-of-N world's
pairs, its label noise included); then, per strategy (`trl_bayes.active.SelectionStrategy`), `num_rounds` rounds each
select `pairs_per_round` pairs from a pool of candidates, label them with the gold (the same label noise), train the
MAP on all labels so far and refit the Laplace posterior. After every round: held-out pair accuracy and Bradley-Terry
NLL, and Best-of-n gold at `ns` of the MAP reward and of LA-rel (std of the relative variance, k = `la_rel_k`).

Stages (under `<cache>/`): the world, pairs, Best-of-N samples and their gold scores are the Best-of-N recipe's
(`--cache_dir outputs/bon/cache` reuses them); `active_pool/` holds the candidates (`pool_candidates` samples of the
policy per training prompt, gold-scored); `active/seed<s>-round0` the seed's first model, shared by the strategies;
`active/<strategy>-seed<s>-round<r>` each later round (its labels, model, metrics), so a killed run resumes at the
first round not done. Each (strategy, seed) is one job of rounds (`Workers`), the seeds' first models one job each.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_bayes.experiments.stages import Stage, WorldArguments, generation_config, load_policy, world_settings

STRATEGIES = ("random", "variance", "bald", "thompson")
METRICS = ("map_accuracy", "map_nll", "laplace_probit_nll")
DIAGNOSTICS = ("distinct_prompts", "max_pairs_per_prompt", "near_duplicates", "mean_gold_gap")
SECONDS = ("select_seconds", "train_seconds", "eval_seconds")


@dataclass
class ActiveScriptArguments(WorldArguments):
    """Arguments of the active-learning recipe: the world's (`WorldArguments`) and the ones below, beside the reward
    models' training (`BayesianRewardConfig`) and model/LoRA (`trl.ModelConfig`) arguments. Defaults: the default run.

    Parameters that control the labelling (fixed before the first comparison):
        strategies: subset of `random`, `variance`, `bald`, `thompson` (`trl_bayes.active`).
        initial_pairs (`int`): gold-labelled pairs every strategy starts from: a seeded draw from the pairs stage
            (`num_train_pairs` pairs, `label_noise` of their labels flipped), shared by the strategies of a seed.
        pairs_per_round, num_rounds: pairs labelled per round, and rounds.
        pool_candidates (`int`): K, candidates sampled from the policy per training prompt (pairs within a prompt,
            ties in gold excluded: the labeller has no preference to give); `pool_seed` seeds their sampling,
            `pool_prompt_batch_size` prompts per chunk (and `generation_batch_size` sequences per generate call).
        warm_start (`bool`): each round starts its MAP training from the last round's adapter, for
            `warm_start_epochs` epochs, instead of from scratch for `num_train_epochs`.
        selection_batch_size: responses per forward-backward when scoring the pool.

    Parameters that control the evaluation after each round:
        num_bon_prompts (`int`): the first of the held-out prompts whose Best-of-N samples are scored (all of their
            `num_samples`); ns: the n reported. la_rel_k: LA-rel's k (std penalty on the relative variance).
        num_samples, prompt_batch_size, generation_batch_size, sample_block_prompts, sampling_seed: the Best-of-N
            samples, the Best-of-N recipe's defaults (so that the two recipes share the samples stage).
        score_batch_size: responses per forward-backward when scoring.
        cache_dir: the cached stages (default `<output_dir>/cache`; a Best-of-N run's cache reuses its stages).
    """

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), metadata={"help": f"{STRATEGIES}."})
    initial_pairs: int = field(default=100, metadata={"help": "Labelled pairs before the first round."})
    pairs_per_round: int = field(default=100, metadata={"help": "Pairs labelled per round."})
    num_rounds: int = field(default=8, metadata={"help": "Rounds of selection."})
    pool_candidates: int = field(default=8, metadata={"help": "K: candidates per training prompt in the pool."})
    pool_seed: int = field(default=4321, metadata={"help": "Seed of the pool's samples."})
    pool_prompt_batch_size: int = field(default=64, metadata={"help": "Prompts per sampling chunk of the pool."})
    warm_start: bool = field(default=False, metadata={"help": "Train each round from the last round's adapter."})
    warm_start_epochs: float = field(default=1, metadata={"help": "Epochs of a warm-started round."})
    selection_batch_size: int = field(default=64, metadata={"help": "Responses per pass when scoring the pool."})
    num_bon_prompts: int = field(default=16, metadata={"help": "Held-out prompts of the Best-of-N evaluation."})
    ns: list[int] = field(default_factory=lambda: [64, 512], metadata={"help": "Best-of-n reported."})
    la_rel_k: float = field(default=4.0, metadata={"help": "LA-rel's k (std of the relative variance)."})
    # The Best-of-N recipe's sampling defaults (tests/test_active_recipe.py checks they stay equal).
    num_samples: int = field(default=512, metadata={"help": "N: Best-of-N samples per held-out prompt."})
    prompt_batch_size: int = field(default=8, metadata={"help": "Prompts per sampling chunk."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Sequences per generate call."})
    sample_block_prompts: int = field(default=16, metadata={"help": "Prompts per cached block of samples."})
    sampling_seed: int = field(default=1234, metadata={"help": "Seed of the Best-of-N samples."})
    score_batch_size: int = field(default=64, metadata={"help": "Responses per scoring pass."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cached stages (default <output_dir>/cache)."})
    dry_run: bool = field(default=False, metadata={"help": "Check the config, print the plan, and stop."})

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown or not self.strategies:
            raise ValueError(f"--strategies {self.strategies}: unknown {unknown}; choose from {list(STRATEGIES)}.")
        for name in ("initial_pairs", "pairs_per_round", "num_rounds", "num_bon_prompts", "selection_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 1.")
        if self.pool_candidates < 2:
            raise ValueError(f"--pool_candidates {self.pool_candidates}: pairs within a prompt need >= 2.")
        if self.initial_pairs > self.num_train_pairs:
            raise ValueError(
                f"--initial_pairs {self.initial_pairs} > --num_train_pairs {self.num_train_pairs}: the first labels "
                "are drawn from the pairs stage; raise --num_train_pairs."
            )
        if self.num_bon_prompts > self.num_eval_prompts:
            raise ValueError(f"--num_bon_prompts {self.num_bon_prompts} > --num_eval_prompts {self.num_eval_prompts}.")
        bad = [n for n in self.ns if not 1 <= n <= self.num_samples]
        if bad or not self.ns:
            raise ValueError(f"--ns {self.ns}: n = {bad} outside [1, num_samples={self.num_samples}].")
        if self.la_rel_k < 0:
            raise ValueError(f"--la_rel_k {self.la_rel_k}: must be >= 0.")


def csv_columns(args) -> list[str]:
    bon = [f"bon_{method}_{n}" for method in ("map", "la_rel") for n in args.ns]
    return ["strategy", "seed", "round", "num_labels", *METRICS, *bon, *DIAGNOSTICS, *SECONDS]


# ---------------------------------------------------------------------------------------------------------------------
# The pool


def build_pool(args, train_prompts, policy_path, gold, cache, accelerator) -> dict[str, Any]:
    """`pool_candidates` samples of the policy per training prompt, gold-scored, cached (`active_pool/pool.json`):
    `prompts` (G,), `candidates` (G, K_g) distinct per prompt, `gold` (G, K_g) and `pairs` (M, 3) rows (g, a, b),
    a < b, of distinct candidates with different gold (a tie has no preference to give)."""
    from trl_bayes import BestOfNSampler
    from trl_bayes.active import within_prompt_pairs
    from trl_bayes.experiments.gold import ShardedReward

    key = {"world": world_settings(args), "K": args.pool_candidates, "seed": args.pool_seed}
    key["generation"] = [args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.gold_reward]
    if (args.pool_prompt_batch_size, args.generation_batch_size) != (64, None):  # the samples are seeded per chunk
        key["batch"] = [args.pool_prompt_batch_size, args.generation_batch_size]
    stage = Stage(cache, "active_pool", key)
    if not stage.done:
        policy, tokenizer = load_policy(policy_path, accelerator.device)
        sampler = BestOfNSampler(
            policy, tokenizer, n=args.pool_candidates, generation_config=generation_config(args),
            prompt_batch_size=args.pool_prompt_batch_size, generation_batch_size=args.generation_batch_size,
            seed=args.pool_seed, accelerator=accelerator,
        )  # fmt: skip
        samples = sampler.generate(list(train_prompts))
        candidates = [list(dict.fromkeys(row)) for row in samples]  # a candidate twice makes no pair
        flat_prompts = [p for p, row in zip(train_prompts, candidates, strict=True) for _ in row]
        flat = ShardedReward(gold, accelerator)(
            prompts=flat_prompts, completions=[c for row in candidates for c in row]
        )
        gold_rows, start = [], 0
        for row in candidates:
            gold_rows.append(flat[start : start + len(row)])
            start += len(row)
        pairs = [(g, a, b) for g, a, b in within_prompt_pairs([len(r) for r in candidates]).tolist()
                 if gold_rows[g][a] != gold_rows[g][b]]  # fmt: skip
        if accelerator.is_main_process:
            path = stage.start()
            record = {"prompts": list(train_prompts), "candidates": candidates, "gold": gold_rows, "pairs": pairs}
            (path / "pool.json").write_text(json.dumps(record))
            stage.finish()
        accelerator.wait_for_everyone()
        del policy
    return json.loads((stage.path / "pool.json").read_text())


def pool_labels(pool: dict[str, Any], seed: int, label_noise: float) -> list[bool]:
    """Per pool pair, whether the labeller flips its gold preference (probability `label_noise`): drawn once per seed,
    so that every strategy of a seed meets the same labeller on the same pair."""
    rng = random.Random(f"active-labels-{seed}")
    return [rng.random() < label_noise for _ in pool["pairs"]]


def labelled_rows(pool: dict[str, Any], chosen: list[int], flips: list[bool]) -> dict[str, list]:
    """The labeller's answers on pool pairs `chosen`: `prompt`, `chosen`, `rejected` (the gold's order, flipped where
    `flips` says)."""
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for i in chosen:
        g, a, b = pool["pairs"][i]
        better, worse = (a, b) if pool["gold"][g][a] > pool["gold"][g][b] else (b, a)
        if flips[i]:
            better, worse = worse, better
        rows["prompt"].append(pool["prompts"][g])
        rows["chosen"].append(pool["candidates"][g][better])
        rows["rejected"].append(pool["candidates"][g][worse])
    return rows


def word_edit_distance(first: str, second: str) -> int:
    """Levenshtein distance between two word sequences (insertions, deletions, substitutions of whole words)."""
    a, b = first.split(), second.split()
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def selection_diagnostics(pool: dict[str, Any], chosen: list[int]) -> dict[str, float]:
    """What a round's pairs look like: how many prompts they come from, the most from one prompt, the fraction of
    near-duplicate pairs (the two responses one word edit apart) and the mean gold gap |gold(a) - gold(b)|."""
    groups = [pool["pairs"][i][0] for i in chosen]
    near, gaps = 0, []
    for i in chosen:
        g, a, b = pool["pairs"][i]
        near += word_edit_distance(pool["candidates"][g][a], pool["candidates"][g][b]) <= 1
        gaps.append(abs(pool["gold"][g][a] - pool["gold"][g][b]))
    return {
        "distinct_prompts": len(set(groups)),
        "max_pairs_per_prompt": max(groups.count(g) for g in set(groups)),
        "near_duplicates": near / len(chosen),
        "mean_gold_gap": sum(gaps) / len(gaps),
    }


# ---------------------------------------------------------------------------------------------------------------------
# One round: train, fit, evaluate


def train_round_model(
    out_dir: Path, seed: int, rows: dict[str, list], policy_path: str, training_args, model_args, init_adapter=None,
    epochs: float | None = None,
) -> None:  # fmt: skip
    """The MAP on every label so far and its Laplace posterior, saved to `out_dir`: from scratch, exactly as a proxy of
    the Best-of-N recipe (`proxies.train_proxy`), or warm-started from `init_adapter` for `epochs` epochs."""
    from dataclasses import replace

    from datasets import Dataset

    from trl_bayes.experiments.proxies import train_proxy

    pairs = Dataset.from_dict(rows)
    if init_adapter is None:
        train_proxy(out_dir, seed, pairs, policy_path, training_args, model_args)
        return
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from trl_bayes import BayesianRewardTrainer

    set_seed(seed)
    base = model_args.model_name_or_path or policy_path
    tokenizer = AutoTokenizer.from_pretrained(init_adapter)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, attn_implementation="eager")
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    round_args = replace(training_args, output_dir=str(out_dir), seed=seed, data_seed=seed, num_train_epochs=epochs)
    trainer = BayesianRewardTrainer(model=model, args=round_args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()  # MAP training, then the posterior fit
    trainer.save_model(str(out_dir))


def evaluate_round(model_dir: Path, held_out: dict[str, list], bon: dict[str, Any], args) -> dict[str, float]:
    """Held-out pair metrics (`BayesianRewardModel.evaluate`) and Best-of-n gold at `args.ns` of MAP and LA-rel on the
    `bon` prompts' samples (`prompts` (P,), `distinct` per prompt (completions, counts, inverse), `gold` (P, N))."""
    import numpy as np

    from trl_bayes import BayesianRewardModel, best_of_n_estimate
    from trl_bayes.experiments.best_of_n_study import method_scores

    model = BayesianRewardModel.from_pretrained(model_dir)
    metrics = model.evaluate(held_out["prompt"], held_out["chosen"], held_out["rejected"], args.score_batch_size)
    # The relative variance over each prompt's N samples: its distinct responses, weighted by how often each was drawn.
    prompts = [p for p, (unique, _, _) in zip(bon["prompts"], bon["distinct"], strict=True) for _ in unique]
    completions = [c for unique, _, _ in bon["distinct"] for c in unique]
    weights = [w for _, counts, _ in bon["distinct"] for w in counts]
    mean, _, rel_var = model.predict_relative(prompts, completions, args.score_batch_size, weights=weights)
    scores, start = {"mean": [], "rel_var": []}, 0
    for unique, _, inverse in bon["distinct"]:
        for name, values in (("mean", mean), ("rel_var", rel_var)):
            scores[name].append(values[start : start + len(unique)].numpy()[inverse])
        start += len(unique)
    member = {name: np.stack(rows).astype(np.float64) for name, rows in scores.items()}
    member["rel_var"] = np.clip(member["rel_var"], 0.0, None)
    member["var"] = np.zeros_like(member["mean"])  # MAP's column, unused by its penalty "none"
    out = {name: metrics[name] for name in METRICS}
    for label, method, penalty, k in (("map", "MAP", "none", 0.0), ("la_rel", "LA-rel", "std", args.la_rel_k)):
        rank, _ = method_scores(method, penalty, k, [member])
        for n, gold in zip(args.ns, best_of_n_estimate(rank, bon["gold"], args.ns), strict=True):
            out[f"bon_{label}_{n}"] = float(gold)
    return out


def bon_inputs(prompts: list[str], completions: list[list[str]], gold) -> dict[str, Any]:
    """What `evaluate_round` needs of the Best-of-N samples: per prompt its distinct completions, their counts and
    the index of each sample's distinct completion; and the gold (P, N)."""
    import numpy as np

    distinct = []
    for row in completions:
        unique, inverse, counts = np.unique(np.asarray(row, dtype=object), return_inverse=True, return_counts=True)
        distinct.append((unique.tolist(), counts.tolist(), inverse))
    return {"prompts": list(prompts), "distinct": distinct, "gold": np.asarray(gold, dtype=np.float64)}


@dataclass
class ChainJob:
    """One job of the study: rounds 1..`rounds` of one (strategy, seed), or (`strategy` None, `rounds` 0) the seed's
    first model; each round a stage (`round_stage`) with its labels, model and metrics."""

    cache: Path
    key: dict[str, Any]  # study_key
    strategy: str | None
    seed: int
    rounds: int
    pool: dict[str, Any]
    initial: dict[str, list]  # the initial labelled pairs of the seed
    held_out: dict[str, list]
    bon: dict[str, Any]
    policy_path: str
    args: Any  # ActiveScriptArguments
    training_args: Any  # BayesianRewardConfig
    model_args: Any  # trl.ModelConfig


def round_stage(job: ChainJob, r: int) -> Stage:
    """Round `r`'s stage. Round 0 (the first model) does not depend on how later rounds train: one stage per seed,
    `<cache>/active/seed<s>-round0`, for every strategy and `warm_start`; later rounds in `<cache>/active/` or, warm-
    started, `<cache>/active-warm-start-<epochs>/`, so that the two never overwrite each other's rounds."""
    key = {**job.key, "seed": job.seed, "round": r}
    if r == 0:  # trained on the initial labels alone: neither the pool nor how later rounds train decides it
        key["active"] = {"initial_pairs": key["active"]["initial_pairs"]}
        key["stages"] = {name: v for name, v in key["stages"].items() if name != "active_pool"}
        return Stage(job.cache / "active", f"seed{job.seed}-round0", {**key, "strategy": None})
    folder = f"active-warm-start-{job.args.warm_start_epochs}" if job.args.warm_start else "active"
    return Stage(job.cache / folder, f"{job.strategy}-seed{job.seed}-round{r}", {**key, "strategy": job.strategy})


def run_chain_job(job: ChainJob) -> list[dict[str, Any]]:
    """Run (or resume) the job's rounds; returns each round's record (also in its stage's `record.json`)."""
    import torch

    from trl_bayes import BayesianRewardModel
    from trl_bayes.active import CandidatePool, select_pairs
    from trl_bayes.experiments.proxies import member_seed

    args = job.args
    flips = pool_labels(job.pool, job.seed, args.label_noise)
    pool = CandidatePool(job.pool["prompts"], job.pool["candidates"], torch.tensor(job.pool["pairs"]).reshape(-1, 3))
    records, labelled = [], []
    first = 0 if job.strategy is None else 1
    previous = round_stage(job, 0).path
    if first == 1:
        labelled = json.loads((previous / "record.json").read_text())["labelled"]
    for r in range(first, job.rounds + 1):
        stage = round_stage(job, r)
        if not stage.done:
            path = stage.start()
            # 1. select on the last round's posterior, among the pool's pairs not labelled yet
            select_seconds = 0.0
            if r > 0:
                start = time.perf_counter()
                available = torch.ones(len(pool.pairs), dtype=torch.bool)
                available[labelled] = False
                index = torch.nonzero(available).squeeze(1)
                model = None
                if job.strategy != "random":
                    model = BayesianRewardModel.from_pretrained(previous / "model")
                chosen = select_pairs(model, pool.subset(index), args.pairs_per_round, job.strategy,
                                      seed=1000 * job.seed + r, batch_size=args.selection_batch_size,
                                      progress_bar=False)  # fmt: skip
                new = index[chosen].tolist()
                select_seconds = time.perf_counter() - start
            else:
                new = []
            # 2. label: the first pairs, then the labeller's answers on every selected pair so far
            rows = {k: list(v) for k, v in job.initial.items()}
            for k, v in labelled_rows(job.pool, labelled + new, flips).items():
                rows[k].extend(v)
            # 3. train the MAP on all labels and fit the posterior
            start = time.perf_counter()
            warm = args.warm_start and r > 0
            train_round_model(path / "model", member_seed(job.training_args.seed, job.seed, 0), rows, job.policy_path,
                              job.training_args, job.model_args, previous / "model" if warm else None,
                              args.warm_start_epochs)  # fmt: skip
            train_seconds = time.perf_counter() - start
            # 4. evaluate: held-out pairs, Best-of-n gold
            start = time.perf_counter()
            metrics = evaluate_round(path / "model", job.held_out, job.bon, args)
            record = {
                "strategy": job.strategy or "initial", "seed": job.seed, "round": r, "num_labels": len(rows["prompt"]),
                **metrics, **(selection_diagnostics(job.pool, new) if new else dict.fromkeys(DIAGNOSTICS, "")),
                "select_seconds": select_seconds, "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - start, "labelled": labelled + new,
            }  # fmt: skip
            (path / "record.json").write_text(json.dumps(record))
            stage.finish()
        record = json.loads((stage.path / "record.json").read_text())
        labelled, previous = record["labelled"], stage.path
        records.append(record)
    return records


def study_key(args, training_args, model_args, cache: Path) -> dict[str, Any]:
    """What decides every round's result: the reward models' settings, the active-learning settings, the evaluation,
    and the keys of the cached stages the rounds read (pairs, pool, Best-of-N samples and their gold scores), so that
    a change upstream (sampling, gold, batching, pair counts) is never answered from stale rounds."""
    from trl_bayes.experiments.proxies import proxy_key

    key = proxy_key(args, training_args, model_args)
    key["active"] = {"initial_pairs": args.initial_pairs, "pairs_per_round": args.pairs_per_round,
                     "pool_candidates": args.pool_candidates, "pool_seed": args.pool_seed,
                     "warm_start": args.warm_start, "warm_start_epochs": args.warm_start_epochs if args.warm_start else None}  # fmt: skip
    key["evaluation"] = [args.num_bon_prompts, args.ns, args.la_rel_k, args.num_samples, args.sampling_seed]
    key["stages"] = {name: json.loads((cache / name / "done.json").read_text())
                     for name in ("pairs", "active_pool", "samples", "scores/gold")}  # fmt: skip
    return key


def initial_rows(train_pairs, seed: int, num: int) -> dict[str, list]:
    """The seed's first labels: `num` pairs of the pairs stage (their labels as drawn there, noise included)."""
    order = random.Random(f"active-initial-{seed}").sample(range(len(train_pairs)), num)
    subset = train_pairs.select(order)
    return {k: list(subset[k]) for k in ("prompt", "chosen", "rejected")}


def run_study(args, training_args, model_args, pool, train_pairs, held_out, bon, policy_path, cache, workers):
    """Every round of every (strategy, seed): the seeds' first models, then one job per (strategy, seed). Returns the
    records, one per (strategy, seed, round), round 0 repeated under each strategy."""
    from trl_bayes.experiments.workers import Workers

    workers = workers or Workers(1)
    budget = args.num_rounds * args.pairs_per_round
    if budget > len(pool["pairs"]):  # before any round trains, not inside a worker after the first rounds
        raise ValueError(
            f"--num_rounds {args.num_rounds} x --pairs_per_round {args.pairs_per_round} = {budget} pairs, but the pool "
            f"has {len(pool['pairs'])}: lower them, or raise --pool_candidates."
        )
    key = study_key(args, training_args, model_args, cache)
    held = {k: list(held_out[k]) for k in ("prompt", "chosen", "rejected")}
    common = dict(pool=pool, held_out=held, bon=bon, policy_path=policy_path, args=args,
                  training_args=training_args, model_args=model_args)  # fmt: skip
    initial = {s: initial_rows(train_pairs, s, args.initial_pairs) for s in args.seeds}
    first = [ChainJob(cache, key, None, s, 0, initial=initial[s], **common) for s in args.seeds]
    starts = {rec["seed"]: rec for out in workers.map(run_chain_job, first, desc="First models") for rec in out}
    jobs = [ChainJob(cache, key, strategy, s, args.num_rounds, initial=initial[s], **common)
            for strategy in args.strategies for s in args.seeds]  # fmt: skip
    records = []
    for job, out in zip(jobs, workers.map(run_chain_job, jobs, desc="Rounds (strategy x seed)"), strict=True):
        records.append({**starts[job.seed], "strategy": job.strategy})
        records.extend(out)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def curve(records: list[dict[str, Any]], strategy: str, column: str) -> tuple[list[int], Any, Any]:
    """(label counts, mean over seeds, std over seeds) of `column` for `strategy`."""
    import numpy as np

    by_labels: dict[int, list[float]] = {}
    for r in records:
        if r["strategy"] == strategy and r[column] != "":
            by_labels.setdefault(r["num_labels"], []).append(float(r[column]))
    labels = sorted(by_labels)
    values = [np.asarray(by_labels[n]) for n in labels]
    return labels, np.array([v.mean() for v in values]), np.array([v.std() for v in values])


def plot_active_curves(path: Path, records: list[dict[str, Any]], args) -> None:
    """Each metric against the number of labels, mean ± std over seeds per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("map_accuracy", "held-out pair accuracy (MAP)"), ("map_nll", "held-out Bradley-Terry NLL (MAP)")]
    panels += [(f"bon_{m}_{n}", f"Best-of-{n} gold, {name}") for m, name in (("map", "MAP"), ("la_rel", "LA-rel"))
               for n in args.ns]  # fmt: skip
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for ax, (column, title) in zip(axes.flat, panels, strict=False):  # more axes than panels
        for i, strategy in enumerate(args.strategies):
            labels, mean, std = curve(records, strategy, column)
            ax.plot(labels, mean, marker="o", ms=3, color=plt.cm.tab10(i), label=strategy)
            ax.fill_between(labels, mean - std, mean + std, color=plt.cm.tab10(i), alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("labelled pairs")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Active reward learning: mean ± std over {len(args.seeds)} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def labels_to_reach(records: list[dict[str, Any]], strategy: str, target: float) -> int | None:
    """The fewest labels from which on `strategy`'s mean held-out accuracy over seeds stays at or above `target` (None:
    not at the last round). "Stays": a curve that touches the target once and falls back has not reached it."""
    labels, mean, _ = curve(records, strategy, "map_accuracy")
    reached = None
    for n, m in zip(labels[::-1], mean[::-1], strict=True):
        if m < target:
            break
        reached = n
    return reached


def paired_differences(records: list[dict[str, Any]], strategy: str, column: str) -> list[float]:
    """Per seed, the mean over rounds > 0 of `strategy`'s `column` minus random's at the same round."""
    import numpy as np

    values = {(r["strategy"], r["seed"], r["round"]): float(r[column]) for r in records if r["round"] > 0}
    seeds = sorted({seed for s, seed, _ in values if s == strategy})
    return [
        float(
            np.mean([v - values["random", seed, r] for (s, sd, r), v in values.items() if (s, sd) == (strategy, seed)])
        )
        for seed in seeds
    ]


def write_active_summary(path: Path, records: list[dict[str, Any]], args, seconds: dict[str, float],
                         cached: dict[str, float], sources: dict[str, str]) -> None:  # fmt: skip
    """`summary.md`: the final round per strategy, labels saved to reach random's final accuracy, the curves per round,
    the selection diagnostics, and the cost per round against the pipeline's stages."""
    import numpy as np

    from trl_bayes.experiments.report import fmt

    final = max(r["num_labels"] for r in records)
    training = "from scratch, as a Best-of-N proxy"
    if args.warm_start:
        training = f"warm start from the last round's adapter, {args.warm_start_epochs} epoch(s)"
    lines = ["# Active reward learning", ""]
    lines += [f"- {name}: {value}" for name, value in sources.items()]
    lines += [
        f"- labels: {args.initial_pairs} from the pairs stage, then {args.pairs_per_round} per round for "
        f"{args.num_rounds} rounds ({args.label_noise:.0%} of every label flipped); seeds {args.seeds}; "
        f"pool: {args.pool_candidates} candidates per training prompt",
        f"- training per round: {training}",
        f"- Best-of-n on the first {args.num_bon_prompts} held-out prompts x {args.num_samples} samples; LA-rel: std "
        f"of the relative variance, k = {args.la_rel_k} (fixed before the run)",
        "",
        f"## After the last round ({final} labels): mean ± std over seeds",
        "",
    ]
    bon = [f"bon_{m}_{n}" for m in ("map", "la_rel") for n in args.ns]
    names = ["accuracy", "BT NLL", *(f"{'MAP' if c.startswith('bon_map') else 'LA-rel'} BoN-{c.rsplit('_', 1)[1]}"
                                       for c in bon)]  # fmt: skip
    lines += ["| strategy | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for strategy in args.strategies:
        rows = [r for r in records if r["strategy"] == strategy and r["num_labels"] == final]
        cells = [fmt([r[c] for r in rows]) for c in ("map_accuracy", "map_nll", *bon)]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Labels to reach random's final accuracy", ""]
    if "random" in args.strategies:
        _, mean, _ = curve(records, "random", "map_accuracy")
        target = float(mean[-1])
        lines += [f"Random reaches {target:.3f} (mean over seeds) with {final} labels. Below: the fewest labels from "
                  "which on a strategy's mean accuracy stays at or above that.", "",
                  "| strategy | labels to reach it | labels saved |", "|---|---|---|"]  # fmt: skip
        for strategy in args.strategies:
            n = labels_to_reach(records, strategy, target)
            saved = "not reached" if n is None else f"{final - n} ({(final - n) / final:.0%})"
            lines.append(f"| {strategy} | {'never' if n is None else n} | {saved} |")
    if "random" in args.strategies:
        lines += ["", f"## Paired differences to random, averaged over rounds 1-{args.num_rounds}", "",
                  "Per seed, the strategy's metric minus random's at the same number of labels (same first model, "
                  "same labeller), averaged over the rounds; mean ± std over seeds. Accuracy and gold: higher is "
                  "better; NLL: lower is better.", "",
                  "| strategy | accuracy | BT NLL | " + " | ".join(bon) + " |",
                  "|---" * (3 + len(bon)) + "|"]  # fmt: skip
        for strategy in [s for s in args.strategies if s != "random"]:
            cells = [fmt(paired_differences(records, strategy, c)) for c in ("map_accuracy", "map_nll", *bon)]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Per round (mean over seeds)", "",
              "| strategy | labels | accuracy | BT NLL | " + " | ".join(bon) + " |",
              "|---" * (4 + len(bon)) + "|"]  # fmt: skip
    for strategy in args.strategies:
        labels, _, _ = curve(records, strategy, "map_accuracy")
        for n in labels:
            rows = [r for r in records if r["strategy"] == strategy and r["num_labels"] == n]
            cells = [f"{np.mean([float(r[c]) for r in rows]):.3f}" for c in ("map_accuracy", "map_nll", *bon)]
            lines.append(f"| {strategy} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"## What was selected (per round, mean over seeds and rounds 1-{args.num_rounds})", "",
              f"Each round picks {args.pairs_per_round} pairs; `distinct prompts` of them, the most from one prompt, "
              "near-duplicates (the two responses one word edit apart) and the mean gold gap |gold(a) - gold(b)|.", "",
              "| strategy | distinct prompts (min-max) | max pairs per prompt | near-duplicates | gold gap |",
              "|---|---|---|---|---|"]  # fmt: skip
    for strategy in args.strategies:
        rows = [r for r in records if r["strategy"] == strategy and r["round"] > 0]
        distinct = [r["distinct_prompts"] for r in rows]
        lines.append(
            f"| {strategy} | {np.mean(distinct):.1f} ({min(distinct)}-{max(distinct)}) | "
            f"{np.mean([r['max_pairs_per_prompt'] for r in rows]):.1f} | "
            f"{np.mean([r['near_duplicates'] for r in rows]):.1%} | "
            f"{np.mean([r['mean_gold_gap'] for r in rows]):.2f} |"
        )
    lines += ["", "## Cost", "", f"Seconds per round (mean over strategies, seeds and rounds 1-{args.num_rounds}; "
              "one CPU thread each):", "", "| part | seconds |", "|---|---|"]  # fmt: skip
    later = [r for r in records if r["round"] > 0]
    for column in SECONDS:
        lines.append(f"| {column.replace('_seconds', '')} | {np.mean([r[column] for r in later]):.1f} |")
    lines.append(f"| round (select + train + evaluate) | {np.mean([sum(r[c] for c in SECONDS) for r in later]):.1f} |")
    lines += ["", "Against the pipeline's stages (seconds when computed, from their caches):", "",
              "| stage | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {value:.1f} |" for name, value in cached.items()]
    lines += ["", "This run's wall time per part:", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in seconds.items()]
    path.write_text("\n".join(lines) + "\n")
