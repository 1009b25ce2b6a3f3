"""Per-sample gradients of the Laplace weights from one batched forward and one backward, and the posterior algebra
on them: the GLM predictive variance and the Bradley-Terry GGN curvature (kron, diag, full).

Every Laplace weight here is the weight (or bias) of an `nn.Linear`: the LoRA factors `lora_A`, `lora_B` and the score
head. For a linear layer z_t = W a_t applied at tokens t = 1..T of one sequence, the gradient of that sequence's reward
r is sum_t g_t a_t^T with g_t = dr/dz_t. Sequences of a batch do not interact, so one backward of sum_b r_b gives each
sequence's g_t; forward hooks keep a_t and tensor hooks on the layer outputs receive g_t during the backward, one layer
at a time. Each layer's per-sample gradients are consumed in its hook (scaled by a square root of the posterior
covariance, or accumulated into the curvature) and dropped; a (batch x all-parameters) array exists only where a caller
asks for the scaled rows themselves (`ScaledGradients`, for the relative variance in one pass).

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
        # (out = 3 x hidden, in = rank), and `kron_block_scale` projects the transposed view without a copy.
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


def kron_block_scale(
    jacobians: torch.Tensor, eigenvectors: Sequence[torch.Tensor], inverse_sqrt_eigenvalues: torch.Tensor
) -> torch.Tensor:
    """Rows u with u u^T = J P^-1 J^T for one Kronecker block P = Q (diag(l_out ⊗ l_in) + delta) Q^T,
    Q = Q_out ⊗ Q_in: J rotated into the block's eigenbasis and scaled, u = (Q_out^T J Q_in) / sqrt(l_out l_in + delta).

    Args:
        jacobians: `(B, out, in)` for a two-factor block, `(B, p)` for a one-factor block (a bias).
        eigenvectors: `[Q_out (out, out), Q_in (in, in)]` or `[Q (p, p)]`.
        inverse_sqrt_eigenvalues: `(in, out)` (note the order) or `(p,)`: the inverse square roots of the eigenvalues
            of the block's posterior precision.

    Returns:
        `(B, in * out)` or `(B, p)`, laid out in the eigenbasis (any fixed layout serves: only norms and differences
        of rows are read).
    """
    if len(eigenvectors) == 2:
        q_out, q_in = eigenvectors
        # (Q_out^T J Q_in)^T = Q_in^T (J^T Q_out): the (B in, out) x (out, out) product is one matrix product.
        projected = q_in.T @ (jacobians.mT @ q_out)  # (B, in, out)
        return (projected * inverse_sqrt_eigenvalues).flatten(1)
    return (jacobians.reshape(jacobians.shape[0], -1) @ eigenvectors[0]) * inverse_sqrt_eigenvalues


def kron_posterior_blocks(precision: KronDecomposed) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per Laplace parameter, the eigenvectors and the inverse square roots of the eigenvalues (`(in, out)` for a
    weight, as `kron_block_scale` reads them) of its block of laplace-torch's Kronecker posterior precision (with its
    `deltas`, the prior precision, and its `damping` convention)."""
    blocks = []
    for vectors, values, delta in zip(precision.eigenvectors, precision.eigenvalues, precision.deltas, strict=True):
        if len(values) == 1:
            eigenvalues = values[0] + delta
        elif precision.damping:
            eigenvalues = torch.outer(values[0] + delta.sqrt(), values[1] + delta.sqrt()).T
        else:
            eigenvalues = torch.outer(values[0], values[1]).T + delta
        blocks.append((list(vectors), eigenvalues.rsqrt().contiguous()))
    return blocks


class PosteriorScale:
    """A square root S of the posterior covariance, Sigma = S S^T, applied to per-sample gradients: the rows u = J S
    have u u^T = J Sigma J^T, so the GLM variance is |u|^2 and, S being linear, the variance of a difference of
    rewards is |u_i - u_j|^2 (laplace-torch calls S the `posterior_scale`).

    Kron and diag posteriors are block-diagonal over the Laplace parameters, and so is S: `block` scales one
    parameter's gradients (kron: into the eigenbasis of the block's Kronecker factors, then by the inverse square roots
    of its eigenvalues; diag: by the posterior standard deviations). A full posterior couples all parameters: `full`
    multiplies the whole row by laplace-torch's Cholesky factor.

    Args:
        la: the fitted posterior (kron, diag or full).
    """

    def __init__(self, la: ParametricLaplace):
        self.numels = [p.numel() for p in la.params]
        self.kron: list[tuple[list[torch.Tensor], torch.Tensor]] | None = None
        self.diag: list[torch.Tensor] | None = None
        self.cholesky: torch.Tensor | None = None
        if isinstance(la, KronLaplace):
            self.kron = kron_posterior_blocks(la.posterior_precision)
        elif isinstance(la, DiagLaplace):
            self.diag = list(torch.split(la.posterior_variance.sqrt(), self.numels))
        elif isinstance(la, FullLaplace):
            self.cholesky = la.posterior_scale  # lower triangular, Sigma = S S^T
        else:
            raise NotImplementedError(f"No GLM variance for {type(la).__name__}: use kron, diag or full.")
        self.blockwise = self.cholesky is None

    def block(self, index: int, jacobians: torch.Tensor) -> torch.Tensor:
        """Kron and diag: the scaled gradients `(B, p)` of Laplace parameter `index` from its gradients `(B, *shape)`."""
        if self.kron is not None:
            vectors, inverse_sqrt_eigenvalues = self.kron[index]
            return kron_block_scale(jacobians, vectors, inverse_sqrt_eigenvalues)
        if self.diag is not None:
            return jacobians.flatten(1) * self.diag[index]
        raise RuntimeError("A full posterior couples all parameters: scale whole rows with `PosteriorScale.full`.")

    def full(self, jacobians: torch.Tensor) -> torch.Tensor:
        """Full: the scaled rows `(B, P)` from whole gradients `(B, P)` in laplace-torch's parameter order."""
        return jacobians @ self.cholesky


class GLMVariance:
    """Accumulates the linearized predictive variance J Sigma J^T = |J S|^2 of a batch as the layers' gradients stream
    in (`PosteriorScale`).

    Kron and diag posteriors are block-diagonal over the Laplace parameters, so each layer's share is added and its
    gradients dropped at once; a full posterior couples all of them, so their gradients are kept for `finish`.

    Args:
        scale: the posterior's square root, `PosteriorScale(la)` (built once, shared by the batches).
        transform: maps (parameter index, per-sample gradients `(B, *shape)`) to the rows that enter the quadratic
            form, e.g. chosen minus rejected for pairs, or minus the prompt's mean gradient for the relative variance;
            it must act on the batch dimension the same way for every parameter.
    """

    def __init__(self, scale: PosteriorScale, transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        self.scale = scale
        self.transform = transform or (lambda index, jacobians: jacobians)
        self.variance: torch.Tensor | float = 0.0
        self.full_jacobians: dict[int, torch.Tensor] = {}

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            self.add(index, jacobians)

    def add(self, index: int, jacobians: torch.Tensor) -> None:
        """Add the share of Laplace parameter `index`, from its per-sample gradients `(B, *shape)`."""
        jacobians = self.transform(index, jacobians)
        if self.scale.blockwise:
            self.variance = self.variance + self.scale.block(index, jacobians).square().sum(1)
        else:
            self.full_jacobians[index] = jacobians.flatten(1)

    def finish(self) -> torch.Tensor:
        """The variances `(B,)`."""
        if not self.scale.blockwise:
            jacobians = torch.cat([self.full_jacobians[i] for i in range(len(self.scale.numels))], dim=1)
            self.variance = self.scale.full(jacobians).square().sum(1)
        return torch.as_tensor(self.variance)


class ScaledGradients:
    """Collects the scaled gradients u = J S (`PosteriorScale`) of a batch as the layers' gradients stream in, for
    callers that need the rows themselves: the relative variance in one pass centers them on their group's mean.

    Memory: one `(B, P)` tensor for P Laplace weights (plus, for a full posterior, the unscaled rows until `finish`).

    Args:
        scale: the posterior's square root, `PosteriorScale(la)`.
    """

    def __init__(self, scale: PosteriorScale):
        self.scale = scale
        self.offsets = [0]
        for numel in scale.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.rows: torch.Tensor | None = None
        self.filled: set[int] = set()

    def __call__(self, layer: LaplaceLayer, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        for index, jacobians in layer_gradients(layer, inputs, output_grads).items():
            self.add(index, jacobians)

    def add(self, index: int, jacobians: torch.Tensor) -> None:
        """Write the rows of Laplace parameter `index` from its per-sample gradients `(B, *shape)`."""
        if self.rows is None:  # written in place: no second (B, P) copy from concatenating the parameters' rows
            self.rows = jacobians.new_empty(jacobians.shape[0], self.offsets[-1])
        rows = self.scale.block(index, jacobians) if self.scale.blockwise else jacobians.flatten(1)
        self.rows[:, self.offsets[index] : self.offsets[index + 1]] = rows
        self.filled.add(index)

    def finish(self) -> torch.Tensor:
        """The scaled gradients `(B, P)`, parameters in laplace-torch's order; |row|^2 is the GLM variance."""
        if self.rows is None or len(self.filled) != len(self.scale.numels):
            raise RuntimeError("ScaledGradients.finish before every Laplace parameter's gradients came in.")
        return self.rows if self.scale.blockwise else self.scale.full(self.rows)


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
    transform = (lambda index, jacobians: pair_difference(jacobians)) if pairs else None
    variance = GLMVariance(PosteriorScale(la), transform)
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
