"""The Bradley-Terry GGN (or empirical Fisher) of a reward model's Laplace weights, accumulated from the per-sample
layer inputs and output gradients that `per_sample.forward_backward` streams: K-FAC factors (`KronCurvature`) or the
exact diagonal / dense curvature (`ExactGGN`), in laplace-torch's layout and scaling.

The posterior algebra that reads these (variances, square roots of the covariance) lives in `per_sample`; the fit that
drives them in `laplace_lora`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.utils import KronDecomposed
from laplace.utils.utils import symeig

from .per_sample import LaplaceLayer, layer_gradients, pair_difference


def bradley_terry_weights(rewards: torch.Tensor, empirical: bool = False) -> torch.Tensor:
    """Per-sequence multipliers of the backward, from p = sigmoid(r_chosen - r_rejected) of the sequence's pair, so that
    outer products of the streamed (scaled) gradients carry the curvature's weight per pair:

    - GGN: sqrt(p (1 - p)), the square root of the loss Hessian in the reward difference;
    - empirical Fisher (`empirical=True`): 1 - p, the size of the loss gradient in the reward difference,
      d/d(r_c - r_r) [-log sigmoid(r_c - r_r)] = -(1 - p); its sign cancels in every outer product.

    Chosen and rejected get the same multiplier, so the scaled difference of their gradients is the pair's.

    Args:
        rewards: `(2B,)` interleaved (chosen_0, rejected_0, ...). Returns `(2B,)`.
    """
    diff = pair_difference(rewards)
    if empirical:
        return torch.sigmoid(-diff).repeat_interleave(2)
    return (torch.sigmoid(diff) * torch.sigmoid(-diff)).sqrt().repeat_interleave(2)


def real_token_mean(inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a layer's inputs over the real tokens of each sequence, padding left out.

    Args:
        inputs: `(B, T, in)`; attention_mask: `(B, T)`, 1 at real tokens and 0 at padding.

    Returns:
        `(B, in)`.
    """
    mask = attention_mask.to(inputs.dtype)
    return torch.bmm(mask.unsqueeze(1), inputs).squeeze(1) / mask.sum(1, keepdim=True)


def low_rank_eigh(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of F = rows^T rows from its n < d rows, at a fraction of `torch.linalg.eigh(F)`'s cost.

    A reduce K-FAC factor is a sum of one outer product per sequence, so with fewer sequences than dimensions (a LoRA B
    factor's 3 x hidden outputs) it has rank n < d. With rows^T = Q [R; 0] (Householder QR, Q orthogonal `(d, d)`),
    F = Q [R R^T, 0; 0, 0] Q^T: only the `(n, n)` block R R^T needs an eigendecomposition, and the last d - n columns
    of Q span F's null space (eigenvalue 0). Q comes from applying the reflectors to the identity (`torch.ormqr`, matrix
    products), not from the dense eigensolver's tridiagonalisation: about 10x faster at d = 1536, n = 128.

    Args:
        rows: `(n, d)`, n < d.

    Returns:
        eigenvalues `(d,)` (the n of R R^T, then d - n zeros) and orthonormal eigenvectors `(d, d)` as columns, like
        `torch.linalg.eigh` up to the order and the basis of the null space (any basis of it serves: its eigenvalues
        are equal).
    """
    n, d = rows.shape
    reflectors, tau = torch.geqrf(rows.T)
    q = torch.ormqr(reflectors, tau, torch.eye(d, dtype=rows.dtype, device=rows.device))
    r = reflectors[:n].triu()
    values, vectors = torch.linalg.eigh(r @ r.T)
    values.clamp_(min=0)  # R R^T is PSD: round-off negatives to 0, as laplace-torch's `symeig` does
    q[:, :n] = q[:, :n] @ vectors  # rotate the range's basis onto R R^T's eigenvectors, in place (no d x d copy)
    return torch.cat([values, values.new_zeros(d - n)]), q


class KronCurvature:
    """Accumulates the K-FAC of the Bradley-Terry GGN from the streamed layer inputs a and output gradients g, in
    laplace-torch's layout and scaling (curvlinops' `KFACLinearOperator`, type-2 Fisher, `reduction="sum"`, then
    laplace-torch's rescaling). With gradients scaled by `bradley_terry_weights(empirical=True)` it is the K-FAC of the
    empirical Fisher (`fisher_type="empirical"`): (1 - p_s)^2 in place of p_s (1 - p_s) below.

    Per linear layer, over sequences s (chosen and rejected are separate rows of the module's batch, so their cross
    terms are not in the factors), N the number of pairs, T the padded length of the sequence's batch and R_s the set
    of the sequence's real tokens:

    - "reduce_masked": G = sum_s p_s (1 - p_s) (sum_t g_st)(sum_t g_st)^T,  A = (1/N) sum_s m_s m_s^T,
      m_s = (1/|R_s|) sum_{t in R_s} a_st: K-FAC-reduce over the sequence's own tokens;
    - "reduce": the same G, A = (1/N) sum_s (mean_t a_st)(mean_t a_st)^T with the mean over all T positions, padding
      included, as curvlinops sees the padded batch (laplace-torch's K-FAC-reduce);
    - "expand": G = sum_s p_s (1 - p_s) sum_t g_st g_st^T,  A = 1/(N T) sum_s sum_t a_st a_st^T, padding included
      (laplace-torch's default).

    Padding comes after the token the reward is read at (or is masked out of attention), so g_st = 0 there and G never
    depends on it; A does under "reduce" and "expand": the inputs at pad positions are not zero, and T is the longest
    sequence of the batch, so those factors change with `posterior_batch_size` and the order of the pairs. Under
    "reduce_masked" each sequence's contribution is that of the sequence alone. A layer applied to one pooled vector
    per sequence (BERT's classifier, T = 1) has no padding to leave out.

    A bias gets the one-factor block G. The factors add up over batches and processes as laplace-torch adds them
    (`Kron.__add__`).

    While a factor has seen fewer rows (outer products) than its dimension, the rows are kept too, so that `decompose`
    can take its eigendecomposition from them (`low_rank_eigh`): at most d x d floats per factor, the factor's own size.
    """

    def __init__(self, la: KronLaplace, kfac_approx: str, n_data: int):
        if kfac_approx not in ("expand", "reduce", "reduce_masked"):
            raise ValueError(f"Unknown kfac_approx={kfac_approx!r}: use 'reduce_masked', 'reduce' or 'expand'.")
        self.kfac_approx = kfac_approx
        self.n_data = n_data
        self.attention_mask: torch.Tensor | None = None
        self.factors: dict[int, list[torch.Tensor]] = {}
        # (parameter index, factor position) -> the rows whose outer products sum to the factor; None once they are
        # as many as its dimension (the dense eigensolver is then as cheap).
        self.rows: dict[tuple[int, int], list[torch.Tensor] | None] = {}
        self.dtype, self.device = la._dtype, la._device

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        """The attention mask `(B, L)` of the next forward (rows as the model sees them): which tokens are real."""
        self.attention_mask = attention_mask

    def _add(self, index: int, factors: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        """Add `factors` (each rows^T rows of its `(n, dim)` rows) to those of parameter `index`; keep the rows while
        they are fewer than the dimension."""
        if index in self.factors:
            for total, factor in zip(self.factors[index], factors, strict=True):
                total += factor
        else:
            self.factors[index] = factors
        for position, r in enumerate(rows):
            kept = self.rows.get((index, position), [])
            if kept is not None and sum(map(len, kept)) + len(r) < r.shape[1]:
                self.rows[(index, position)] = [*kept, r.to(self.dtype)]
            else:
                self.rows[(index, position)] = None

    def _input_mean(self, layer: LaplaceLayer, inputs: torch.Tensor) -> torch.Tensor:
        """m_s of "reduce_masked", `(B, in)`."""
        if inputs.shape[1] == 1:  # one pooled vector per sequence
            return inputs[:, 0]
        if self.attention_mask is None:
            raise RuntimeError("kfac_approx='reduce_masked' needs KronCurvature.set_batch(attention_mask) per batch.")
        if self.attention_mask.shape != inputs.shape[:2]:
            raise ValueError(
                f"kfac_approx='reduce_masked': {type(layer.module).__name__} sees {tuple(inputs.shape[:2])} positions "
                f"but the attention mask is {tuple(self.attention_mask.shape)}, so its real tokens are unknown. Use "
                "kfac_approx='reduce' for this model."
            )
        return real_token_mean(inputs, self.attention_mask.to(inputs.device))

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        if self.kfac_approx == "expand":
            length = inputs.shape[1]
            g, a = output_grads.flatten(0, 1), inputs.flatten(0, 1) / (self.n_data * length) ** 0.5
        elif self.kfac_approx == "reduce":
            g, a = output_grads.sum(1), inputs.mean(1) / self.n_data**0.5
        else:
            g, a = output_grads.sum(1), self._input_mean(layer, inputs) / self.n_data**0.5
        gradient_factor = (g.T @ g).to(self.dtype)
        if layer.weight_index is not None:
            self._add(layer.weight_index, [gradient_factor, (a.T @ a).to(self.dtype)], [g, a])
        if layer.bias_index is not None:
            self._add(layer.bias_index, [gradient_factor.clone()], [g])

    def kfacs(self, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The factors in laplace-torch's `Kron` layout and parameter order; zeros for weights without data."""
        kfacs = []
        for i, p in enumerate(params):
            if i in self.factors:
                kfacs.append(self.factors[i])
            else:  # [out x out, in x in] for a weight, [p x p] for a bias
                kfacs.append([torch.zeros(n, n, dtype=self.dtype, device=self.device) for n in p.shape])
        return kfacs

    def decompose(self, params: Sequence[torch.Tensor], damping: bool = False) -> KronDecomposed:
        """The eigendecomposition of `kfacs(params)` that laplace-torch's `Kron.decompose` gives (its `symeig` per
        factor), equal up to round-off and the basis of null spaces; from the kept rows where a factor has fewer rows
        than its dimension (`low_rank_eigh`)."""
        eigenvectors, eigenvalues = [], []
        for index, block in enumerate(self.kfacs(params)):
            pairs = []
            for position, factor in enumerate(block):
                rows = self.rows.get((index, position))
                rows = None if rows is None else torch.cat(rows)
                # Non-finite rows go to laplace-torch's symeig, whose failure `eigendecomposition_errors_raise` explains.
                finite = rows is not None and bool(torch.isfinite(rows).all())
                pairs.append(low_rank_eigh(rows) if finite else symeig(factor))
            eigenvalues.append([values for values, _ in pairs])
            eigenvectors.append([vectors for _, vectors in pairs])
        return KronDecomposed(eigenvectors, eigenvalues, damping=damping)


class ExactGGN:
    """Accumulates the exact diagonal or dense Bradley-Terry GGN, sum_pairs p (1 - p) d d^T with d the gradient of
    r(chosen) - r(rejected), from streamed gradients already scaled by sqrt(p (1 - p)) (see `bradley_terry_weights`);
    with gradients scaled by 1 - p instead, the exact empirical Fisher sum_pairs (1 - p)^2 d d^T."""

    def __init__(self, la: DiagLaplace | FullLaplace):
        self.full = isinstance(la, FullLaplace)
        self.numels = [p.numel() for p in la.params]
        self.diag: dict[int, torch.Tensor] = {}
        self.differences: dict[int, torch.Tensor] = {}

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            difference = pair_difference(jacobians).flatten(1)  # (B, p), weighted by sqrt(p (1 - p))
            if self.full:
                self.differences[index] = difference
            else:
                self.diag[index] = self.diag.get(index, 0) + difference.square().sum(0)

    def batch_curvature(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This batch's share: `(P,)` for diag, `(P, P)` for full; resets the accumulator."""
        if self.full:
            d = torch.cat([self.differences[i] for i in range(len(self.numels))], dim=1)  # every layer ran
            self.differences = {}
            return (d.T @ d).to(device, dtype)
        diag = [self.diag.get(i, torch.zeros(n, device=device)) for i, n in enumerate(self.numels)]
        self.diag = {}
        return torch.cat(diag).to(device, dtype)
