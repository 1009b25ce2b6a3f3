"""Uncertainty-driven preference labelling (active reward learning): which candidate pairs to ask a labeller about.

The pool holds candidate responses grouped by prompt (`CandidatePool`); a query is a pair of two candidates of the same
prompt. A Bayesian reward model gives every pair's reward difference d = r(a) - r(b) as a Gaussian N(mu, var) of the
linearized (GLM) posterior; with S a square root of the posterior covariance (Sigma = S S^T,
`per_sample.PosteriorScale`) and u = J S a response's scaled gradient, mu = r_MAP(a) - r_MAP(b) and
var = |u_a - u_b|^2, and a posterior sample of every reward at once is r_MAP + u z, z ~ N(0, I_P).

Strategies (`SelectionStrategy`):

- `random`: uniform over the pool (passive labelling, the baseline);
- `variance`: the largest Var(r(a) - r(b));
- `bald`: the largest mutual information between the Bradley-Terry label and the weights (Houlsby et al. 2011, "BALD"),
  in closed form under the probit approximation of the sigmoid (`bald_scores`);
- `thompson`: double Thompson sampling (Dwaracherla et al. 2024, "Efficient Exploration for LLMs"): for a prompt,
  a = the best candidate under one posterior sample, b = the best under a second sample, resampled until it differs
  from a. Thompson chooses responses, not prompts: prompts come in a uniformly random order, as a stream would bring
  them, one pair per prompt (a prompt returns only once every other prompt has had its turn).

An ensemble (`select_pairs([rm1, rm2, ...], ...)`) combines members as `penalties.combine_gaussians` does (the mean of
independent Gaussians) for `variance` and `bald`, and draws each Thompson sample from a uniformly chosen member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from tqdm.auto import tqdm

from .generation import pad_token_ids, tokenize_responses
from .penalties import combine_gaussians
from .per_sample import PosteriorScale, ScaledGradients, forward_backward
from .relative_variance import group_blocks
from .reward_model import scoring_mode


class SelectionStrategy(str, Enum):
    """How `select_pairs` chooses the pairs to label."""

    RANDOM = "random"
    """Uniformly at random, without replacement: passive labelling."""
    VARIANCE = "variance"
    """The largest predictive variance of the reward difference, Var(r(a) - r(b)) = |u_a - u_b|^2."""
    BALD = "bald"
    """The largest mutual information of the Bernoulli label and the weights (`bald_scores`)."""
    THOMPSON = "thompson"
    """Double Thompson sampling over a prompt's candidates (`double_thompson`), prompts in a random order."""


@dataclass
class CandidatePool:
    """Candidate responses grouped by prompt, and the pairs (within a prompt) that may be queried.

    Args:
        prompts: `(G,)` one per group (strings, or chat messages).
        candidates: `(G,)` lists, group g's K_g candidate completions.
        pairs: `(M, 3)` long, rows (g, a, b): candidates a and b of group g; by default every a < b
            (`within_prompt_pairs`). Drop pairs that cannot be labelled (already labelled, tied) before selecting.
    """

    prompts: list[Any]
    candidates: list[list[Any]]
    pairs: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.prompts) != len(self.candidates):
            raise ValueError(f"CandidatePool: {len(self.prompts)} prompts but {len(self.candidates)} candidate lists.")
        if self.pairs is None:
            self.pairs = within_prompt_pairs([len(c) for c in self.candidates])
        self.pairs = torch.as_tensor(self.pairs, dtype=torch.long).reshape(-1, 3)
        sizes = torch.tensor([len(c) for c in self.candidates] or [0])
        if len(self.pairs) and (
            (self.pairs[:, 0] < 0).any()
            or (self.pairs[:, 0] >= len(self.prompts)).any()
            or (self.pairs[:, 1:] < 0).any()
            or (self.pairs[:, 1:] >= sizes[self.pairs[:, :1]]).any()
            or (self.pairs[:, 1] == self.pairs[:, 2]).any()
        ):
            raise ValueError(
                "CandidatePool.pairs: each row (g, a, b) needs a group g and two distinct candidates of it."
            )

    def subset(self, keep: torch.Tensor) -> CandidatePool:
        """The same candidates with the pairs `keep` (indices or a boolean mask over `pairs`)."""
        return CandidatePool(self.prompts, self.candidates, self.pairs[keep])

    def responses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indexing of the candidates: `offsets` `(G,)` (group g's candidates are rows offsets[g] + k) and the
        flat rows `(M, 2)` of the pairs."""
        sizes = torch.tensor([len(c) for c in self.candidates], dtype=torch.long)
        offsets = torch.cumsum(sizes, 0) - sizes
        return offsets, offsets[self.pairs[:, 0]].unsqueeze(1) + self.pairs[:, 1:]


def within_prompt_pairs(sizes: Sequence[int]) -> torch.Tensor:
    """Every pair a < b of candidates within each group of `sizes` (K_g candidates each): rows (g, a, b), shape
    `(sum_g K_g (K_g - 1) / 2, 3)`."""
    rows = [(g, a, b) for g, k in enumerate(sizes) for a in range(k) for b in range(a + 1, k)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions of the reward Gaussians


def pair_gaussians(mean: torch.Tensor, scaled: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of r(a) - r(b) for each pair, from the responses' MAP rewards and scaled gradients u = J S.

    Args:
        mean: `(R,)` MAP rewards. scaled: `(R, P)` scaled gradients (|u_i|^2 is response i's GLM variance).
        pairs: `(M, 2)` long, rows (a, b) into the responses.

    Returns:
        mu `(M,)` = mean[a] - mean[b] and var `(M,)` = |u_a - u_b|^2 (the covariance of a and b included).
    """
    a, b = pairs[:, 0], pairs[:, 1]
    return mean[a] - mean[b], (scaled[a] - scaled[b]).square().sum(1)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli(p), elementwise (0 at p = 0 or 1)."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def bald_scores(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) between the label y ~ Bernoulli(sigmoid(d)) and d ~ N(mu, var), the BALD score:
    I = H[E_d p(y | d)] - E_d H[p(y | d)].

    Closed form of Houlsby et al. (2011, Eq. 6) for the probit likelihood Phi, after sigmoid(d) ~ Phi(lambda d) with
    lambda^2 = pi / 8 (the approximation behind the Bradley-Terry predictive sigmoid(mu / sqrt(1 + pi/8 var))), and
    Houlsby's h(Phi(x)) ~ exp(-x^2 / (pi ln 2)) (h in bits) for the expected entropy: with s2 = lambda^2 var,
    m = lambda mu and C^2 = pi ln 2 / 2,

        I = h(Phi(m / sqrt(1 + s2))) - ln 2 * C / sqrt(s2 + C^2) * exp(-m^2 / (2 (s2 + C^2))).

    Args:
        mu, var: `(M,)` mean and variance of the reward differences.

    Returns:
        `(M,)`, >= 0 up to the approximation (clamped at 0).
    """
    mu, var = mu.to(torch.float64), var.to(torch.float64).clamp_min(0)
    s2, m = math.pi / 8 * var, math.sqrt(math.pi / 8) * mu
    c2 = math.pi * math.log(2) / 2
    predictive = torch.special.ndtr(m / torch.sqrt(1 + s2))
    expected_entropy = math.log(2) * math.sqrt(c2) / torch.sqrt(s2 + c2) * torch.exp(-(m**2) / (2 * (s2 + c2)))
    return (binary_entropy(predictive) - expected_entropy).clamp_min(0)


def top_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the `budget` largest `scores` `(M,)`, largest first; equal scores in index order (deterministic)."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return order[:budget]


def double_thompson(
    means: torch.Tensor,
    scaled: torch.Tensor,
    allowed: torch.Tensor,
    generator: torch.Generator,
    max_resamples: int = 30,
) -> tuple[int, int]:
    """Double Thompson sampling over one prompt's K candidates with posterior samples of the linearized model,
    r = means[e] + scaled[e] z, member e uniform over the E members, z ~ N(0, I_P).

    1. a = argmax of one sample, over the candidates that have an allowed partner;
    2. b = argmax of a fresh sample over a and its allowed partners, resampled while it is a (at most `max_resamples`
       samples; after them, the last sample's best partner of a).

    Args:
        means: `(E, K)` MAP rewards. scaled: `(E, K, P)` scaled gradients u = J S.
        allowed: `(K, K)` bool, symmetric: which pairs may be queried (at least one).
        generator: the draws' source (a seed reproduces the choice).

    Returns:
        (a, b), candidate indices.
    """
    allowed = allowed | allowed.T
    if not allowed.any():
        raise ValueError("double_thompson: no allowed pair among the candidates.")

    def sample() -> torch.Tensor:
        member = int(torch.randint(means.shape[0], (1,), generator=generator))
        z = torch.randn(scaled.shape[-1], generator=generator, dtype=scaled.dtype)
        return means[member] + scaled[member] @ z

    neg_inf = torch.tensor(-math.inf, dtype=means.dtype)
    first = int(torch.where(allowed.any(1), sample(), neg_inf).argmax())
    partners = allowed[first]
    contenders = partners.clone()
    contenders[first] = True
    for _ in range(max_resamples):
        reward = sample()
        second = int(torch.where(contenders, reward, neg_inf).argmax())
        if second != first:
            return first, second
    return first, int(torch.where(partners, reward, neg_inf).argmax())


# ---------------------------------------------------------------------------------------------------------------------
# Scoring the pool


def scaled_gradients(model, token_ids: Sequence[list[int]], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP rewards `(R,)` and scaled gradients u = J S `(R, P)` of a `BayesianRewardModel`'s responses (token ids of
    `tokenize_response`), one forward and one backward per batch; on the CPU, in the model's dtype."""
    scale = PosteriorScale(model.laplace)
    means, rows = [], []
    with scoring_mode(model.model):
        for start in range(0, len(token_ids), batch_size):
            input_ids, attention_mask = pad_token_ids(
                token_ids[start : start + batch_size], model.tokenizer.pad_token_id
            )
            collector = ScaledGradients(scale)
            rewards = forward_backward(
                model.model, model.layers, input_ids.to(model.device), attention_mask.to(model.device), collector
            )
            means.append(rewards.cpu())
            rows.append(collector.finish().detach().cpu())
    return torch.cat(means), torch.cat(rows)


def _blocks(members: list, pool: CandidatePool, groups: list[int], block_responses: int, batch_size: int, bar):
    """Per block of whole groups (`block_responses` candidates or more, groups in the order given): the groups, the
    first row of each group's candidates in the block, and the members' MAP rewards `(E, R_b)` and scaled gradients
    `(E, R_b, P)` of the block's candidates (the memory: E x R_b x P floats, whatever the pool's size)."""
    keys = [g for g in groups for _ in pool.candidates[g]]
    for rows in group_blocks(keys, block_responses):
        block_groups = list(dict.fromkeys(keys[i] for i in rows))
        sizes = torch.tensor([len(pool.candidates[g]) for g in block_groups])
        starts = dict(zip(block_groups, (torch.cumsum(sizes, 0) - sizes).tolist(), strict=True))
        prompts = [pool.prompts[g] for g in block_groups for _ in pool.candidates[g]]
        completions = [c for g in block_groups for c in pool.candidates[g]]
        means, scaled = [], []
        for member in members:
            ids = tokenize_responses(member.tokenizer, prompts, completions)
            mean, rows_u = scaled_gradients(member, ids, batch_size)
            means.append(mean)
            scaled.append(rows_u)
            bar.update(len(ids))
        yield block_groups, starts, torch.stack(means), torch.stack(scaled)


def select_pairs(
    model_or_models,
    pool: CandidatePool,
    budget: int,
    strategy: SelectionStrategy | str = SelectionStrategy.VARIANCE,
    *,
    seed: int = 0,
    batch_size: int = 16,
    block_responses: int = 2048,
    max_resamples: int = 30,
    progress_bar: bool = True,
) -> torch.Tensor:
    """The `budget` pairs of `pool` to label next.

    Args:
        model_or_models: a `BayesianRewardModel` or a list of them (an ensemble); unused by `random`.
        pool: the candidates and the pairs that may be queried (`CandidatePool`).
        budget: how many pairs, at most `len(pool.pairs)`.
        strategy: `random`, `variance`, `bald` or `thompson` (`SelectionStrategy`).
        seed: seeds `random`'s draw and `thompson`'s prompt order and posterior samples; the same seed, models and pool
            give the same pairs. `variance` and `bald` are deterministic (equal scores: the lower index first).
        batch_size: responses per forward-backward pass.
        block_responses: candidates scored at once (whole prompts): bounds the memory of the scaled gradients to
            about `block_responses x P` floats per member for P Laplace weights.
        max_resamples: Thompson's second draws per pair before it settles for the best partner of the first.
        progress_bar: a tqdm bar over the scored candidates.

    Returns:
        `(budget,)` long, indices into `pool.pairs`, in the order chosen (`variance` / `bald`: best first).
    """
    strategy = SelectionStrategy(strategy)
    num_pairs = len(pool.pairs)
    if not 0 <= budget <= num_pairs:
        raise ValueError(f"select_pairs: budget {budget} must be in [0, {num_pairs}] (the pool's pairs).")
    generator = torch.Generator().manual_seed(seed)
    if strategy == SelectionStrategy.RANDOM or budget == 0:
        return torch.randperm(num_pairs, generator=generator)[:budget]
    members = list(model_or_models) if isinstance(model_or_models, (list, tuple)) else [model_or_models]
    pair_groups = pool.pairs[:, 0]
    if strategy == SelectionStrategy.THOMPSON:
        return _select_thompson(members, pool, budget, generator, batch_size, block_responses, max_resamples,
                                progress_bar)  # fmt: skip
    groups = sorted(set(pair_groups.tolist()))
    scores = torch.empty(num_pairs, dtype=torch.float64)
    total = len(members) * sum(len(pool.candidates[g]) for g in groups)
    with tqdm(total=total, desc=f"Scoring the pool ({strategy.value})", disable=not progress_bar) as bar:
        for block_groups, starts, means, scaled in _blocks(members, pool, groups, block_responses, batch_size, bar):
            index = torch.nonzero(torch.isin(pair_groups, torch.tensor(block_groups))).squeeze(1)
            first = torch.tensor([starts[g] for g in pair_groups[index].tolist()], dtype=torch.long)
            rows = first.unsqueeze(1) + pool.pairs[index, 1:]
            mus, variances = zip(
                *(pair_gaussians(m, u, rows) for m, u in zip(means, scaled, strict=True)), strict=True
            )
            mu, var = combine_gaussians(torch.stack(mus), torch.stack(variances))
            scores[index] = (var if strategy == SelectionStrategy.VARIANCE else bald_scores(mu, var)).double()
    return top_budget(scores, budget)


def thompson_prompt_order(pairs_per_group: dict[int, int], budget: int, generator: torch.Generator) -> list[int]:
    """The prompts Thompson sampling queries, one pair each: rounds of a uniformly random order of the prompts that
    still have pairs left, until `budget` (`pairs_per_group`: prompt -> its queryable pairs)."""
    left, order = dict(pairs_per_group), []
    while len(order) < budget:
        groups = sorted(g for g, n in left.items() if n > 0)
        for i in torch.randperm(len(groups), generator=generator)[: budget - len(order)].tolist():
            order.append(groups[i])
            left[groups[i]] -= 1
    return order


def _select_thompson(members, pool, budget, generator, batch_size, block_responses, max_resamples, progress_bar):
    group_pairs: dict[int, dict[tuple[int, int], int]] = {}  # prompt -> {(a, b) with a < b: index into pool.pairs}
    for i, (g, a, b) in enumerate(pool.pairs.tolist()):
        group_pairs.setdefault(g, {})[min(a, b), max(a, b)] = i
    counts = {g: len(p) for g, p in group_pairs.items()}
    order = thompson_prompt_order(counts, budget, generator)
    picks: dict[int, list[int]] = {g: [] for g in order}
    groups = sorted(picks)  # scored in this order whatever the blocks: the draws do not depend on `block_responses`
    total = len(members) * sum(len(pool.candidates[g]) for g in groups)
    with tqdm(total=total, desc="Scoring the pool (thompson)", disable=not progress_bar) as bar:
        for block_groups, starts, means, scaled in _blocks(members, pool, groups, block_responses, batch_size, bar):
            for g in block_groups:
                k = len(pool.candidates[g])
                rows = slice(starts[g], starts[g] + k)
                allowed = torch.zeros(k, k, dtype=torch.bool)
                for a, b in group_pairs[g]:
                    allowed[a, b] = allowed[b, a] = True
                for _ in range(order.count(g)):
                    a, b = double_thompson(means[:, rows], scaled[:, rows], allowed, generator, max_resamples)
                    picks[g].append(group_pairs[g][min(a, b), max(a, b)])
                    allowed[a, b] = allowed[b, a] = False
    return torch.tensor([picks[g].pop(0) for g in order], dtype=torch.long)
