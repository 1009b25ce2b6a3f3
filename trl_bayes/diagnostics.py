"""Diagnostics of a Bayesian reward model: how good its preferences are, and whether its uncertainty is where its
errors are. Pure functions over tensors/arrays; the recipes write their outputs to files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def pair_metrics(
    diff_mean: torch.Tensor, diff_var: torch.Tensor | None = None, num_bins: int = 10
) -> dict[str, float]:
    """Held-out pair accuracy, Bradley-Terry NLL and calibration error of the MAP reward and the Laplace predictive.

    Args:
        diff_mean: `r(chosen) - r(rejected)` under the MAP weights. Shape `(B,)`.
        diff_var: its linearized variance under the posterior (covariance of chosen and rejected included), or `None`
            for a reward without posterior. Shape `(B,)`.
        num_bins: bins of the expected calibration error.

    Returns:
        `map_accuracy` (ties count half), `map_nll` = mean -log sigmoid(diff_mean), `map_ece`, and with a variance
        `laplace_probit_nll` / `laplace_ece` of the probit predictive p = sigmoid(mu / sqrt(1 + pi/8 var)),
        `mean_reward_margin`, `mean_margin_std`.
    """
    diff_mean = diff_mean.to(torch.float64)
    accuracy = ((diff_mean > 0).double() + 0.5 * (diff_mean == 0).double()).mean()
    metrics = {
        "map_accuracy": accuracy.item(),
        "map_nll": F.softplus(-diff_mean).mean().item(),
        "map_ece": expected_calibration_error(torch.sigmoid(diff_mean), num_bins),
        "mean_reward_margin": diff_mean.mean().item(),
    }
    if diff_var is not None:
        diff_var = diff_var.to(torch.float64).clamp_min(0)
        # The probit approximation of E[sigmoid(d)] for d ~ N(mu, var); it keeps the sign of mu, so the accuracy is the
        # MAP accuracy and only the confidence changes.
        kappa = torch.rsqrt(1.0 + math.pi / 8.0 * diff_var)
        metrics["laplace_probit_nll"] = F.softplus(-kappa * diff_mean).mean().item()
        metrics["laplace_ece"] = expected_calibration_error(torch.sigmoid(kappa * diff_mean), num_bins)
        metrics["mean_margin_std"] = diff_var.sqrt().mean().item()
    return metrics


def expected_calibration_error(p_chosen: torch.Tensor, num_bins: int = 10) -> float:
    """Expected calibration error of predicted probabilities that the labelled-chosen response is preferred.

    Each pair is folded to the side the model prefers: confidence max(p, 1-p) in [0.5, 1], correct when p > 0.5
    (half correct at p = 0.5). ECE = sum over equal-width confidence bins of (bin size / B) |accuracy - confidence|.

    Args:
        p_chosen: predicted probabilities. Shape `(B,)`.
    """
    p = p_chosen.to(torch.float64)
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    bins = torch.clamp(((confidence - 0.5) * 2 * num_bins).long(), max=num_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(num_bins):
        mask = bins == b
        if mask.any():
            ece += mask.double().mean() * (correct[mask].mean() - confidence[mask].mean()).abs()
    return ece.item()


def standardize(x: np.ndarray) -> np.ndarray:
    """`(x - mean) / std` over all entries (std 1 if constant), so that rewards on different scales compare."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two flat arrays; NaN when either is constant or has fewer than 3 entries."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def within_prompt_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over prompts (rows of `(P, K)` arrays) of the Pearson correlation of x and y across that prompt's
    responses: what matters for a ranking within each prompt, free of the offsets between prompts. Rows where either is
    constant or with fewer than 3 entries are skipped; NaN when none is left."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    values = [pearson(a, b) for a, b in zip(x, y, strict=True)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def standardize_within(x: np.ndarray) -> np.ndarray:
    """Each row of a `(P, K)` array standardized on its own: `(x - row mean) / row std` (std 1 if the row is constant):
    what a ranking within each prompt sees, free of the offsets and scales between prompts."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(1, keepdims=True)
    return (x - x.mean(1, keepdims=True)) / np.where(std > 0, std, 1.0)


def uncertainty_by_class(
    std: np.ndarray, classes: dict[str, np.ndarray], error: np.ndarray | None = None
) -> list[dict[str, float]]:
    """The uncertainty of each class of responses (e.g. exploit-like ones against typical ones), standardized within
    each prompt: a class with mean z-std > 0 is penalized more than its prompt's typical response, so a penalty steers
    Best-of-N away from it; < 0 steers it towards the class.

    Args:
        std: `(P, N)` the posterior std of each sample.
        classes: class name -> `(P, N)` boolean mask (classes may overlap).
        error: `(P, N)` the proxy's error (e.g. z(proxy) - z(gold)), optional.

    Returns:
        One dict per class: `class`, `num_responses`, `fraction` (of all samples), `mean_z_std` (NaN for an empty
        class), and with `error` `mean_error` (what the proxy gets wrong on the class: positive = overrated).
    """
    z_std = standardize_within(std)
    rows = []
    for name, mask in classes.items():
        mask = np.asarray(mask, dtype=bool)
        row = {
            "class": name,
            "num_responses": int(mask.sum()),
            "fraction": float(mask.mean()),
            "mean_z_std": float(z_std[mask].mean()) if mask.any() else float("nan"),
        }
        if error is not None:
            row["mean_error"] = float(np.asarray(error)[mask].mean()) if mask.any() else float("nan")
        rows.append(row)
    return rows


def uncertainty_along_n(
    proxy_mean: np.ndarray,
    proxy_std: np.ndarray,
    gold: np.ndarray,
    ns: list[int],
    lengths: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Whether the posterior std flags the proxy's errors, overall and among the responses Best-of-n picks.

    Both rewards are standardized over all samples; the proxy's error is `z(proxy) - z(gold)` (positive: the proxy
    overrates the response). For each n, the responses considered are each prompt's top `ceil(N / n)` by the proxy
    mean, those the best-of-n choice lands in with probability about 1 - 1/e; n = 1 is every sample.

    Args:
        proxy_mean, proxy_std, gold: shape `(P, N)`.
        ns: the values of n.
        lengths: `(P, N)` response lengths (e.g. words), optional.

    Returns:
        One dict per n: `n`, `num_responses`, `corr_std_error` (Pearson correlation of std and error, pooled over
        prompts), `corr_std_error_within` (the same within each prompt, averaged over prompts; NaN once fewer than 3
        responses per prompt are left), `corr_std_proxy` and `corr_std_proxy_within` (std against the proxy score),
        `mean_std`, `mean_error`; with `lengths`, `corr_std_length` and `corr_std_length_within`.
    """
    z_error = standardize(proxy_mean) - standardize(gold)
    order = np.argsort(-np.asarray(proxy_mean), axis=1, kind="stable")
    rows = []
    for n in ns:
        top = order[:, : max(1, math.ceil(proxy_mean.shape[1] / n))]
        std = np.take_along_axis(proxy_std, top, axis=1)
        error = np.take_along_axis(z_error, top, axis=1)
        rows.append(
            {
                "n": n,
                "num_responses": int(std.size),
                "corr_std_error": pearson(std, error),
                "corr_std_error_within": within_prompt_correlation(std, error),
                "corr_std_proxy": pearson(std, np.take_along_axis(proxy_mean, top, axis=1)),
                "corr_std_proxy_within": within_prompt_correlation(std, np.take_along_axis(proxy_mean, top, axis=1)),
                "mean_std": float(std.mean()),
                "mean_error": float(error.mean()),
            }
        )
        if lengths is not None:
            length = np.take_along_axis(np.asarray(lengths, dtype=np.float64), top, axis=1)
            rows[-1]["corr_std_length"] = pearson(std, length)
            rows[-1]["corr_std_length_within"] = within_prompt_correlation(std, length)
    return rows
