"""The relative ("centered") variance of a reward within its prompt: Var(r_i - mean_j r_j), j over the prompt's group.

A Bradley-Terry reward is identified only up to a per-prompt constant: training pairs constrain r(x, y_w) - r(x, y_l),
never r(x, y) itself. The Laplace posterior therefore leaves the prompt's offset as uncertain as the prior allows, and
the marginal variance J Sigma J^T mixes that unidentified offset into every response's uncertainty. Best-of-N, GRPO,
RLOO and PPO's advantages only compare responses to the same prompt, so the offset does not matter to them. In the
linearized model the variance of a response's reward relative to its group's mean is exact and cheap:

    Var(r_i - (1/W) sum_j w_j r_j) = (J_i - J_mean) Sigma (J_i - J_mean)^T,   J_mean = (1/W) sum_j w_j J_j,

the same Kronecker / diagonal / dense quadratic form on centered Jacobians. Any feature shared by the whole group (the
prompt's, or the score head's bias) cancels. The group is either the scored responses of the prompt themselves (Best-
of-N's N candidates, GRPO's `num_generations` completions) or a reference set (e.g. K samples of the reference policy
for PPO, which scores one completion per prompt).

With S a square root of the posterior covariance (Sigma = S S^T, `per_sample.PosteriorScale`), the rows u_i = J_i S
turn both variances into norms: the marginal one is |u_i|^2 and the relative one |u_i - u_mean|^2, u_mean the weighted
mean of the group's u_j. So one forward-backward per response suffices (`RelativeVariancePredictor.one_pass`): each
batch's u_i are kept until the last response of their group has been through, then centered. Memory: the rows of the
groups in flight, at most (largest group + batch size - 1) x P floats for P Laplace weights. When that exceeds the
caller's `memory_budget`, two passes per response instead (`group_means` for J_mean, then `centered_variances`), holding
the mean gradients of a block of groups (groups x P floats), never (responses x P). With a reference set, J_mean is
known before scoring and the centered quadratic form takes a single pass.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .batching import DEFAULT_MAX_TOKENS, scoring_batches
from .generation import pad_token_ids
from .per_sample import (
    GLMVariance,
    GroupGradientSums,
    PosteriorScale,
    ScaledGradients,
    centered,
    fan_out,
    forward_backward,
)

GradientMeans = dict[int, torch.Tensor]
"""Per Laplace parameter index, a mean gradient `(*shape)` (one group) or `(G, *shape)` (G groups)."""


def prompt_key(prompt: Any) -> str:
    """A hashable key of a prompt: the string itself, or the JSON of a conversational prompt (a list of messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def group_blocks(keys: Sequence[Hashable], min_block_size: int) -> list[list[int]]:
    """Row indices grouped by key (groups in order of first appearance, rows in order within a group), cut into blocks
    of whole groups holding at least `min_block_size` rows each (the last one may hold fewer): a block's groups are
    the ones whose mean gradients are held in memory at once.

    Returns:
        one list of row indices per block, each the concatenation of its groups' rows.
    """
    rows: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    blocks, current = [], []
    for group_rows in rows.values():
        current.extend(group_rows)
        if len(current) >= min_block_size:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def centered_square_norms(chunks: Sequence[torch.Tensor], groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """|u_i - u_mean(g_i)|^2 per row, u_mean(g) = sum_{j in g} w_j u_j / sum_{j in g} w_j: the relative variance from
    scaled gradients u = J S (`per_sample.ScaledGradients`), S linear, so u_i - u_mean = (J_i - J_mean) S.

    Args:
        chunks: the rows `(n, P)` in consecutive pieces `(n_k, P)`, so that they need not be concatenated.
        groups: `(n,)` group label of each row; each group has all its rows here. weights: `(n,)`, positive.

    Returns:
        `(n,)`, in the rows' dtype and on their device.
    """
    labels, local = torch.unique(groups, return_inverse=True)
    total = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, local, weights.double())
    local = local.to(chunks[0].device)
    spans, start = [], 0
    for chunk in chunks:
        spans.append(slice(start, start + len(chunk)))
        start += len(chunk)
    # Weighted sums and the division in the rows' dtype, as `GroupGradientSums` forms J_mean on the two-pass path.
    sums = chunks[0].new_zeros(len(labels), chunks[0].shape[1])
    for chunk, rows in zip(chunks, spans, strict=True):
        sums.index_add_(0, local[rows], chunk * weights[rows].to(chunk).unsqueeze(1))
    means = sums / total.to(sums).unsqueeze(1)
    return torch.cat([(chunk - means[local[rows]]).square().sum(1) for chunk, rows in zip(chunks, spans, strict=True)])


class RelativeVariancePredictor:
    """Streams batches of one Bayesian reward model through the relative variance: in one pass, or in two.

    Args:
        posterior: a `BayesianRewardModel` (its model, tokenizer, Laplace posterior and Laplace layers are used).
        batch_size: responses per forward-backward pass; `None`: batches of up to `max_tokens` padded tokens
            (`batching.scoring_batches`).
        scale: the square root S of the covariance the gradients are scaled by; `None` = the posterior's
            (`PosteriorScale`). Any object with `PosteriorScale`'s `block` / `full` / `blockwise`, e.g. the prior's
            (`trl_bayes.typicality.PriorScale`, the prior-only baseline).
        max_tokens: padded tokens per batch when `batch_size` is `None`.
    """

    def __init__(self, posterior, batch_size: int | None = 16, scale=None, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.posterior = posterior
        self.batch_size = batch_size
        self.scale = PosteriorScale(posterior.laplace) if scale is None else scale
        self.max_tokens = max_tokens

    def batch_rows(self, token_ids: Sequence[list[int]]) -> list[list[int]]:
        """The consecutive rows of each batch of `token_ids` (`batching.scoring_batches`)."""
        return scoring_batches([len(ids) for ids in token_ids], self.batch_size, self.max_tokens)

    def one_pass_bytes(self, largest_group: int, largest_batch: int | None = None) -> int:
        """The most memory `one_pass` holds in scaled gradients: (largest group + largest batch - 1) rows of P floats.
        `largest_batch` defaults to `batch_size` (required when it is `None`)."""
        if largest_batch is None:
            if self.batch_size is None:
                raise ValueError("one_pass_bytes needs `largest_batch` when batches follow a token budget.")
            largest_batch = self.batch_size
        row = self.posterior.n_params * self.posterior.params[0].element_size()
        return (largest_group + largest_batch - 1) * row

    def _batches(self, token_ids: Sequence[list[int]]):
        pad_token_id = self.posterior.tokenizer.pad_token_id
        for rows in self.batch_rows(token_ids):
            start, stop = rows[0], rows[-1] + 1
            input_ids, attention_mask = pad_token_ids(token_ids[start:stop], pad_token_id)
            yield slice(start, stop), input_ids.to(self.posterior.device), attention_mask.to(self.posterior.device)

    def _forward_backward(self, input_ids, attention_mask, consume) -> torch.Tensor:
        p = self.posterior
        return forward_backward(p.model, p.layers, input_ids, attention_mask, consume)

    def group_means(
        self, token_ids: Sequence[list[int]], groups: torch.Tensor, weights: torch.Tensor, num_groups: int
    ) -> tuple[GradientMeans, torch.Tensor, torch.Tensor]:
        """Pass 1: each group's weighted mean gradient, and on the way every response's MAP reward and marginal
        variance (they come from the same backward).

        Args:
            groups: `(B,)` group index in [0, num_groups) of each response; weights: `(B,)`, positive.

        Returns:
            the groups' mean gradients (`(G, *shape)` per parameter), rewards `(B,)` and marginal variances `(B,)`.
        """
        sums = GroupGradientSums(num_groups)
        rewards, variances = [], []
        for rows, input_ids, attention_mask in self._batches(token_ids):
            sums.set_batch(groups[rows], weights[rows])
            marginal = GLMVariance(self.scale)
            rewards.append(self._forward_backward(input_ids, attention_mask, fan_out(marginal, sums)).cpu())
            variances.append(marginal.finish().detach().cpu())
        return sums.means(), torch.cat(rewards), torch.cat(variances)

    def centered_variances(
        self, token_ids: Sequence[list[int]], groups: torch.Tensor, means: GradientMeans, marginal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pass 2: (J_i - J_mean(group of i)) Sigma (J_i - J_mean)^T of each response.

        Returns:
            rewards `(B,)`, relative variances `(B,)` and, with `marginal=True`, the marginal variances `(B,)`.
        """
        rewards, relative, marginals = [], [], []
        for rows, input_ids, attention_mask in self._batches(token_ids):
            centered_var = GLMVariance(self.scale, centered(means, groups[rows]))
            consumers = [centered_var]
            if marginal:
                consumers.append(GLMVariance(self.scale))
            rewards.append(self._forward_backward(input_ids, attention_mask, fan_out(*consumers)).cpu())
            relative.append(centered_var.finish().detach().cpu())
            if marginal:
                marginals.append(consumers[1].finish().detach().cpu())
        return torch.cat(rewards), torch.cat(relative), (torch.cat(marginals) if marginal else None)

    def one_pass(
        self, token_ids: Sequence[list[int]], groups: torch.Tensor, weights: torch.Tensor, progress_bar: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards, marginal and relative variances from one forward-backward per response: each batch's scaled
        gradients u_i = J_i S are held until their group is complete, then centered (`centered_square_norms`).

        Args:
            token_ids: B responses, the rows of each group consecutive.
            groups: `(B,)` group index of each row, non-decreasing (0, 0, 1, 1, 1, 2, ...); weights: `(B,)`, positive.

        Returns:
            rewards, marginal variances and relative variances, `(B,)` each, on the CPU.
        """
        n = len(token_ids)
        group_start = {}
        for row, group in enumerate(groups.tolist()):
            group_start.setdefault(group, row)
        rewards, marginal, relative = [], [], []
        pending: list[tuple[int, torch.Tensor]] = []  # (first row, scaled rows) of groups not yet complete
        batches = self._batches(token_ids)
        total = len(self.batch_rows(token_ids)) if progress_bar else None
        for rows, input_ids, attention_mask in tqdm(
            batches, total=total, desc="Scoring (mean, relative var)", disable=not progress_bar
        ):
            scaled = ScaledGradients(self.scale)
            rewards.append(self._forward_backward(input_ids, attention_mask, scaled).cpu())
            u = scaled.finish()
            marginal.append(u.square().sum(1).cpu())
            pending.append((rows.start, u))
            stop = rows.start + len(u)
            # Rows before `done` are those of complete groups: all seen, unless the last group goes on past `stop`.
            done = stop if stop == n or groups[stop] != groups[stop - 1] else group_start[int(groups[stop - 1])]
            first = pending[0][0]
            if done > first:
                chunks = [chunk[: done - start] for start, chunk in pending if start < done]
                relative.append(centered_square_norms(chunks, groups[first:done], weights[first:done]).cpu())
                pending = [
                    (max(start, done), chunk[max(done - start, 0) :])
                    for start, chunk in pending
                    if start + len(chunk) > done
                ]
        return torch.cat(rewards), torch.cat(marginal), torch.cat(relative)


def stack_means(per_group: Sequence[GradientMeans]) -> GradientMeans:
    """One `(G, *shape)` tensor per parameter from G single-group means `(*shape)`."""
    return {index: torch.stack([means[index] for means in per_group]) for index in per_group[0]}


def check_groups(keys: Sequence[Hashable], reference: Mapping | None) -> None:
    """A response alone in its group has a relative variance of exactly zero: refuse it rather than return zeros.

    Raises:
        ValueError: when some prompt has a single completion and no reference set is given.
    """
    if reference is not None:
        return
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    lonely = [key for key, count in counts.items() if count < 2]
    if lonely:
        raise ValueError(
            f"uncertainty='relative' centers each reward on the other completions of its prompt, but {len(lonely)} "
            f"prompt(s) have a single completion (e.g. {str(lonely[0])[:60]!r}). Score all completions of a prompt "
            "in one call (GRPO/RLOO: num_generations >= 2 and per_device_train_batch_size a multiple of it), or pass "
            "`reference` (completions per prompt, e.g. samples of the reference policy) for one completion per prompt."
        )


def relative_predict_ids(
    posterior,
    token_ids: Sequence[list[int]],
    keys: Sequence[Hashable],
    weights: Sequence[float] | torch.Tensor | None = None,
    reference_means: Mapping[Hashable, GradientMeans] | None = None,
    batch_size: int | None = None,
    progress_bar: bool = False,
    memory_budget: int = 2**30,
    scale=None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAP rewards, marginal variances and relative variances of tokenized responses grouped by `keys`.

    Args:
        posterior: a `BayesianRewardModel`.
        token_ids: B tokenized responses (`tokenize_response`).
        keys: `(B,)` group of each response (e.g. `prompt_key(prompt)`).
        weights: `(B,)` positive weights of the responses in their group's mean (e.g. how often a deduplicated sample
            was drawn); `None` = 1 each. Unused with `reference_means`.
        reference_means: per key, the mean gradient of a reference set (`reference_gradient_means`); `None` = the
            group's own (weighted) mean.
        batch_size: responses per forward-backward pass; `None` (the default): batches of up to `max_tokens` padded
            tokens (`batching.scoring_batches`), cut in the order the groups are scored.
        memory_budget: bytes of scaled gradients the one-pass path may hold (the rows of the groups in flight, at most
            (largest group + largest batch - 1) x P floats; `RelativeVariancePredictor.one_pass_bytes`). Above it, two
            forward-backward passes per response; 0 forces them. A reference set always takes one pass.
        scale: the covariance's square root (`RelativeVariancePredictor`); `None` = the posterior's.
        max_tokens: padded tokens per batch when `batch_size` is `None`.

    Returns:
        `mean`, `var` (marginal) and `relative_var`, each `(B,)` on the CPU, in the order of `token_ids`.
    """
    n = len(token_ids)
    if len(keys) != n:
        raise ValueError(f"Got {n} responses but {len(keys)} group keys.")
    if n == 0:
        empty = torch.zeros(0)
        return empty, empty, empty
    weights = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (n,) or (weights <= 0).any():
        raise ValueError(f"weights must be {n} positive numbers, one per response.")
    if reference_means is not None:
        missing = sorted({str(k) for k in keys if k not in reference_means})
        if missing:
            raise ValueError(f"No reference mean gradient for {len(missing)} prompt(s), e.g. {missing[0][:60]!r}.")
    check_groups(keys, reference_means)
    predictor = RelativeVariancePredictor(posterior, batch_size, scale, max_tokens)
    per_group = group_blocks(keys, min_block_size=1)  # one block per group
    order = [i for rows in per_group for i in rows]
    ids = [token_ids[i] for i in order]
    # The most rows per batch: `batch_size` when given (the bound as before token budgets, so that an explicit batch
    # size picks the same path), else the largest of the budget's batches as the one-pass path cuts them (`ids`).
    largest_batch = batch_size if batch_size is not None else max(map(len, predictor.batch_rows(ids)))
    if reference_means is None and predictor.one_pass_bytes(max(map(len, per_group)), largest_batch) <= memory_budget:
        groups = torch.tensor([g for g, rows in enumerate(per_group) for _ in rows], dtype=torch.long)
        pieces = [torch.stack(predictor.one_pass(ids, groups, weights[order], progress_bar))]
    else:
        order, pieces = [], []
        blocks = group_blocks(keys, min_block_size=8 * largest_batch)
        for rows in tqdm(blocks, desc="Scoring (mean, relative var)", disable=not progress_bar):
            block_keys = list(dict.fromkeys(keys[i] for i in rows))
            local = {key: g for g, key in enumerate(block_keys)}
            groups = torch.tensor([local[keys[i]] for i in rows], dtype=torch.long)
            ids = [token_ids[i] for i in rows]
            if reference_means is None:
                means, block_mean, block_var = predictor.group_means(ids, groups, weights[rows], len(block_keys))
                _, block_relative, _ = predictor.centered_variances(ids, groups, means)
            else:
                means = stack_means([reference_means[key] for key in block_keys])
                block_mean, block_relative, block_var = predictor.centered_variances(ids, groups, means, marginal=True)
            order.extend(rows)
            pieces.append(torch.stack([block_mean, block_var, block_relative]))
    out = torch.empty_like(torch.cat(pieces, dim=1))  # (3, B), in the model's dtype
    out[:, torch.tensor(order)] = torch.cat(pieces, dim=1)
    return out[0], out[1], out[2]


def reference_gradient_means(
    posterior,
    reference_ids: Mapping[Hashable, Sequence[list[int]]],
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[Hashable, GradientMeans]:
    """Per key, the mean reward gradient `(*shape)` per Laplace parameter over its reference responses (e.g. K samples
    of the reference policy for that prompt). Memory: P floats per key. Batching as `relative_predict_ids`.

    Raises:
        ValueError: when a key has no reference response.
    """
    empty = [key for key, ids in reference_ids.items() if len(ids) == 0]
    if empty:
        raise ValueError(f"The reference set of {str(empty[0])[:60]!r} is empty: give each prompt >= 1 completion.")
    keys = [key for key, ids in reference_ids.items() for _ in ids]
    ids = [response for responses in reference_ids.values() for response in responses]
    predictor = RelativeVariancePredictor(posterior, batch_size, max_tokens=max_tokens)
    order = list(dict.fromkeys(keys))
    local = {key: g for g, key in enumerate(order)}
    groups = torch.tensor([local[key] for key in keys], dtype=torch.long)
    means, _, _ = predictor.group_means(ids, groups, torch.ones(len(ids), dtype=torch.float64), len(order))
    return {key: {index: m[g] for index, m in means.items()} for key, g in local.items()}
