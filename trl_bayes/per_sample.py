"""Per-sample gradients of the Laplace weights from one batched forward and one backward, and the posterior algebra
on them: the GLM predictive variance and the Bradley-Terry GGN curvature (kron, diag, full).

Every Laplace weight here is the weight (or bias) of an `nn.Linear`: the LoRA factors `lora_A`, `lora_B` and the score
head. For a linear layer z_t = W a_t applied at tokens t = 1..T of one sequence, the gradient of that sequence's reward
r is sum_t g_t a_t^T with g_t = dr/dz_t. Sequences of a batch do not interact, so one backward of sum_b r_b gives each
sequence's g_t; forward hooks keep a_t and tensor hooks on the layer outputs receive g_t during the backward, one layer
at a time. No (batch x all-parameters) Jacobian exists at any point: each layer's per-sample gradients are consumed
(projected onto the posterior, or accumulated into the curvature) in its hook and dropped.

laplace-torch's own path (per-output `torch.func` Jacobians through the whole batch, then `functional_variance`) stays
the reference; the tests check equality with it in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace, ParametricLaplace
from laplace.utils import KronDecomposed
from torch import nn

LayerConsumer = Callable[["LaplaceLayer", torch.Tensor, torch.Tensor], None]
"""Receives a layer, its inputs `(B, T, in)` and the gradients of the summed rewards at its outputs `(B, T, out)`."""


@dataclass
class LaplaceLayer:
    """An `nn.Linear` whose weight and/or bias are Laplace weights, with their positions in `la.params`."""

    module: nn.Linear
    weight_index: int | None
    bias_index: int | None


def laplace_layers(model: nn.Module, params: Sequence[torch.Tensor]) -> list[LaplaceLayer]:
    """The linear layers that carry `params` (laplace-torch's parameter order), in the model's module order.

    Raises:
        ValueError: when a Laplace weight is not the weight or bias of an `nn.Linear` (e.g. a trainable LayerNorm);
            the reference path (`laplace_backend=True`) handles any weight.
    """
    index = {id(p): i for i, p in enumerate(params)}
    layers, found = [], set()
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight_index = index.get(id(module.weight))
        bias_index = None if module.bias is None else index.get(id(module.bias))
        if weight_index is None and bias_index is None:
            continue
        layers.append(LaplaceLayer(module, weight_index, bias_index))
        found.update(i for i in (weight_index, bias_index) if i is not None)
    if len(found) != len(params):
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names.get(id(params[i]), f"#{i}") for i in range(len(params)) if i not in found][:3]
        raise ValueError(
            f"The per-sample gradient path handles Laplace weights of nn.Linear layers only; {missing} are not. Use "
            "the reference path (`laplace_backend=True`) or leave those weights out of the posterior."
        )
    return layers


def per_sample_gradients(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of a linear layer's weight: sum_t g_t a_t^T.

    Args:
        inputs: `(B, T, in)`; output_grads: `(B, T, out)`.

    Returns:
        `(B, out, in)`, in the layout of `nn.Linear.weight`.
    """
    if output_grads.shape[-1] > inputs.shape[-1]:
        # The same sum, laid out so that the long dimension is the contiguous one: several times faster for lora_B
        # (out = 3 x hidden, in = rank), and `kron_block_variance` projects the transposed view without a copy.
        return torch.bmm(inputs.mT, output_grads).mT
    return torch.bmm(output_grads.mT, inputs)


def layer_gradients(layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[int, torch.Tensor]:
    """The per-sample gradients `(B, *param.shape)` of the layer's Laplace weights, keyed by their index in la.params."""
    grads = {}
    if layer.weight_index is not None:
        grads[layer.weight_index] = per_sample_gradients(inputs, output_grads)
    if layer.bias_index is not None:
        grads[layer.bias_index] = output_grads.sum(1)
    return grads


@contextlib.contextmanager
def stream_layer_gradients(layers: Sequence[LaplaceLayer], consume: LayerConsumer) -> Iterator[None]:
    """Inside the block, every forward of `layers` keeps the layer's input, and the next backward through the layer
    hands (layer, input, output gradient) to `consume`, then lets both go.

    A layer must run once per forward (true of LoRA factors and score heads): its per-sample gradient is one sum over
    tokens.
    """
    calls: dict[int, int] = {}

    def forward_hook(layer: LaplaceLayer, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls[id(layer)] = calls.get(id(layer), 0) + 1
        if calls[id(layer)] > 1:
            raise RuntimeError(
                f"{type(module).__name__} ran twice in one forward: its per-sample gradient is ambiguous."
            )
        if output.requires_grad:
            inputs = args[0].detach()
            if inputs.dim() == 2:  # a head on one pooled vector per sequence (BERT's classifier): one "token"
                output.register_hook(lambda grad: consume(layer, inputs.unsqueeze(1), grad.detach().unsqueeze(1)))
            else:
                output.register_hook(lambda grad: consume(layer, inputs, grad.detach()))

    handles = [
        layer.module.register_forward_hook(lambda m, a, o, layer=layer: forward_hook(layer, m, a, o))
        for layer in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_backward(
    model: nn.Module,
    layers: Sequence[LaplaceLayer],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    consume: LayerConsumer,
    weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rewards of a right-padded batch, and one backward that streams every layer's gradients to `consume`.

    Args:
        input_ids, attention_mask: `(B, L)`, right-padded; pad positions come after the token the reward is read at,
            so causal attention gives them exactly zero gradient and no padding leaks into a per-sample gradient.
        weights: maps the detached rewards `(B,)` to per-sequence multipliers `(B,)` of the backward (so the streamed
            gradients are those of weights_b * r_b); `None` for plain reward gradients.

    Returns:
        The rewards `(B,)`, detached.
    """
    params = [layer.module.weight for layer in layers if layer.weight_index is not None]
    params += [layer.module.bias for layer in layers if layer.bias_index is not None]
    if not all(p.requires_grad for p in params):
        raise ValueError("The Laplace weights must require grad (`select_laplace_parameters`) for their gradients.")
    with torch.enable_grad(), stream_layer_gradients(layers, consume):
        rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits.reshape(-1)
        scale = torch.ones_like(rewards) if weights is None else weights(rewards.detach())
        # Differentiating with respect to the (small) LoRA weights drives the backward through every hooked layer and
        # no further down than the first of them; the summed gradients it returns are not needed.
        torch.autograd.grad((rewards * scale).sum(), params, allow_unused=True)
    return rewards.detach()


# ---------------------------------------------------------------------------------------------------------------------
# The posterior covariance, block by block: pure functions of per-sample gradients.


def kron_block_variance(
    jacobians: torch.Tensor, eigenvectors: Sequence[torch.Tensor], inverse_eigenvalues: torch.Tensor
) -> torch.Tensor:
    """J P^-1 J^T for one Kronecker block P = Q (diag(l_out ⊗ l_in) + delta) Q^T, Q = Q_out ⊗ Q_in, in its eigenbasis:
    sum_ij (Q_out^T J Q_in)_ij^2 / (l_out,i l_in,j + delta).

    Args:
        jacobians: `(B, out, in)` for a two-factor block, `(B, p)` for a one-factor block (a bias).
        eigenvectors: `[Q_out (out, out), Q_in (in, in)]` or `[Q (p, p)]`.
        inverse_eigenvalues: `(out, in)` or `(p,)`: the inverse eigenvalues of the block's posterior precision.

    Returns:
        `(B,)`.
    """
    if len(eigenvectors) == 2:
        q_out, q_in = eigenvectors
        # (Q_out^T J Q_in)^T = Q_in^T (J^T Q_out): the (B in, out) x (out, out) product is one matrix product.
        projected = q_in.T @ (jacobians.mT @ q_out)  # (B, in, out)
        return torch.einsum("bio,bio,io->b", projected, projected, inverse_eigenvalues.T)
    projected = jacobians.reshape(jacobians.shape[0], -1) @ eigenvectors[0]
    return torch.einsum("bp,bp,p->b", projected, projected, inverse_eigenvalues)


def diag_block_variance(jacobians: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """J diag(variances) J^T for one parameter. `jacobians`: `(B, *shape)`, `variances`: `shape` or flat. Returns `(B,)`."""
    flat = jacobians.flatten(1)
    return torch.einsum("bp,bp,p->b", flat, flat, variances.flatten())


def full_variance(jacobians: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """J Sigma J^T row by row. `jacobians`: `(B, P)`, `covariance`: `(P, P)`. Returns `(B,)`."""
    return ((jacobians @ covariance) * jacobians).sum(-1)


def kron_posterior_blocks(precision: KronDecomposed) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per Laplace parameter, the eigenvectors and inverse eigenvalues of its block of laplace-torch's Kronecker
    posterior precision (with its `deltas`, the prior precision, and its `damping` convention)."""
    blocks = []
    for vectors, values, delta in zip(precision.eigenvectors, precision.eigenvalues, precision.deltas, strict=True):
        if len(values) == 1:
            eigenvalues = values[0] + delta
        elif precision.damping:
            eigenvalues = torch.outer(values[0] + delta.sqrt(), values[1] + delta.sqrt())
        else:
            eigenvalues = torch.outer(values[0], values[1]) + delta
        blocks.append((list(vectors), 1.0 / eigenvalues))
    return blocks


class GLMVariance:
    """Accumulates the linearized predictive variance J Sigma J^T of a batch as the layers' gradients stream in.

    Kron and diag posteriors are block-diagonal over the Laplace parameters, so each layer's share is added and its
    gradients dropped at once; a full posterior couples all of them, so their gradients are kept for `finish`.

    Args:
        la: the fitted posterior.
        transform: maps (parameter index, per-sample gradients `(B, *shape)`) to the rows that enter the quadratic
            form, e.g. chosen minus rejected for pairs, or minus the prompt's mean gradient for the relative variance;
            it must act on the batch dimension the same way for every parameter.
    """

    def __init__(self, la: ParametricLaplace, transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        self.transform = transform or (lambda index, jacobians: jacobians)
        self.shapes = [p.shape for p in la.params]
        self.variance: torch.Tensor | float = 0.0
        self.full_jacobians: dict[int, torch.Tensor] = {}
        if isinstance(la, KronLaplace):
            self.kron = kron_posterior_blocks(la.posterior_precision)
        elif isinstance(la, DiagLaplace):
            self.diag = list(torch.split(la.posterior_variance, [s.numel() for s in self.shapes]))
        elif isinstance(la, FullLaplace):
            self.covariance = la.posterior_covariance
        else:
            raise NotImplementedError(f"No GLM variance for {type(la).__name__}: use kron, diag or full.")
        self.la = la

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            self.add(index, jacobians)

    def add(self, index: int, jacobians: torch.Tensor) -> None:
        """Add the share of Laplace parameter `index`, from its per-sample gradients `(B, *shape)`."""
        jacobians = self.transform(index, jacobians)
        if isinstance(self.la, KronLaplace):
            vectors, inverse_eigenvalues = self.kron[index]
            self.variance = self.variance + kron_block_variance(jacobians, vectors, inverse_eigenvalues)
        elif isinstance(self.la, DiagLaplace):
            self.variance = self.variance + diag_block_variance(jacobians, self.diag[index])
        else:
            self.full_jacobians[index] = jacobians.flatten(1)

    def finish(self) -> torch.Tensor:
        """The variances `(B,)`, clamped at zero against round-off."""
        if isinstance(self.la, FullLaplace):
            jacobians = torch.cat([self.full_jacobians[i] for i in range(len(self.shapes))], dim=1)
            self.variance = full_variance(jacobians, self.covariance)
        return torch.as_tensor(self.variance).clamp_min(0.0)


class GroupGradientSums:
    """Accumulates, over batches, the weighted sum of the reward gradients of each group of responses (the candidates
    of one prompt), sum_i w_i J_i, and the group's total weight: the mean gradient J_mean of the relative variance.

    Memory: (groups x P) for P Laplace weights, whatever the number of responses; the caller chooses how many groups
    to hold at once. Before each forward-backward, `set_batch` says which group (and weight) each row belongs to.

    Args:
        num_groups: G, the number of groups accumulated.
    """

    def __init__(self, num_groups: int):
        self.num_groups = num_groups
        self.sums: dict[int, torch.Tensor] = {}
        self.total_weight: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def set_batch(self, groups: torch.Tensor, weights: torch.Tensor) -> None:
        """`groups`: `(B,)` group index in [0, G) of each row of the next batch; `weights`: `(B,)`, e.g. how often
        a deduplicated response was sampled."""
        self.groups, self.weights = groups, weights
        if self.total_weight is None:
            self.total_weight = torch.zeros(self.num_groups, dtype=torch.float64)
        self.total_weight.index_add_(0, groups.cpu(), weights.double().cpu())

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            self.add(index, jacobians)

    def add(self, index: int, jacobians: torch.Tensor) -> None:
        if self.groups is None:
            raise RuntimeError("GroupGradientSums.set_batch must be called before each batch.")
        weighted = jacobians * self.weights.to(jacobians).reshape(-1, *[1] * (jacobians.dim() - 1))
        if index not in self.sums:
            self.sums[index] = jacobians.new_zeros(self.num_groups, *jacobians.shape[1:])
        self.sums[index].index_add_(0, self.groups.to(jacobians.device), weighted)

    def means(self) -> dict[int, torch.Tensor]:
        """Per Laplace parameter, the groups' mean gradients `(G, *shape)`.

        Raises:
            ValueError: when a group received no weight (an empty group has no mean).
        """
        if self.total_weight is None or (self.total_weight <= 0).any():
            raise ValueError("Every group needs at least one response with a positive weight for its mean gradient.")
        return {
            index: total / self.total_weight.to(total).reshape(-1, *[1] * (total.dim() - 1))
            for index, total in self.sums.items()
        }


def fan_out(*consumers) -> LayerConsumer:
    """One layer consumer that computes a layer's per-sample gradients once and hands them, parameter by parameter,
    to several accumulators (each with an `add(index, jacobians)` method)."""

    def consume(layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            for consumer in consumers:
                consumer.add(index, jacobians)

    return consume


def centered(means: dict[int, torch.Tensor], groups: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A `GLMVariance` transform: J_i - J_mean(group of i), with `means[index]` `(G, *shape)` and `groups` `(B,)`."""

    def transform(index: int, jacobians: torch.Tensor) -> torch.Tensor:
        return jacobians - means[index].to(jacobians)[groups.to(jacobians.device)]

    return transform


def pair_difference(jacobians: torch.Tensor) -> torch.Tensor:
    """Rows (chosen_0, rejected_0, chosen_1, ...) `(2B, ...)` -> chosen minus rejected `(B, ...)`."""
    return jacobians[0::2] - jacobians[1::2]


def glm_predictive(
    la: ParametricLaplace,
    model: nn.Module,
    layers: Sequence[LaplaceLayer],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLM predictive (MAP reward, J Sigma J^T) of a right-padded batch from one forward and one backward.

    Args:
        input_ids, attention_mask: `(B, L)`; with `pairs=True`, rows interleaved (chosen_0, rejected_0, ...).

    Returns:
        mean and variance, `(B,)` each, or `(B/2,)` of the reward differences with `pairs=True`.
    """
    variance = GLMVariance(la, (lambda index, jacobians: pair_difference(jacobians)) if pairs else None)
    rewards = forward_backward(model, layers, input_ids, attention_mask, variance)
    return (pair_difference(rewards) if pairs else rewards), variance.finish()


def batch_jacobians(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    layers: Sequence[LaplaceLayer],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards `(B,)` and their whole Jacobians `(B, P)` in laplace-torch's parameter order, from one forward and one
    backward: for callers that need J itself (the prior grid search); the batch bounds its size."""
    rows: dict[int, torch.Tensor] = {}

    def keep(layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        rows.update({i: j.flatten(1) for i, j in layer_gradients(layer, inputs, output_grads).items()})

    rewards = forward_backward(model, layers, input_ids, attention_mask, keep)
    return rewards, torch.cat([rows[i] for i in range(len(params))], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# The Bradley-Terry GGN from the same per-sample quantities.


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


class KronCurvature:
    """Accumulates laplace-torch's K-FAC of the Bradley-Terry GGN (curvlinops' `KFACLinearOperator`, type-2 Fisher,
    `reduction="sum"`, then laplace-torch's rescaling), from the streamed layer inputs a and output gradients g. With
    gradients scaled by `bradley_terry_weights(empirical=True)` it is the K-FAC of the empirical Fisher
    (`fisher_type="empirical"`): (1 - p_s)^2 in place of p_s (1 - p_s) below.

    What that definition is, per linear layer, over sequences s (chosen and rejected are separate rows of the module's
    batch, so their cross terms are not in the factors) with T the padded length of the sequence's batch:

    - "reduce": G = sum_s p_s (1 - p_s) (sum_t g_st)(sum_t g_st)^T,  A = (1/N) sum_s (mean_t a_st)(mean_t a_st)^T;
    - "expand": G = sum_s p_s (1 - p_s) sum_t g_st g_st^T,           A = 1/(N T) sum_s sum_t a_st a_st^T;

    N the number of pairs. The mean over t runs over padding too, as curvlinops sees the padded batch. A bias gets the
    one-factor block G. The factors add up over batches and processes as laplace-torch adds them (`Kron.__add__`).
    """

    def __init__(self, la: KronLaplace, kfac_approx: str, n_data: int):
        self.expand = kfac_approx == "expand"
        self.n_data = n_data
        self.factors: dict[int, list[torch.Tensor]] = {}
        self.dtype, self.device = la._dtype, la._device

    def _add(self, index: int, factors: list[torch.Tensor]) -> None:
        if index in self.factors:
            for total, factor in zip(self.factors[index], factors, strict=True):
                total += factor
        else:
            self.factors[index] = factors

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        length = inputs.shape[1]
        if self.expand:
            g, a = output_grads.flatten(0, 1), inputs.flatten(0, 1) / (self.n_data * length) ** 0.5
        else:
            g, a = output_grads.sum(1), inputs.mean(1) / self.n_data**0.5
        gradient_factor = (g.T @ g).to(self.dtype)
        if layer.weight_index is not None:
            self._add(layer.weight_index, [gradient_factor, (a.T @ a).to(self.dtype)])
        if layer.bias_index is not None:
            self._add(layer.bias_index, [gradient_factor.clone()])

    def kfacs(self, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The factors in laplace-torch's `Kron` layout and parameter order; zeros for weights without data."""
        kfacs = []
        for i, p in enumerate(params):
            if i in self.factors:
                kfacs.append(self.factors[i])
            else:  # [out x out, in x in] for a weight, [p x p] for a bias
                kfacs.append([torch.zeros(n, n, dtype=self.dtype, device=self.device) for n in p.shape])
        return kfacs


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
