"""Benchmark of `best_of_n_estimate` for every n at once: the fast path against the previous implementation.

The previous implementation (`reference_estimate`, copied below) computes log-gamma weights for every (n, i),
normalizes them and applies them to each prompt's rank-sorted eval scores: a (P, N) x (N, K) product, 1.6e11
multiply-adds at P = 1000 prompts, N = 12,500 samples and K = N sample counts. The estimate is linear in the
rank-sorted eval scores, so `best_of_n_estimate` (reduce=True) averages them over prompts first and applies the weights
to one (N,) vector by Horner's scheme on the ratio of neighbouring weights, without forming them (N^2 / 2 steps).

Printed, from one run on the same random scores (rank scores rounded, so that there are ties):

1. wall time of each, the speed-up, and the share of the machine's CPU that other processes took meanwhile (from
   /proc/stat: all busy jiffies minus this process's own CPU time, over wall time x cores);
2. max |new - old| over all n, absolute and relative;
3. for a few n, the error of each against exact arithmetic: the weights as Python-integer binomial ratios, applied in
   rationals to the prompt-mean of the rank-sorted scores (each column summed with `math.fsum`: correctly rounded).

Commands (from the repository root):

    .venv/bin/python scripts/bench_best_of_n.py                                # 1000 x 12,500, about 30 s
    .venv/bin/python scripts/bench_best_of_n.py --prompts 50 --samples 2000    # about 10 s
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from trl_bayes import best_of_n_estimate


def reference_estimate(rank: np.ndarray, evals: np.ndarray, ns: list[int]) -> np.ndarray:
    """The estimator before the fast path (reduce=True): normalized log-gamma weights applied prompt by prompt."""
    num_samples = rank.shape[1]
    n = torch.tensor(ns, dtype=torch.float64).unsqueeze(1)  # (K, 1)
    i = torch.arange(1, num_samples + 1, dtype=torch.float64).unsqueeze(0)  # (1, N)
    log_w = torch.lgamma(i) - torch.lgamma(n) - torch.lgamma((i - n + 1).clamp(min=1))
    log_w = log_w.masked_fill(i < n, float("-inf"))
    w = (log_w - log_w.max(dim=1, keepdim=True).values).exp()
    weights = (w / w.sum(dim=1, keepdim=True)).numpy()  # (K, N)
    _, sorted_eval = _sorted_tie_averaged(rank, evals)
    return (sorted_eval @ weights.T).T.mean(axis=1)


def _sorted_tie_averaged(rank: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by rank score (eval scores in the same order), eval scores averaged over groups of tied ranks."""
    order = np.argsort(rank, axis=1)
    sorted_rank = np.take_along_axis(rank, order, axis=1)
    sorted_eval = np.take_along_axis(evals, order, axis=1)
    starts = np.ones_like(sorted_rank, dtype=bool)
    starts[:, 1:] = sorted_rank[:, 1:] != sorted_rank[:, :-1]
    first = np.flatnonzero(starts)  # every row opens a group, so no group spans two rows of the flattened array
    counts = np.diff(np.append(first, sorted_eval.size))
    sums = np.add.reduceat(sorted_eval.ravel(), first)
    return sorted_rank, np.repeat(sums / counts, counts).reshape(sorted_eval.shape)


def exact_estimate(mean_sorted: list[Fraction], n: int) -> Fraction:
    """sum_i C(i - 1, n - 1) / C(N, n) * m_i over the prompt-mean rank-sorted scores m, in rationals."""
    num_samples = len(mean_sorted)
    binomial, total = 1, Fraction(0)  # C(i - 1, n - 1), from i = n
    for i in range(n, num_samples + 1):
        total += binomial * mean_sorted[i - 1]
        binomial = binomial * i // (i - n + 1)
    return total / math.comb(num_samples, n)


# ---------------------------------------------------------------------------------------------------------------------
# Timing, and the CPU other processes took meanwhile (which would inflate our wall times).


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (first line of /proc/stat, minus idle and iowait)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float, float]:
    """Run `fn` once: its result, the wall seconds, and the share of the machine's CPU other processes took."""
    busy, own, start = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    busy_after, own_after = _machine_busy_seconds(), _own_cpu_seconds()
    others = float("nan")
    if busy is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy) - (own_after - own)) / (wall * (os.cpu_count() or 1))
    return result, wall, others


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--prompts", type=int, default=1000, help="P, prompts")
    parser.add_argument(
        "--samples", type=int, default=12_500, help="N, samples per prompt; all n = 1..N are estimated"
    )
    parser.add_argument("--levels", type=int, default=2000, help="rank scores are rounded to 1/levels: ties")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    shape = (args.prompts, args.samples)
    rank = np.round(rng.standard_normal(shape) * args.levels) / args.levels
    evals = 1.0 + 0.5 * rank + rng.standard_normal(shape)
    ns = list(range(1, args.samples + 1))
    print(f"P = {args.prompts} prompts x N = {args.samples} samples, all n = 1..N; {os.cpu_count()} CPUs, torch "
          f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip

    new, new_s, new_others = timed(lambda: best_of_n_estimate(rank, evals, ns))
    old, old_s, old_others = timed(lambda: reference_estimate(rank, evals, ns))
    print(f"new (fast path)       {new_s:8.3f} s   others' CPU {new_others:4.0%}")
    print(f"old (reference)       {old_s:8.3f} s   others' CPU {old_others:4.0%}")
    print(f"speed-up              {old_s / new_s:8.1f} x")
    diff = np.abs(new - old)
    print(f"max |new - old|       {diff.max():.3e}   max relative {np.max(diff / np.abs(old)):.3e}")

    _, sorted_eval = _sorted_tie_averaged(rank, evals)
    mean_sorted = [Fraction(math.fsum(column)) / args.prompts for column in sorted_eval.T.tolist()]
    print("error against exact arithmetic (prompt-mean of the sorted scores: one rounding per entry):")
    for n in sorted({1, 2, 16, 256, args.samples // 2, args.samples - 1, args.samples} & set(ns)):
        exact = exact_estimate(mean_sorted, n)
        new_err, old_err = float(abs(Fraction(new[n - 1]) - exact)), float(abs(Fraction(old[n - 1]) - exact))
        print(f"  n = {n:6d}   exact {float(exact):+.17f}   |new - exact| {new_err:.2e}   |old - exact| {old_err:.2e}")


if __name__ == "__main__":
    main(make_parser().parse_args())
