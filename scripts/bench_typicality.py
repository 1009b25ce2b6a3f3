"""Benchmark of the hidden-state Mahalanobis typicality (`PenalizedReward(..., uncertainty="hidden_mahalanobis")`).

Measures, in one run, on one CPU thread (random weights and features; nothing is downloaded):

1. `typicality.group_mahalanobis` on the dense path (`dense=True`: each group's (D, D) shrunk covariance, Cholesky)
   and on its default path (the low-rank SVD of `low_rank_mahalanobis` for groups of n <= D / 4 rows, O(n^2 D)), at
   Best-of-N's shape (1,024 x 512, groups of 8), a large one (8,192 x 512, groups of 64) and the offline world's
   (4,096 x 64, groups of 512: n > D, where the default takes the dense path too), with the largest relative
   difference between the two;
2. on a small GPT-NeoX reward model built from a config (LoRA adapter, float32), the time of MAP scoring
   (`BayesianRewardModel.predict(..., return_var=False)`), of the hidden features with two forward passes (`predict`
   then `predict_hidden`) and with one (`predict_hidden(..., return_rewards=True)`), and of the one-forward features
   plus `group_mahalanobis`, as ratios to MAP scoring.

Each time is the best of `--repeats` runs; "others' CPU" is the share of the machine's CPU capacity that other
processes took meanwhile (`bench_posterior.Probe`), which would inflate the times.

Command (from the repository root; about 1 minute):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_typicality.py
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from bench_posterior import Probe  # scripts/ is on the path when this script runs
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoXForSequenceClassification

from trl_bayes import BayesianRewardModel
from trl_bayes.experiments.world import build_tokenizer, tiny_gpt_neox_config, vocabulary
from trl_bayes.typicality import group_mahalanobis, predict_hidden


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any, Probe]:
    """The fastest of `repeats` calls: (seconds, result, probe of that call)."""
    runs = []
    for _ in range(repeats):
        with Probe() as probe:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        runs.append((seconds, result, probe))
    return min(runs, key=lambda run: run[0])


def bench_distances(repeats: int) -> None:
    print("group_mahalanobis (shrinkage 0.1), float32 features, one thread")
    print(f"{'shape':>12} {'group':>6} {'default path':>13} {'dense s':>9} {'default s':>10} {'speed-up':>9} "
          f"{'max rel diff':>13} {'others CPU':>11}")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for rows, dim, size in ((1024, 512, 8), (8192, 512, 64), (4096, 64, 512)):
        # Correlated features of unequal scales with a common offset, as hidden states are.
        mixing = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=generator)
        features = torch.randn(rows, dim, generator=generator) @ mixing + 4 * torch.randn(dim, generator=generator)
        groups = torch.arange(rows) // size
        dense, _, dense_probe = best_of(lambda f=features, g=groups: group_mahalanobis(f, g, dense=True), repeats)
        default, _, probe = best_of(lambda f=features, g=groups: group_mahalanobis(f, g), repeats)
        # Compared in float64: in float32 both paths round to the same numbers.
        exact = group_mahalanobis(features.double(), groups, dense=True)
        difference = ((group_mahalanobis(features.double(), groups) - exact).abs() / exact).max()
        path = "low-rank" if 4 * size <= dim else "dense"
        others = max(dense_probe.others, probe.others)
        print(f"{rows:>6}x{dim:<5} {size:>6} {path:>13} {dense:9.3f} {default:10.3f} {dense / default:8.1f}x "
              f"{difference:13.1e} {others:11.0%}")  # fmt: skip


def bench_scoring(args: argparse.Namespace) -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
        max_position_embeddings=2 * args.seq_len, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query_key_value"])
    model = get_peft_model(GPTNeoXForSequenceClassification(config).float(), lora)
    # MAP scoring and the hidden features read no posterior: a stand-in with no Laplace parameters.
    reward_model = BayesianRewardModel(model, tokenizer, SimpleNamespace(params=[]), metadata={})

    # `args.groups` prompts with `args.group_size` completions each, random words of the offline world's vocabulary.
    rng = random.Random(0)
    words = vocabulary()[3:]  # no special tokens
    prompts, completions = [], []
    for _ in range(args.groups):
        prompt = " ".join(rng.choices(words, k=8))
        for _ in range(args.group_size):
            prompts.append(prompt)
            completions.append(" ".join(rng.choices(words, k=rng.randint(args.seq_len * 7 // 8, args.seq_len) - 9)))
    groups = torch.arange(len(prompts)) // args.group_size

    def one_forward_mahalanobis() -> torch.Tensor:
        features, _ = predict_hidden(reward_model, prompts, completions, args.batch_size, return_rewards=True)
        return group_mahalanobis(features, groups)

    phases: dict[str, Callable[[], Any]] = {
        "MAP scoring (predict, return_var=False)": lambda: reward_model.predict(
            prompts, completions, args.batch_size, return_var=False
        ),
        "hidden, two forwards (predict + predict_hidden)": lambda: (
            reward_model.predict(prompts, completions, args.batch_size, return_var=False),
            predict_hidden(reward_model, prompts, completions, args.batch_size),
        ),
        "hidden, one forward (return_rewards=True)": lambda: predict_hidden(
            reward_model, prompts, completions, args.batch_size, return_rewards=True
        ),
        "one forward + group_mahalanobis": one_forward_mahalanobis,
    }
    reward_model.predict(prompts[:2], completions[:2], return_var=False)  # warm-up
    print(
        f"\nScoring {len(prompts)} responses of ~{args.seq_len} tokens (groups of {args.group_size}), GPT-NeoX "
        f"hidden {args.hidden_size} x {args.layers} layers + LoRA, float32, batch size {args.batch_size}, one thread"
    )
    print(f"{'phase':<48} {'seconds':>8} {'x MAP time':>11} {'others CPU':>11}")
    times = {name: best_of(fn, args.repeats) for name, fn in phases.items()}
    map_seconds = times[next(iter(phases))][0]
    for name, (seconds, _, probe) in times.items():
        print(f"{name:<48} {seconds:8.3f} {seconds / map_seconds:10.2f}x {probe.others:11.0%}")
    map_phase, _, one_forward_phase, _ = phases
    means, _ = times[map_phase][1]
    _, rewards = times[one_forward_phase][1]
    print(f"one-forward rewards equal the MAP rewards bit for bit: {torch.equal(means, rewards)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the fastest counts")
    parser.add_argument("--groups", type=int, default=32, help="prompts scored, `--group-size` completions each")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96, help="longest response in tokens (prompt included)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_distances(args.repeats)
    bench_scoring(args)


if __name__ == "__main__":
    main()
