"""Typicality baselines of the relative penalty (issue 16): scores of how far a response lies from the other responses
to its prompt, with no posterior at all.

The relative variance |(J_i - J_mean) S|^2 (`relative_variance`) penalizes a response for being unlike its prompt's
other candidates, measured in the Laplace weights' gradients and weighted by the posterior covariance S S^T. Issue 16
found that in the offline world most of its gain survives without the posterior (the prior alone) and that a plain
distance in the reward model's hidden states does as well. These are the scores that separate the parts:

- `PriorScale`: the prior's square root, Sigma = I / prior_precision, no curvature. Passed as `scale=` to the relative
  variance (`predict_prior_relative`) it gives |J_i - J_mean|^2 / delta: the centering without the posterior.
- `hidden_features`: what the reward model's score head reads, the last hidden state at the pooled token `(B, D)`.
  `group_euclidean` and `group_mahalanobis` measure each response's distance to its group's (weighted) mean of those
  features, plain or under the group's own shrunk covariance: typicality with no preference data in the score.
- `completion_nll`: the mean per-token negative log-likelihood of a completion under a causal LM (the SFT policy):
  typicality under the policy that sampled the candidates, not a reward-model quantity.

Every score is returned as a squared quantity, the analogue of a variance, so that `penalties.penalized_reward`
applies them as it applies the variances: `penalty="std"` subtracts k x the distance (k x the NLL), `penalty="var"`
k x its square, and a given k means the same for every option. `PenalizedReward(uncertainty="prior_relative" |
"hidden_euclidean" | "hidden_mahalanobis")` computes the first three from its reward models; the SFT NLL penalizes
through `penalized_reward` directly:

```python
>>> nll = completion_nll(sft_policy, sft_tokenizer, prompts, completions)           # (B,)
>>> predictions = PenalizedReward(rm, penalty="none").predict(prompts, completions)
>>> rewards = penalized_reward(predictions.means, nll.square()[None], "std", k=1.0)  # r_MAP - k * NLL
```

Group scores take `groups` `(B,)` (integer prompt labels, `penalties.prompt_groups`) and optional `weights` `(B,)`
(how often a deduplicated response was drawn). A `reference` set replaces the scored responses as the group: features
of other completions of the same prompts (e.g. K samples of the reference policy), for callers that score one
completion per prompt (PPO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .batching import DEFAULT_MAX_TOKENS, scoring_batches
from .generation import eval_mode, pad_token_ids, tokenize_prompts, tokenize_responses
from .relative_variance import prompt_key, relative_predict_ids
from .reward_model import scoring_mode

DEFAULT_SHRINKAGE = 0.1
"""`group_mahalanobis`'s weight on the diagonal: Sigma = (1 - a) S + a diag(S). Fixed before any result was seen."""


# ---------------------------------------------------------------------------------------------------------------------
# The prior-only relative variance.


class PriorScale:
    """The square root of the prior covariance, Sigma_0 = diag(1 / delta), with `per_sample.PosteriorScale`'s interface
    (`numels`, `blockwise`, `block`, `full`): the rows u = J S_0 have |u|^2 = J Sigma_0 J^T, so the relative variance
    computed with it (`relative_variance.RelativeVariancePredictor(scale=PriorScale(la))`) is |J_i - J_mean|^2 / delta,
    the centering without the curvature of the preference data.

    Args:
        la: a laplace-torch posterior (its `params` and `prior_precision`: scalar, per parameter tensor or diagonal).
    """

    def __init__(self, la):
        self.numels = [p.numel() for p in la.params]
        self.blockwise = True  # a diagonal covariance never couples parameters
        self.inverse_sqrt = list(torch.split(la.prior_precision_diag.rsqrt(), self.numels))

    def block(self, index: int, jacobians: torch.Tensor) -> torch.Tensor:
        """The scaled gradients `(B, p)` of Laplace parameter `index` from its gradients `(B, *shape)`."""
        return jacobians.flatten(1) * self.inverse_sqrt[index].to(jacobians)

    def full(self, jacobians: torch.Tensor) -> torch.Tensor:
        """The scaled rows `(B, P)` from whole gradients `(B, P)` in laplace-torch's parameter order."""
        return jacobians * torch.cat(self.inverse_sqrt).to(jacobians)


def predict_prior_relative(
    model,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    batch_size: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
    progress_bar: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP rewards and prior-only relative variances |J_i - J_mean|^2 / delta of `completions`, grouped by prompt as
    `BayesianRewardModel.predict_relative` groups them (same arguments, same one forward-backward per response).

    Args:
        model: a `BayesianRewardModel`; its posterior is not used, only its prior precision.
        batch_size: responses per forward-backward pass; `None` (the default): batches of up to `max_tokens` padded
            tokens (`batching.scoring_batches`), as `predict_relative`.

    Returns:
        `mean` and `prior_relative_var`, `(B,)` each, on the CPU.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions: one prompt per completion.")
    keys = [prompt_key(p) for p in prompts]
    ids = tokenize_responses(model.tokenizer, prompts, completions)
    reference_means = None
    if reference is not None:
        # Mean gradients J_mean do not depend on the covariance: the posterior's cache serves the prior too.
        reference_means = model.reference_gradient_means(
            dict(zip(keys, prompts, strict=True)), reference, batch_size, max_tokens
        )
    with scoring_mode(model.model):
        mean, _, relative = relative_predict_ids(
            model, ids, keys, weights=weights, reference_means=reference_means, batch_size=batch_size,
            progress_bar=progress_bar, scale=PriorScale(model.laplace), max_tokens=max_tokens,
        )  # fmt: skip
    return mean, relative


# ---------------------------------------------------------------------------------------------------------------------
# Hidden features: what the score head reads.


def score_head(model: nn.Module) -> nn.Module:
    """The head of a transformers sequence-classification model (or its PEFT wrapper): its child `score` (GPT-NeoX,
    Llama, ...) or `classifier` (BERT, ...), the two names PEFT's `SEQ_CLS` task saves."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    children = dict(base.named_children())
    for name in ("score", "classifier"):
        if name in children:
            return children[name]
    raise ValueError(
        f"{type(base).__name__} has no `score` or `classifier` head: hidden_features reads the input of a "
        "transformers sequence-classification model's head."
    )


def pooled_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """`(B,)` the position a transformers sequence-classification head pools from `(B, L)` ids: the rightmost token
    that is not `pad_token_id` (the last one when there is no pad token), its rule for left and right padding."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def hidden_features(
    model: nn.Module,
    token_ids: Sequence[list[int]],
    pad_token_id: int,
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    return_rewards: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The reward model's features as its score head sees them: the head's input at the pooled token (the last hidden
    state at the last real token for decoder models; BERT's pooled [CLS] output), so that `score_head(model)(features)`
    is the reward.

    Args:
        model: a sequence-classification reward model (one label), or its PEFT wrapper.
        token_ids: B tokenized responses (`generation.tokenize_response`).
        pad_token_id: the id to pad batches with (the tokenizer's).
        batch_size: responses per forward pass; `None` (the default): batches of up to `max_tokens` padded tokens
            (`batching.scoring_batches`, as `BayesianRewardModel.predict`).
        max_tokens: padded tokens per batch when `batch_size` is `None`.
        return_rewards: also return the model's rewards (its logits) from the same forward passes: the MAP rewards
            of `BayesianRewardModel.predict(..., return_var=False)`, equal to them for the same batching, without a
            second forward.

    Returns:
        features `(B, D)` on the CPU, in the model's dtype; with `return_rewards`, `(features, rewards)`, rewards
        `(B,)` on the CPU in the model's dtype.
    """
    head = score_head(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    device = next(model.parameters()).device
    rows, rewards = [], []
    try:
        # The mode `BayesianRewardModel.predict_ids` scores in, so that the rewards are its rewards.
        with scoring_mode(model), torch.no_grad():
            for batch in scoring_batches([len(ids) for ids in token_ids], batch_size, max_tokens):
                input_ids, attention_mask = pad_token_ids(token_ids[batch[0] : batch[-1] + 1], pad_token_id)
                input_ids = input_ids.to(device)
                seen.clear()
                logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits
                features = seen[0]
                if features.dim() == 3:  # (B, L, D): a decoder's per-token states; the head pools one token
                    positions = pooled_positions(input_ids, base.config.pad_token_id)
                    features = features[torch.arange(len(features), device=device), positions]
                rows.append(features.cpu())
                rewards.append(logits.reshape(-1).cpu())
    finally:
        hook.remove()
    if not rows:
        raise ValueError("hidden_features needs at least one response.")
    return (torch.cat(rows), torch.cat(rewards)) if return_rewards else torch.cat(rows)


def predict_hidden(
    model,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    return_rewards: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`hidden_features` `(B, D)` of a `BayesianRewardModel`'s responses, tokenized as it scores them; `batch_size`
    (`None`: the token budget `max_tokens`) as `hidden_features`. `return_rewards=True` returns `(features, means)`,
    `means` `(B,)` equal to `model.predict(prompts, completions, batch_size, return_var=False)[0]` (same batching):
    features and MAP rewards from one forward pass."""
    ids = tokenize_responses(model.tokenizer, prompts, completions)  # refuses unequal lengths
    return hidden_features(model.model, ids, model.tokenizer.pad_token_id, batch_size, max_tokens, return_rewards)


# ---------------------------------------------------------------------------------------------------------------------
# Distances within a group: pure functions.


def _group_index(
    groups: torch.Tensor, reference_groups: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Local group indices of the scored rows and of the rows the group statistics come from (the reference's, or the
    scored rows themselves), and the number of groups."""
    source = groups if reference_groups is None else reference_groups
    labels, source_index = torch.unique(source, return_inverse=True)
    index = torch.searchsorted(labels, groups)
    missing = (index >= len(labels)) | (labels[index.clamp(max=len(labels) - 1)] != groups)
    if missing.any():
        raise ValueError(
            f"group {int(groups[missing][0])} has no reference rows: give every scored group >= 1 reference feature."
        )
    return index, source_index, len(labels)


def _weights(weights: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights).to(like)
    if weights.shape != (n,) or (weights <= 0).any():
        raise ValueError(f"weights must be {n} positive numbers, one per row.")
    return weights


def group_means(features: torch.Tensor, index: torch.Tensor, num_groups: int, weights: torch.Tensor) -> torch.Tensor:
    """`(G, D)`: each group's weighted mean sum_j w_j f_j / sum_j w_j of `features` `(n, D)`, rows in group `index`
    `(n,)` with weights `(n,)`."""
    total = features.new_zeros(num_groups).index_add_(0, index, weights)
    sums = features.new_zeros(num_groups, features.shape[1]).index_add_(0, index, features * weights[:, None])
    return sums / total[:, None]


def group_euclidean(
    features: torch.Tensor,
    groups: torch.Tensor,
    weights: torch.Tensor | None = None,
    reference_features: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    reference_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Euclidean distance of each response's features to its group's weighted mean, |f_i - mu_g|^2.

    Args:
        features: `(B, D)`. groups: `(B,)` integer group (prompt) of each row. weights: `(B,)` positive weights in
            the group's mean (e.g. draw counts); `None` = 1 each.
        reference_features, reference_groups, reference_weights: `(R, D)`, `(R,)`, `(R,)` (weights optional): when
            given, each group's mean comes from its reference rows instead of the scored ones.

    Returns:
        `(B,)`, in the features' dtype.
    """
    index, source_index, num_groups = _group_index(groups, reference_groups)
    source = features if reference_features is None else reference_features
    source_weights = weights if reference_features is None else reference_weights
    mean = group_means(source, source_index, num_groups, _weights(source_weights, len(source), source))
    return (features - mean[index]).square().sum(1)


def shrunk_covariance(centered: torch.Tensor, weights: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """`(D, D)`: (1 - a) S + a diag(S), S = sum_j w_j c_j c_j^T / sum_j w_j the weighted covariance of the centered
    rows `centered` `(n, D)`: a group smaller than D has a singular S, and the diagonal's share a = `shrinkage` makes it
    invertible wherever each feature varies. 1e-9 x mean(diag S) more on the diagonal covers features constant within
    the group; a group whose features are all equal gets the identity (Euclidean distances, 0 within it)."""
    w = weights / weights.sum()
    covariance = (centered * w[:, None]).T @ centered
    diagonal = torch.diagonal(covariance)
    scale = diagonal.mean()
    if scale <= 0:
        return torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    shrunk = (1 - shrinkage) * covariance + shrinkage * torch.diag(diagonal)
    return shrunk + 1e-9 * scale * torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)


def dense_mahalanobis(
    diff: torch.Tensor, centered: torch.Tensor, weights: torch.Tensor, shrinkage: float
) -> torch.Tensor:
    """`(m,)`: d^T Sigma^-1 d for each row d of `diff` `(m, D)`, Sigma = `shrunk_covariance(centered, weights,
    shrinkage)` `(D, D)` built and factorized: O(n D^2 + D^3) for `centered` `(n, D)`."""
    cholesky = torch.linalg.cholesky(shrunk_covariance(centered, weights, shrinkage))
    return torch.linalg.solve_triangular(cholesky, diff.T, upper=False).square().sum(0)


def low_rank_mahalanobis(
    diff: torch.Tensor, centered: torch.Tensor, weights: torch.Tensor, shrinkage: float
) -> torch.Tensor:
    """`dense_mahalanobis` without the `(D, D)` matrix, O(n^2 D + m n D) instead of O(D^3), for n << D rows.

    `shrunk_covariance` is a diagonal plus rank < n: Sigma = D0 + U U^T, D0 = a diag(S) + 1e-9 mean(diag S) I and
    U = sqrt(1 - a) C^T diag(sqrt(w)) `(D, n)` (C the centered rows, w the normalized weights). Whitened by D0,
    D0^-1/2 Sigma D0^-1/2 = I + V V^T with V = D0^-1/2 U = Q diag(s) P^T (thin SVD, Q `(D, n)` orthonormal; from a QR
    of V and the SVD of its `(n, n)` triangle), whose inverse is I - Q diag(s^2 / (1 + s^2)) Q^T (the Woodbury
    identity). So with x = D0^-1/2 d and y = Q^T x:

        d^T Sigma^-1 d = |x - Q y|^2 + sum_k y_k^2 / (1 + s_k^2),

    a sum of two non-negative terms. The textbook form d^T D0^-1 d - b^T (I + U^T D0^-1 U)^-1 b subtracts numbers
    ~ 1e9 x larger than the result when a = 0 (D0 is then the jitter alone): 3e-4 relative errors in float64.

    Args:
        diff: `(m, D)` the scored rows minus the group's mean. centered: `(n, D)` the source rows minus it.
        weights: `(n,)` positive. shrinkage: a in [0, 1].

    Returns:
        `(m,)`, in the inputs' dtype (float64 in `group_mahalanobis`).
    """
    w = weights / weights.sum()
    rows = centered * w.sqrt()[:, None]  # (n, D): S = rows^T rows
    variances = rows.square().sum(0)  # diag(S), (D,)
    scale = variances.mean()
    if scale <= 0:  # every row equal: shrunk_covariance's identity
        return diff.square().sum(1)
    inverse_sqrt = (shrinkage * variances + 1e-9 * scale).rsqrt()  # D0^-1/2, (D,)
    # V = B R (QR, B `(D, n)` orthonormal), R = W diag(s) Z^T (SVD of the small R): Q = B W, and Q Q^T = B B^T.
    basis, triangle = torch.linalg.qr(((1.0 - shrinkage) ** 0.5 * rows * inverse_sqrt).T)
    rotation, singular, _ = torch.linalg.svd(triangle)
    x = diff * inverse_sqrt  # (m, D)
    projected = x @ basis  # (m, n)
    y = projected @ rotation  # Q^T x, (m, n)
    return (x - projected @ basis.T).square().sum(1) + (y.square() / (1.0 + singular.square())).sum(1)


def group_mahalanobis(
    features: torch.Tensor,
    groups: torch.Tensor,
    weights: torch.Tensor | None = None,
    shrinkage: float = DEFAULT_SHRINKAGE,
    reference_features: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    reference_weights: torch.Tensor | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """Squared Mahalanobis distance of each response's features to its group's weighted mean under the group's own
    weighted covariance, shrunk towards its diagonal: (f_i - mu_g)^T Sigma_g^-1 (f_i - mu_g), Sigma_g as
    `shrunk_covariance` (a = `shrinkage`; 0 = the sample covariance, 1 = per-feature variances only).

    Computed in float64. A group of n <= D / 4 source rows (best-of-n candidates: n << D) goes through
    `low_rank_mahalanobis`, O(n^2 D); larger groups build and factorize Sigma_g (`dense_mahalanobis`, O(D^3)).

    Args: as `group_euclidean`, plus `shrinkage` in [0, 1] and `dense`: `True` builds every group's `(D, D)`
    covariance (the reference path; same result to round-off, slower). With a reference set, mean and covariance are
    the reference rows'.

    Returns:
        `(B,)`, in the features' dtype.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
    index, source_index, num_groups = _group_index(groups, reference_groups)
    scored = features.double()
    source = scored if reference_features is None else reference_features.double()
    source_weights = _weights(weights if reference_features is None else reference_weights, len(source), source)
    mean = group_means(source, source_index, num_groups, source_weights)
    # Each group's rows, from one sort rather than a (B,) mask per group.
    members = torch.argsort(index, stable=True).split(torch.bincount(index, minlength=num_groups).tolist())
    source_members = torch.argsort(source_index, stable=True).split(
        torch.bincount(source_index, minlength=num_groups).tolist()
    )
    out = scored.new_zeros(len(features))
    for g, (rows, source_rows) in enumerate(zip(members, source_members, strict=True)):  # never (B, D, D)
        if len(rows) == 0:  # a reference group nobody is scored against
            continue
        # The SVD costs more than the (D, D) Cholesky from n ~ D / 4 on (one CPU thread, D = 512, per group: n = 128
        # 4 ms vs 7 ms, n = 256 16 ms vs 9 ms).
        distance = low_rank_mahalanobis if not dense and 4 * len(source_rows) <= source.shape[1] else dense_mahalanobis
        out[rows] = distance(
            scored[rows] - mean[g], source[source_rows] - mean[g], source_weights[source_rows], shrinkage
        )
    return out.to(features.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Typicality under the policy.


def completion_nll(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    batch_size: int = 16,
    add_eos: bool = True,
    padding_side: str = "right",
) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each completion's tokens under a causal LM, given its prompt:
    -(1/T) sum_t log p(y_t | x, y_<t). Prompt tokens are conditioned on, never scored.

    Args:
        policy: a causal LM (e.g. the SFT policy that sampled the completions).
        tokenizer: its tokenizer. Prompts are tokenized as the samplers do (`generation.tokenize_prompts`: plain text,
            or a conversation through the chat template), completions without special tokens.
        prompts, completions: one each per response; a completion is text, or `[{"role": "assistant", "content":
            text}]` as conversational samplers return it.
        batch_size: responses per forward pass.
        add_eos: append the EOS token to every completion, i.e. score it as a finished response (as the reward model
            sees it: `tokenize_response` appends EOS too). Decoded samples have lost their EOS.
        padding_side: how batches are padded; the result does not depend on it (positions follow the real tokens).

    Returns:
        `(B,)` on the CPU, float64 sums of the policy's log-probabilities divided by the token counts.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions: one prompt per completion.")
    prompt_ids, _ = tokenize_prompts(tokenizer, list(prompts))
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    completion_ids = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if add_eos:
        completion_ids = [ids + [tokenizer.eos_token_id] for ids in completion_ids]
    if not all(completion_ids):
        raise ValueError("A completion tokenizes to no tokens: there is nothing to score (use add_eos=True).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(policy.parameters()).device
    out = []
    with eval_mode(policy), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = range(start, min(start + batch_size, len(texts)))
            sequences = [prompt_ids[i] + completion_ids[i] for i in rows]
            input_ids, attention_mask = pad_token_ids(sequences, pad, side=padding_side)
            # 1 at the completion's tokens, wherever padding put the sequence.
            scored = torch.zeros_like(attention_mask)
            for row, i in enumerate(rows):
                end = input_ids.shape[1] if padding_side == "left" else len(sequences[row])
                scored[row, end - len(completion_ids[i]) : end] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
            logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            # Position t predicts token t + 1.
            logprobs = torch.gather(logits[:, :-1].double().log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(-1)
            # where, not a product: the logits at padding may be NaN (a padded row that attends to nothing).
            mask = scored[:, 1:].bool()
            out.append(-torch.where(mask, logprobs.cpu(), 0.0).sum(1) / mask.sum(1))
    return torch.cat(out)
