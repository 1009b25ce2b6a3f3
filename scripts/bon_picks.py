"""What Best-of-N picks at n = N on the offline world: length, distinct on-topic items, repeated words and gold of each
method's choice, from the cache of a finished `recipes/bon.py` run (nothing is recomputed).

    python scripts/bon_picks.py --output_dir outputs/bon --seeds 0 1 2 3 4 5 --k 4

Rankings (each seed's member 0): MAP; LA and LA-rel with the std penalty at strength k; and the two stds alone
(k -> infinity: the lowest marginal / relative std wins). "all samples" is the average sample (n = 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trl_bayes.experiments.best_of_n_study import unique_responses
from trl_bayes.experiments.world import CATEGORIES, gold_score, prompt_category

COLUMNS = ("words", "distinct on-topic", "repeated words", "gold")


def describe(prompts: list[str], completions: list[list[str]], picks: np.ndarray) -> np.ndarray:
    """Mean (words, distinct on-topic items, repeated words, gold) of `completions[p][picks[p]]` over prompts."""
    rows = []
    for p, j in enumerate(picks):
        text, category = completions[p][j], prompt_category(prompts[p])
        words = text.split()
        on_topic = {w for w in words if w in CATEGORIES[category]}
        rows.append((len(words), len(on_topic), len(words) - len(set(words)), gold_score(category, text)))
    return np.array(rows, dtype=np.float64).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/bon")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=float, default=4.0)
    args = parser.parse_args()
    cache = Path(args.output_dir) / "cache"
    prompts = json.loads((cache / "world" / "prompts.json").read_text())["eval"]
    blocks = sorted((cache / "samples").glob("block*.json"))
    completions = [c for b in blocks for c in json.loads(b.read_text())["completions"]][: len(prompts)]
    _, inverse = unique_responses(prompts, completions)
    inverse = np.asarray(inverse)
    results: dict[str, list[np.ndarray]] = {}
    for seed in args.seeds:
        scores = np.load(cache / "scores" / f"seed{seed}-member0" / "scores.npz")
        if "rel_var" not in scores:
            raise SystemExit(f"{args.output_dir} has no relative variances: run bon.py with LA-rel in --methods.")
        mean, var, rel = (scores[name][inverse] for name in ("mean", "var", "rel_var"))
        rankings = {
            "MAP": mean,
            f"LA (std, k={args.k:g})": mean - args.k * np.sqrt(var),
            f"LA-rel (std, k={args.k:g})": mean - args.k * np.sqrt(rel),
            "lowest marginal std": -np.sqrt(var),
            "lowest relative std": -np.sqrt(rel),
        }
        for name, rank in rankings.items():
            results.setdefault(name, []).append(describe(prompts, completions, rank.argmax(1)))
    average = np.mean(
        [describe(prompts, completions, np.full(len(prompts), j)) for j in range(len(completions[0]))], 0
    )
    n = len(completions[0])
    print(f"Picks at n = {n} on {len(prompts)} prompts, mean ± std over seeds {args.seeds}\n")
    print("| ranking | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, values in results.items():
        values = np.array(values)
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(values.mean(0), values.std(0), strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| all samples (n = 1) | " + " | ".join(f"{v:.2f}" for v in average) + " |")


if __name__ == "__main__":
    main()
