"""Best-of-n sampling: draw n completions per prompt from a policy, score them with a (penalized) reward, keep the best.

Two parts:

- `best_of_n_estimate`: the unbiased estimator of the Best-of-n score from N >= n samples per prompt (Nakano et al.
  2021, arXiv 2112.09332; Gao et al. 2023, arXiv 2210.10760; Yang et al. 2024, arXiv 2402.13210, App. B). One set of N
  samples, ranked by a proxy reward and evaluated by a gold reward, gives the expected gold score of Best-of-n for
  every n <= N at once. `kl_best_of_n` is the analytical KL(BoN_n || policy) the results are plotted against.
- `BestOfNSampler`: generation + scoring + selection, split over Accelerate processes by fixed prompt chunks, so the
  same seed gives the same samples on any number of processes.

Example:
```python
>>> sampler = BestOfNSampler(policy, tokenizer, reward=PenalizedReward(rm), n=16, seed=0)
>>> out = sampler(["please list fruits : "])
>>> out.best_completions
```
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

# `RefuseNaNLogits` and `chunk_seed` lived here before `generation` held the one sampling loop: still importable here.
from .generation import RefuseNaNLogits as RefuseNaNLogits
from .generation import chunk_seed, decode_completions, generate, tokenize_prompts

# ---------------------------------------------------------------------------------------------------------------------
# The unbiased Best-of-n estimator: pure functions over (P, N) = (prompts, samples) arrays.


def kl_best_of_n(n: int | np.ndarray) -> float | np.ndarray:
    """KL divergence between the Best-of-n distribution and the policy: log(n) - (n - 1) / n (Stiennon et al. 2020).

    An upper bound (exact when the reward has no ties) and the x-axis of the Best-of-n plots of Gao et al. 2023.

    Args:
        n: number of samples, a scalar or an array of any shape (all >= 1).

    Returns:
        The KL in nats, a float for a scalar `n`, else an array of `n`'s shape.
    """
    n_array = np.asarray(n, dtype=np.float64)
    if np.any(~(n_array >= 1)):  # also catches NaN
        raise ValueError(f"n must be >= 1, got {n}.")
    kl = np.log(n_array) - (n_array - 1.0) / n_array
    return float(kl) if kl.ndim == 0 else kl


def best_of_n_weights(num_samples: int, ns: Sequence[int]) -> np.ndarray:
    """Probability that the i-th smallest of `num_samples` values is the maximum of a uniformly random n-subset.

    w[k, i - 1] = C(i - 1, n_k - 1) / C(N, n_k) for i >= n_k, else 0: the subset holds sample i and n_k - 1 of the
    i - 1 samples below it. No binomial is ever formed (C(12500, 1000) overflows any float): from the top,
    w[k, N - 1] = n_k / N, and each weight is its upper neighbour times (i - n_k) / (i - 1), a cumulative product in
    float64: each weight carries two roundings per step down (measured relative error at most 1e-13 at N = 12,500;
    differences of log-gammas near 1e5 would lose 1e-11). Weights under ~1e-308 lose digits or underflow to 0: they
    weigh nothing next to the largest of their row, n_k / N >= 1 / N.

    Returns:
        Weights of shape `(len(ns), num_samples)`, float64 (a transposed view: `weights.T` is C-contiguous).
    """
    n = np.array(list(ns), dtype=np.float64)  # (K,)
    weights = np.empty((num_samples, n.size))  # (N, K): filled one sample index i at a time, contiguous rows
    weights[-1] = n / num_samples
    for i in range(num_samples, 1, -1):
        # w(i - 1) / w(i) = C(i - 2, n - 1) / C(i - 1, n - 1), which is 0 from i = n down.
        np.multiply(weights[i - 1], _weight_ratio(i, n), out=weights[i - 2])
    return weights.T


def _weight_ratio(i: int, n: np.ndarray) -> np.ndarray:
    """w(i - 1) / w(i) = (i - n) / (i - 1) for 2 <= i <= N, and 0 where i <= n: one correctly rounded division."""
    return np.maximum(i - n, 0.0) / (i - 1)


def _best_of_n_of_sorted(sorted_eval: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """`best_of_n_weights(N, ns) @ sorted_eval` without forming the `(len(ns), N)` weights. `sorted_eval`: `(N,)`.

    Horner's scheme on the same ratios: sum_i w(i) e_i = w(N) (e_N + r_N (e_(N-1) + r_(N-1) (... + r_(n+1) e_n))),
    with w(N) = n / N and r_i = w(i - 1) / w(i). Innermost first, all n at once: the sum for n starts at i = n, so step
    i updates only the n <= i (N^2 / 2 multiply-adds for all n = 1..N). Early roundings are damped by the later r_i < 1.

    Returns:
        The estimates, `(len(ns),)` float64, in the order of `ns` (repeats allowed).
    """
    num_samples = sorted_eval.shape[0]
    unique_ns, inverse = np.unique(np.asarray(ns, dtype=np.int64), return_inverse=True)  # ascending
    n = unique_ns.astype(np.float64)
    active = np.searchsorted(unique_ns, np.arange(1, num_samples + 1), side="right")  # at step i: the n <= i
    nested = np.zeros(n.size)
    nested[: active[0]] = sorted_eval[0]  # i = 1 (its ratio would be 0 / 0)
    for i in range(2, num_samples + 1):
        k = active[i - 1]
        nested[:k] *= _weight_ratio(i, n[:k])  # 0 at i = n: the sum for n starts there
        nested[:k] += sorted_eval[i - 1]
    return (nested * (n / num_samples))[inverse]


def _as_float64(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (prompts, samples), got shape {x.shape}.")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN.")
    return x


def _rank_sorted(rank_row: np.ndarray, eval_row: np.ndarray) -> np.ndarray:
    """One prompt's eval scores `(N,)` in ascending order of its rank scores `(N,)`, each group of ties averaged."""
    order = np.argsort(rank_row)
    return _average_ties(rank_row[order], eval_row[order])  # the same permutation as the ranking


def _average_ties(sorted_rank: np.ndarray, sorted_eval: np.ndarray) -> np.ndarray:
    """Replace each eval score by the mean over its group of equal rank scores. Both `(N,)`, sorted by rank.

    A sample without ties is a group of one, whose mean is itself, bit for bit.
    """
    starts = np.ones_like(sorted_rank, dtype=bool)
    starts[1:] = sorted_rank[1:] != sorted_rank[:-1]
    if starts.all():
        return sorted_eval
    first = np.flatnonzero(starts)
    sums = np.add.reduceat(sorted_eval, first)
    counts = np.diff(np.append(first, sorted_eval.size))
    return np.repeat(sums / counts, counts)


def best_of_n_estimate(
    rank_scores: np.ndarray | torch.Tensor,
    eval_scores: np.ndarray | torch.Tensor,
    ns: Sequence[int],
    reduce: bool = True,
) -> np.ndarray:
    """Unbiased estimate of E[eval score of the sample with the highest rank score among n], for every n in `ns`.

    For each prompt, the N samples are sorted by rank score; the i-th smallest (1-indexed) is the best of a uniformly
    random n-subset (without replacement) with probability C(i - 1, n - 1) / C(N, n), and the estimate is the
    weighted sum of the eval scores *in the same order*: eval scores follow the ranking, they are never sorted on their
    own (the bug that left gold scores in their original order in an ensemble Best-of-n script).

    Ties in rank scores are broken uniformly at random, in expectation: the eval scores of each group of equal rank
    scores are replaced by their mean. The result does not depend on the order of the samples.

    Args:
        rank_scores: `(P, N)` scores that pick the best sample (the proxy or penalized reward), numpy or torch.
        eval_scores: `(P, N)` scores of the same samples to report (the gold reward). Must not be infinite.
        ns: sample counts, each 1 <= n <= N.
        reduce: average over prompts.

    Returns:
        float64 array of shape `(len(ns),)`, or `(len(ns), P)` with `reduce=False`.

    Example:
    ```python
    >>> best_of_n_estimate([[0.1, 0.5, 0.3]], [[1.0, 2.0, 3.0]], ns=[1, 2, 3])  # n=2: (0 * 1 + 1 * 3 + 2 * 2) / 3
    array([2.        , 2.33333333, 2.        ])
    ```
    """
    rank = _as_float64(rank_scores, "rank_scores")
    evals = _as_float64(eval_scores, "eval_scores")
    if rank.shape != evals.shape:
        raise ValueError(f"rank_scores and eval_scores must have the same shape, got {rank.shape} and {evals.shape}.")
    if np.isinf(evals).any():
        raise ValueError("eval_scores contains inf: a zero weight times inf would make the estimate NaN.")
    num_samples = rank.shape[1]
    ns = list(ns)
    if not ns:
        raise ValueError("ns is empty: pass at least one sample count.")
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= num_samples:
            raise ValueError(f"ns must hold integers 1 <= n <= N = {num_samples} (samples per prompt), got {n!r}.")

    # Prompt by prompt: a row (100 kB at N = 12,500) stays in cache from sort to tie averaging.
    if reduce:
        # The estimate is linear in the rank-sorted eval scores, so the mean over prompts of the estimates is the
        # estimate of the prompt-mean of the sorted scores: one weighting of N scores instead of P, and no (P, N)
        # array (at P = 1000, N = 12,500 and all n: 1.6e8 multiply-adds instead of 1.6e11).
        mean_sorted = np.zeros(num_samples)
        for rank_row, eval_row in zip(rank, evals, strict=True):
            mean_sorted += _rank_sorted(rank_row, eval_row)
        return _best_of_n_of_sorted(mean_sorted / rank.shape[0], ns)
    sorted_eval = np.empty_like(evals)
    for p, (rank_row, eval_row) in enumerate(zip(rank, evals, strict=True)):
        sorted_eval[p] = _rank_sorted(rank_row, eval_row)
    return (sorted_eval @ best_of_n_weights(num_samples, ns).T).T  # (K, P)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling.


@dataclass
class BestOfNOutput:
    """What `BestOfNSampler` returns, in the order of the prompts.

    Attributes:
        prompts: the P prompts.
        completions: P lists of n completions, strings (or `[{"role": "assistant", "content": ...}]` for
            conversational prompts, as TRL passes them to reward functions).
        finished: `(P, n)` bool, whether each completion ended with EOS (else it hit `max_new_tokens`).
        scores: `(P, n)` float64 rewards.
        best_index: `(P,)` index of the highest score per prompt (the first one on ties; samples are i.i.d., so this
            is a uniformly random choice among the tied).
        best_completions: the P selected completions.
    """

    prompts: list[Any]
    completions: list[list[Any]]
    finished: np.ndarray
    scores: np.ndarray
    best_index: np.ndarray
    best_completions: list[Any]


class BestOfNSampler:
    """Best-of-n: n sampled completions per prompt, scored by a TRL reward function, the best one kept.

    Distribution (Accelerate): the prompts are cut into fixed global chunks of `prompt_batch_size` prompts, the chunks
    are dealt to the processes, and the results are gathered back in prompt order. Each chunk samples under its own
    seed, derived from (`seed`, chunk index). What the samples depend on is therefore the seed and the chunking, not the
    number of processes nor the global RNG state (left untouched): 1 and 8 processes give the same output, and a
    chunk's output is the same whatever prompts follow it. Another `prompt_batch_size` draws other (equally valid)
    samples; greedy decoding gives the same completions for any chunking, up to floating-point effects of padding.

    Args:
        policy ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]): a causal LM, on the device to generate on
            (`accelerator.device` when distributed). Wrapped models are unwrapped with `accelerator.unwrap_model`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the policy's tokenizer; needs a pad token.
        reward (`Callable`, *optional*): a TRL reward function `(prompts=..., completions=..., completion_ids=...,
            **kwargs) -> list[float]`, e.g. [`PenalizedReward`]. `None` only allows `generate`.
        n (`int`, *optional*, defaults to `16`): completions per prompt.
        generation_config ([`~transformers.GenerationConfig`], *optional*): decoding settings; defaults to sampling at
            temperature 1 with `max_new_tokens=64`. With `do_sample=False` the n completions are identical.
        prompt_batch_size (`int`, *optional*, defaults to `8`): prompts per chunk; one chunk is one `generate` call over
            `prompt_batch_size * n` sequences unless `generation_batch_size` splits it.
        generation_batch_size (`int`, *optional*): sequences per `generate` call within a chunk (e.g. 500 for the
            12,500 samples of one prompt); `None` = the whole chunk at once. Part of what the samples depend on.
        score_batch_size (`int`, *optional*, defaults to `64`): (prompt, completion) pairs per reward call, rounded
            down to whole prompts (at least one): a prompt's n candidates always reach the reward together.
        seed (`int`, *optional*, defaults to `0`): sampling seed.
        accelerator ([`~accelerate.Accelerator`], *optional*): split the chunks over its processes.
        progress_bar (`bool`, *optional*, defaults to `True`): a tqdm bar over chunks on the main process.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward: Callable[..., list[float]] | None = None,
        n: int = 16,
        generation_config: GenerationConfig | None = None,
        prompt_batch_size: int = 8,
        generation_batch_size: int | None = None,
        score_batch_size: int = 64,
        seed: int = 0,
        accelerator: Accelerator | None = None,
        progress_bar: bool = True,
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if prompt_batch_size < 1 or score_batch_size < 1:
            raise ValueError(
                f"prompt_batch_size and score_batch_size must be >= 1, got {prompt_batch_size} and {score_batch_size}."
            )
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token, which left-padding prompt batches needs. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padded positions are masked, so any token works)."
            )
        if generation_config is None:
            generation_config = GenerationConfig(
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64
            )
        if generation_config.num_return_sequences not in (None, 1):
            raise ValueError(
                f"generation_config.num_return_sequences={generation_config.num_return_sequences}: set `n` instead."
            )
        self.generation_config = copy.deepcopy(generation_config)  # never mutate the caller's config
        if self.generation_config.pad_token_id is None:
            self.generation_config.pad_token_id = tokenizer.pad_token_id
        if self.generation_config.eos_token_id is None:
            self.generation_config.eos_token_id = tokenizer.eos_token_id

        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator is not None and launched != accelerator.num_processes:
            raise RuntimeError(
                f"{launched} processes were launched but the accelerator sees {accelerator.num_processes}: each would "
                "sample every prompt. On CPU pass `Accelerator(cpu=True)`."
            )
        self.policy = accelerator.unwrap_model(policy) if accelerator is not None else policy
        self.tokenizer = tokenizer
        self.reward = reward
        self.n = n
        self.prompt_batch_size = prompt_batch_size
        self.generation_batch_size = generation_batch_size
        self.score_batch_size = score_batch_size
        self.seed = seed
        self.accelerator = accelerator
        self.progress_bar = progress_bar

    # -- public API ----------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Any], return_finished: bool = False
    ) -> list[list[Any]] | tuple[list[list[Any]], np.ndarray]:
        """n completions per prompt (P lists of n), and with `return_finished` the `(P, n)` ended-with-EOS flags."""
        chunks = self._run(prompts, with_scores=False)
        completions = [c for chunk in chunks for c in chunk["completions"]]
        finished = np.concatenate([chunk["finished"] for chunk in chunks])
        return (completions, finished) if return_finished else completions

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Sequence[Any]],
        completion_ids: Sequence[Sequence[list[int]]] | None = None,
    ) -> np.ndarray:
        """Rewards of `completions[p][j]` to `prompts[p]`, `(P, n)` float64, in this process (not distributed)."""
        if self.reward is None:
            raise ValueError("This sampler has no reward: pass `reward=` to score completions.")
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} lists of completions.")
        width = {len(c) for c in completions}
        if len(width) > 1:
            raise ValueError(f"Every prompt needs the same number of completions, got {sorted(width)}.")
        flat_prompts = [p for p, cs in zip(prompts, completions, strict=True) for _ in cs]
        flat_completions = [c for cs in completions for c in cs]
        flat_ids = None if completion_ids is None else [ids for row in completion_ids for ids in row]
        scores: list[float] = []
        # Whole prompts per reward call (at least one, even above `score_batch_size`): a reward that compares a
        # prompt's candidates with each other (`PenalizedReward(uncertainty="relative")`) must see all of them.
        n = width.pop() if width else 0
        step = max(1, self.score_batch_size // max(n, 1)) * n
        for start in range(0, len(flat_completions), max(step, 1)):
            stop = min(start + step, len(flat_completions))
            batch = self.reward(
                prompts=flat_prompts[start:stop],
                completions=flat_completions[start:stop],
                completion_ids=None if flat_ids is None else flat_ids[start:stop],
            )
            if len(batch) != stop - start:
                raise ValueError(f"The reward returned {len(batch)} scores for {stop - start} completions.")
            scores.extend(batch)
        # None (TRL's "reward not applicable") becomes NaN and is refused: a best-of-n choice needs every score.
        array = np.array(scores, dtype=np.float64).reshape(len(completions), -1)
        if np.isnan(array).any():
            raise ValueError("The reward returned None or NaN for some completions; Best-of-n needs every score.")
        return array

    def sample(self, prompts: Sequence[Any]) -> BestOfNOutput:
        """Generate n completions per prompt, score them and select the best; see the class docstring."""
        if self.reward is None:
            raise ValueError("This sampler has no reward: pass `reward=` to select the best, or call `generate`.")
        chunks = self._run(prompts, with_scores=True)
        completions = [c for chunk in chunks for c in chunk["completions"]]
        scores = np.concatenate([chunk["scores"] for chunk in chunks])
        best_index = scores.argmax(axis=1)
        return BestOfNOutput(
            prompts=list(prompts),
            completions=completions,
            finished=np.concatenate([chunk["finished"] for chunk in chunks]),
            scores=scores,
            best_index=best_index,
            best_completions=[row[i] for row, i in zip(completions, best_index, strict=True)],
        )

    __call__ = sample

    # -- internals -----------------------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Any], with_scores: bool) -> list[dict[str, Any]]:
        """Generate (and score) every chunk, split over processes; the chunk records of all processes, in order."""
        prompt_ids, conversational = tokenize_prompts(self.tokenizer, prompts)
        starts = list(range(0, len(prompts), self.prompt_batch_size))
        chunk_indices = list(range(len(starts)))
        if self.accelerator is not None:
            # Contiguous blocks of chunks per process; gather_object concatenates them back in process order.
            with self.accelerator.split_between_processes(chunk_indices) as local:
                local_chunks = list(local)
            is_main = self.accelerator.is_main_process
        else:
            local_chunks, is_main = chunk_indices, True
        records = []
        for c in tqdm(local_chunks, desc=f"Best-of-{self.n}", disable=not (self.progress_bar and is_main)):
            chunk = slice(starts[c], starts[c] + self.prompt_batch_size)
            chunk_prompts, seed = list(prompts[chunk]), chunk_seed(self.seed, c)
            completions, finished, ids = self._generate_chunk(prompt_ids[chunk], seed, conversational)
            record = {"chunk": c, "completions": completions, "finished": finished}
            if with_scores:
                record["scores"] = self.score(chunk_prompts, completions, completion_ids=ids)
            records.append(record)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            records = gather_object(records)
        assert [r["chunk"] for r in records] == chunk_indices, "chunks were gathered out of order"
        return records

    def _generate_chunk(
        self, prompt_ids: list[list[int]], seed: int, conversational: bool
    ) -> tuple[list[list[Any]], np.ndarray, list[list[list[int]]]]:
        """n completions for each of the chunk's prompts: decoded completions, finished flags `(P, n)`, token ids."""
        # Repeat each prompt n times (rather than num_return_sequences) so a chunk is one plain batch of P * n rows.
        repeated = [ids for ids in prompt_ids for _ in range(self.n)]
        output = generate(self.policy, repeated, self.generation_config, seed, self.generation_batch_size)
        texts, token_ids = decode_completions(self.tokenizer, output, conversational)
        n = self.n
        return (
            [texts[i : i + n] for i in range(0, len(texts), n)],
            output.finished.cpu().numpy().reshape(len(prompt_ids), n),
            [token_ids[i : i + n] for i in range(0, len(token_ids), n)],
        )
