"""Laplace-LoRA for reward models: the pair adapter, parameter selection, the posterior fit, the linearized (GLM)
predictive and (de)serialization. Pure PyTorch + laplace-torch; distributed reductions come in as a callable so that
this module never touches a process group itself.

Vocabulary follows laplace-torch: `hessian_structure`, `prior_precision`, `optimize_prior_precision`, `subset_of_weights`.
Reference: Yang et al., "Bayesian Reward Models for LLM Alignment" (arXiv 2402.13210) and "Bayesian Low-rank Adaptation
for Large Language Models" (arXiv 2308.13111).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from laplace import Laplace
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace, ParametricLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, EFInterface
from laplace.utils import Kron
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batching import token_budget_batches
from .curvature import ExactGGN, KronCurvature, bradley_terry_weights

# The options moved to `enums`; importing them from here keeps working (the trainer and older user code do).
from .enums import Curvature, HessianStructure, KFACApprox, PriorPrecisionMethod, SubsetOfWeights  # noqa: F401
from .per_sample import forward_backward, laplace_layers, pair_difference

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over processes and returns the sum (identity on a single process)."""


class RewardPairModel(nn.Module):
    """Adapts a sequence-classification reward model to laplace-torch's `likelihood="reward_modeling"` protocol.

    Fitting: `batch["input_ids"]` of shape `(B, 2, L)` (chosen, rejected) -> logits `(B, 2)` = [r(chosen), r(rejected)]
    with target class 0, i.e. the Bradley-Terry likelihood as a 2-class softmax.
    Prediction: `batch["input_ids"]` of shape `(B, L)` -> rewards `(B, 1)`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if input_ids.ndim == 3:
            logits = self.model(input_ids=input_ids.flatten(0, 1), attention_mask=attention_mask.flatten(0, 1)).logits
            return logits.view(input_ids.shape[0], 2)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@contextlib.contextmanager
def eigendecomposition_errors_raise():
    """Turn laplace-torch's `exit()` on a failed eigendecomposition of a Kronecker factor (`laplace.utils.symeig`) into
    an exception: a silent exit with status 0 would end the user's run and report success."""
    try:
        yield
    except SystemExit as error:
        raise RuntimeError(
            "laplace-torch failed to eigendecompose a Kronecker factor of the curvature (non-finite or low-precision "
            "values). Check that the reward model is float32 and its rewards finite, or use hessian_structure='diag'."
        ) from error


def check_laplace_dtype(model: nn.Module) -> None:
    """The curvature and the posterior algebra (eigendecompositions, log-determinants) need float32 or float64."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"The Laplace posterior needs a float32 (or float64) model, but {name} is {param.dtype}. Load the "
                "reward model with `dtype=torch.float32` (for a model name: `BayesianRewardConfig(model_init_kwargs="
                "{'dtype': 'float32'})`); mixed-precision training with `bf16=True` keeps float32 weights and is fine."
            )


def pop_input_require_grads_hooks(model) -> dict:
    """Remove and return the `enable_input_require_grads` forward hooks of the input embeddings.

    PEFT and the Trainer register them (sometimes twice, so `disable_input_require_grads` misses one); they call
    `requires_grad_` inside the forward, which torch.func transforms (laplace-torch's "diag"/"full" Jacobians) refuse.
    """
    hooks = model.get_input_embeddings()._forward_hooks
    popped = {k: f for k, f in hooks.items() if getattr(f, "__name__", "").startswith("make_inputs_require_grad")}
    for key in popped:
        del hooks[key]
    return popped


@contextlib.contextmanager
def without_input_require_grads_hooks(model: nn.Module):
    """The `enable_input_require_grads` hooks of the input embeddings detached inside the block, restored after.

    Without them no backward runs below the first layer that carries Laplace weights, and torch.func transforms
    (laplace-torch's stock predictive) work.
    """
    popped = pop_input_require_grads_hooks(model)
    try:
        yield
    finally:
        model.get_input_embeddings()._forward_hooks.update(popped)


def split_validation_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded `fraction` of `pairs` (at least one); both parts keep the original order."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(fraction * len(pairs))))
    if n_val >= len(pairs):
        raise ValueError(f"Too few pairs ({len(pairs)}) to hold out a validation split for 'gridsearch'.")
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


def select_laplace_parameters(model: nn.Module, subset_of_weights: SubsetOfWeights | str) -> list[str]:
    """Mark the weights that carry the posterior as the only ones requiring grad; return their names in order.

    Raises:
        ValueError: when the model has no LoRA weights (the posterior is over a LoRA adapter).
    """
    subset_of_weights = SubsetOfWeights(subset_of_weights)
    named = list(model.named_parameters())
    if not any("lora_" in name for name, _ in named):
        raise ValueError(
            "The reward model has no LoRA weights: Laplace-LoRA needs a PEFT model. Pass "
            "`peft_config=LoraConfig(task_type='SEQ_CLS', ...)` to the trainer or load a `PeftModel`."
        )
    trainable = {name for name, p in named if p.requires_grad}
    if subset_of_weights == SubsetOfWeights.LORA:
        selected = {name for name in trainable if "lora_" in name}
    elif subset_of_weights == SubsetOfWeights.HEAD:
        selected = {name for name in trainable if "lora_" not in name}
    else:
        selected = trainable
    if not selected:
        raise ValueError(
            f"No trainable weights match subset_of_weights='{subset_of_weights.value}'. Is the adapter active and "
            "trainable (`model.train()` / `is_trainable=True` when loading)?"
        )
    for name, param in named:
        param.requires_grad_(name in selected)
    return [name for name, _ in named if name in selected]


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids of `(chosen, rejected)` pairs into the fitting batch.

    Returns:
        `input_ids`, `attention_mask` of shape `(B, 2, L)` and `labels` `(B,)` of zeros (chosen is class 0).
    """
    length = max(max(len(c), len(r)) for c, r in pairs)
    input_ids = torch.full((len(pairs), 2, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), 2, length), dtype=torch.long)
    for i, pair in enumerate(pairs):
        for j, ids in enumerate(pair):
            input_ids[i, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, j, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.zeros(len(pairs), dtype=torch.long),
    }


def pair_batches(pair_lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """The global batches of the posterior fit (or of the grid search's held-out pairs): consecutive pairs, in order.

    A batch of B pairs is padded to `(2B, L)`, L its longest row, so a pair counts 2 x its longer row against the
    budget, as `BayesianRewardModel.predict_pair_ids` counts it.

    Args:
        pair_lengths: `(N,)` tokens of each pair's longer row, `max(len(chosen), len(rejected))`.
        batch_size: pairs per batch when `max_tokens` is `None` (`posterior_batch_size`).
        max_tokens: padded tokens per batch (`posterior_max_tokens`), or `None` for fixed batches.

    Returns:
        Lists of pair indices; their concatenation is `range(N)`.
    """
    if max_tokens is None:
        return token_budget_batches(pair_lengths, max_batch_size=batch_size)
    return token_budget_batches(pair_lengths, max_tokens=max(1, max_tokens // 2))


def shard_batches(
    num_pairs: int,
    batch_size: int,
    process_index: int,
    num_processes: int,
    max_tokens: int | None = None,
    pair_lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """This process's share of the global fitting batches.

    The global batches are the same for any number of processes (`pair_batches`: consecutive pairs, `batch_size` each
    or within `max_tokens` padded tokens), and they are dealt round-robin; so the summed curvature does not depend on
    how many processes share the work.

    Args:
        pair_lengths: `(num_pairs,)` tokens of each pair's longer row; needed with `max_tokens`.
    """
    if pair_lengths is None:
        if max_tokens is not None:
            raise ValueError("A token budget (`max_tokens`) needs the pairs' lengths: pass `pair_lengths`.")
        pair_lengths = [0] * num_pairs
    if len(pair_lengths) != num_pairs:
        raise ValueError(f"Got {len(pair_lengths)} pair lengths for {num_pairs} pairs.")
    batches = pair_batches(pair_lengths, batch_size, max_tokens)
    if len(batches) < num_processes:
        size = (
            f"batches of `posterior_batch_size`={batch_size} pairs"
            if max_tokens is None
            else f"batches of `posterior_max_tokens`={max_tokens} padded tokens"
        )
        raise ValueError(
            f"The posterior fit has {num_pairs} pairs, i.e. {len(batches)} {size}, fewer than the {num_processes} "
            "processes: lower `posterior_batch_size` (with `posterior_max_tokens`=None) or `posterior_max_tokens`, "
            "or use more pairs."
        )
    return batches[process_index::num_processes]


def make_laplace(
    pair_model: RewardPairModel,
    hessian_structure: HessianStructure | str,
    prior_precision: float | torch.Tensor = 1.0,
    kfac_approx: KFACApprox | str = KFACApprox.REDUCE_MASKED,
    curvature: Curvature | str = Curvature.GGN,
) -> ParametricLaplace:
    """An unfitted laplace-torch posterior over the weights of `pair_model` that require grad, with the curvature's
    backend (`CurvlinopsGGN`, laplace-torch's default, or `CurvlinopsEF`): the reference path and `fit_per_sample`
    both read it from there."""
    hessian_structure = HessianStructure(hessian_structure)
    backend = CurvlinopsEF if Curvature(curvature) == Curvature.EF else CurvlinopsGGN
    kwargs: dict[str, Any] = {"backend": backend}
    if hessian_structure == HessianStructure.KRON:
        # laplace-torch forwards these to curvlinops' KFACLinearOperator ("reduce"/"expand"); `fit_per_sample` reads
        # them from there too, "reduce_masked" included (which `fit_laplace` keeps away from curvlinops).
        kwargs["asdl_fisher_kwargs"] = {"kfac_approx": KFACApprox(kfac_approx).value}
    return Laplace(
        pair_model,
        "reward_modeling",
        subset_of_weights="all",  # "all" weights that require grad: `select_laplace_parameters` decided which
        hessian_structure=hessian_structure.value,
        prior_precision=prior_precision,
        **kwargs,
    )


def fit_laplace(
    la: ParametricLaplace,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    all_reduce: AllReduce | None = None,
    progress_bar: bool = False,
    device: torch.device | str = "cpu",
    laplace_backend: bool = False,
    max_tokens: int | None = None,
) -> ParametricLaplace:
    """Fit the GGN curvature of the Bradley-Terry likelihood on this process's share of `pairs`, then sum it over
    processes with `all_reduce` so that every process holds the posterior of the whole data set.

    laplace-torch has no data-parallel support (its issue #5); each process fits its shard, then the additive pieces
    (the curvature and the loss) are summed. `n_data` is the global count on every process.

    By default the curvature comes from per-sample gradients, one forward and one backward per batch (`fit_per_sample`):
    kron gives its K-FAC (`kfac_approx`), diag and full the exact GGN. `laplace_backend=True` uses laplace-torch's own
    `fit` (curvlinops) instead, the reference (not for kfac_approx="reduce_masked", which curvlinops lacks): for kron
    it costs a second backward and a second forward per batch, for diag and full Jacobians of all 2B outputs through
    the whole batch, time and memory quadratic in the batch (12 GB at 8 pairs of 128 tokens on a Pythia-70M shape).

    The batches are `batch_size` consecutive pairs, or with `max_tokens` (`posterior_max_tokens`) consecutive pairs
    within that many padded tokens (`pair_batches`); both are the same for any number of processes.
    """
    if len(pairs) == 0:
        raise ValueError("The posterior fit got an empty dataset: pass at least one preference pair.")
    masked = la._asdl_fisher_kwargs.get("kfac_approx") == KFACApprox.REDUCE_MASKED
    if laplace_backend and isinstance(la, KronLaplace) and masked:
        raise ValueError(
            "kfac_approx='reduce_masked' has no laplace-torch reference path (curvlinops cannot leave padding out of "
            "K-FAC-reduce): use laplace_backend=False, or kfac_approx='reduce' or 'expand' with laplace_backend=True."
        )
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected in pairs]
    batches = shard_batches(len(pairs), batch_size, process_index, num_processes, max_tokens, lengths)
    loader = DataLoader(
        list(pairs),  # the whole data set: laplace-torch reads N from `len(loader.dataset)`
        batch_sampler=batches,
        # laplace-torch moves the labels to the model's device but not dict inputs: move the whole batch here.
        collate_fn=lambda b: {k: v.to(device) for k, v in collate_pairs(b, pad_token_id).items()},
    )
    was_training = la.model.training
    distributed = all_reduce is not None and num_processes > 1
    if laplace_backend:
        with eigendecomposition_errors_raise():
            la.fit(loader, progress_bar=progress_bar)
    else:
        # The all-reduce eigendecomposes the summed Kronecker factors: no need to decompose the local ones first.
        fit_per_sample(la, loader, progress_bar=progress_bar, decompose=not distributed)
    la.model.train(was_training)
    if distributed:
        _all_reduce_curvature(la, all_reduce)
    return la


def pair_differences(rewards: torch.Tensor, jacobians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward differences and their gradients from interleaved rows (chosen_0, rejected_0, chosen_1, ...).

    Args:
        rewards: `(2B,)`; jacobians: `(2B, P)`.

    Returns:
        r(chosen) - r(rejected) `(B,)` and its gradient `(B, P)`.
    """
    return rewards[0::2] - rewards[1::2], jacobians[0::2] - jacobians[1::2]


def uses_empirical_fisher(la: ParametricLaplace) -> bool:
    """Whether `la` was made with the empirical Fisher (`make_laplace(curvature="ef")`)."""
    return issubclass(la._backend_cls, EFInterface)


def fit_per_sample(
    la: ParametricLaplace, loader: DataLoader, progress_bar: bool = False, decompose: bool = True
) -> None:
    """The Bradley-Terry GGN (or empirical Fisher) curvature from per-sample layer gradients, one forward and one
    backward per batch.

    For the 2-class softmax over [r(chosen), r(rejected)], the Hessian of the loss in the logits is p(1-p) [[1, -1],
    [-1, 1]] with p = sigmoid(r_c - r_r), and the loss gradient in the logits (1-p) [-1, 1]. "diag" and "full" get the
    exact GGN, sum_pairs p(1-p) g g^T with g = grad [r(chosen) - r(rejected)] (EF: (1-p)^2 instead of p(1-p)); "kron"
    gets its K-FAC (`curvature.KronCurvature` writes out each `kfac_approx`; "reduce" and "expand" are laplace-torch's
    own). Fills the same fields as laplace-torch's `fit` (`H`, `H_facs`, `loss`, `n_data`, `mean`), so its posterior
    algebra (`functional_variance`, `log_marginal_likelihood`, `optimize_prior_precision`) applies unchanged.
    With `decompose=False`, kron leaves `H` as the summed factors (`H_facs`) for the caller to reduce and decompose.
    """
    la.model.eval()
    la._init_H()
    la.loss = torch.zeros((), dtype=la._dtype, device=la._device)
    la.mean = torch.nn.utils.parameters_to_vector(la.params).detach()
    la.n_outputs = 2
    la.model.output_size = 2
    model = la.model.model
    layers = laplace_layers(model, la.params)
    n_data = len(loader.dataset)
    if isinstance(la, KronLaplace):
        # laplace-torch hands `asdl_fisher_kwargs` to curvlinops, whose default is "expand".
        kfac_approx = la._asdl_fisher_kwargs.get("kfac_approx", "expand")
        curvature: KronCurvature | ExactGGN = KronCurvature(la, kfac_approx, n_data)
    elif isinstance(la, (DiagLaplace, FullLaplace)):
        curvature = ExactGGN(la)
    else:
        raise NotImplementedError(f"No per-sample fit for {type(la).__name__}: use kron, diag or full.")
    empirical = uses_empirical_fisher(la)
    weights = lambda rewards: bradley_terry_weights(rewards, empirical)  # noqa: E731
    for batch in tqdm(loader, desc="[Computing Hessian]", disable=not progress_bar):
        input_ids, attention_mask = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)
        if isinstance(curvature, KronCurvature):
            curvature.set_batch(attention_mask)
        rewards = forward_backward(model, layers, input_ids, attention_mask, curvature, weights)
        la.loss = la.loss + torch.nn.functional.softplus(-pair_difference(rewards)).sum()  # cross-entropy, "chosen"
        if isinstance(curvature, ExactGGN):
            la.H += curvature.batch_curvature(la._device, la._dtype)
    la.n_data = n_data
    if isinstance(curvature, KronCurvature):
        la.H_facs = la.H = Kron(curvature.kfacs(la.params))
        if decompose:
            with eigendecomposition_errors_raise():
                la.H = curvature.decompose(la.params, damping=la.damping)
    elif isinstance(la, FullLaplace):
        la._posterior_scale = None


def _all_reduce_curvature(la: ParametricLaplace, all_reduce: AllReduce) -> None:
    la.loss = all_reduce(torch.as_tensor(la.loss, dtype=la._dtype, device=la._device).clone())
    if isinstance(la, KronLaplace):
        # Kronecker factors add up factor-wise over batches in laplace-torch (`Kron.__add__`); do the same over
        # processes, then redo the eigendecomposition that `fit` did on the local factors.
        la.H_facs = Kron([[all_reduce(f.clone()) for f in block] for block in la.H_facs.kfacs])
        with eigendecomposition_errors_raise():
            la.H = la.H_facs.decompose(damping=la.damping)
    else:
        la.H = all_reduce(la.H.clone())
        if isinstance(la, FullLaplace):
            la._posterior_scale = None


def optimize_prior_precision_marglik(la: ParametricLaplace, init_prior_prec: float, n_steps: int = 100) -> None:
    """laplace-torch's marginal-likelihood optimization of a scalar prior precision (Adam on its logarithm)."""
    with warnings.catch_warnings():
        # laplace-torch warns about `link_approx` for classification, which only matters for its gridsearch.
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(
            method="marglik",
            pred_type="glm",
            n_steps=n_steps,
            init_prior_prec=init_prior_prec,
            prior_structure="scalar",
        )


def optimize_prior_precision_gridsearch(
    la: ParametricLaplace,
    jacobian_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    val_pairs: Sequence[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
    grid: torch.Tensor,
    all_reduce: AllReduce | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Choose the prior precision in `grid` that minimizes the held-out Bradley-Terry NLL under the probit
    approximation, p(chosen > rejected) ~ sigmoid(mu / sqrt(1 + pi/8 v)) with mu, v the GLM mean and variance of
    r(chosen) - r(rejected).

    laplace-torch's own gridsearch recomputes every Jacobian for every grid value and uses per-class variances; here
    the Jacobians of the reward differences are computed once (`jacobian_fn(batch) -> (rewards (B,), J (B, P))`), in
    batches of `batch_size` pairs or within `max_tokens` padded tokens (`pair_batches`).

    Returns:
        The NLL summed over held-out pairs for each grid value, shape `(len(grid),)`; `la.prior_precision` is set to
        the best value.
    """
    if len(val_pairs) == 0:
        raise ValueError("optimize_prior_precision='gridsearch' needs held-out pairs: the validation split is empty.")
    mus, jacs = [], []
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected in val_pairs]
    for rows in pair_batches(lengths, batch_size, max_tokens):
        batch = collate_pairs(val_pairs[rows[0] : rows[-1] + 1], pad_token_id)  # consecutive pairs
        flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask")}  # rows: c0, r0, c1, r1, ...
        diff, g = pair_differences(*jacobian_fn(flat))
        mus.append(diff)
        jacs.append(g)
    mu, jac = torch.cat(mus), torch.cat(jacs)
    nlls = []
    for prior in grid:
        la.prior_precision = float(prior)
        var = glm_variance(la, jac)
        nll = -torch.nn.functional.logsigmoid(mu / torch.sqrt(1 + math.pi / 8 * var)).sum()
        nlls.append(nll)
    nlls_t = torch.stack(nlls)
    if all_reduce is not None:
        nlls_t = all_reduce(nlls_t)
    la.prior_precision = float(grid[int(torch.argmin(nlls_t))])
    return nlls_t


def reward_jacobians(
    model: nn.Module, params: Sequence[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and their gradients with respect to `params`, one response at a time.

    Args:
        input_ids, attention_mask: `(B, L)`, right-padded.

    Returns:
        rewards `(B,)` and Jacobians `(B, P)` with P the total size of `params` (laplace-torch's parameter order).

    One forward and one backward per response, each on the response's own (unpadded) length: the cost is linear in
    the batch, whereas laplace-torch's stock GLM predictive differentiates the whole batch for every output.
    """
    rewards, rows = [], []
    with torch.enable_grad():
        for i in range(input_ids.shape[0]):
            length = int(attention_mask[i].sum())
            reward = model(input_ids=input_ids[i : i + 1, :length], attention_mask=attention_mask[i : i + 1, :length])
            reward = reward.logits.reshape(())
            grads = torch.autograd.grad(reward, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        torch.zeros_like(p).flatten() if g is None else g.flatten()
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
            rewards.append(reward.detach())
    return torch.stack(rewards), torch.stack(rows)


def glm_variance(la: ParametricLaplace, jacobians: torch.Tensor) -> torch.Tensor:
    """Linearized predictive variance J Sigma J^T of each response.

    Args:
        jacobians: `(B, P)`.

    Returns:
        `(B,)`, clamped at zero against round-off.
    """
    return la.functional_variance(jacobians.unsqueeze(1)).reshape(-1).clamp_min(0.0)


def laplace_tensors(la: ParametricLaplace) -> dict[str, torch.Tensor]:
    """The fitted posterior as flat named tensors (for safetensors): MAP `mean`, curvature `H...`, `prior_precision`
    and `loss`. For kron, the summed (not decomposed) Kronecker factors are stored, as laplace-torch's own
    `state_dict` does, so a loaded posterior can be refit or combined."""
    tensors = {
        "mean": la.mean.detach(),
        "prior_precision": torch.as_tensor(la.prior_precision).detach().reshape(-1),
        "loss": torch.as_tensor(la.loss).detach().reshape(1),
    }
    if isinstance(la, KronLaplace):
        for i, block in enumerate(la.H_facs.kfacs):
            for j, factor in enumerate(block):
                tensors[f"H.{i}.{j}"] = factor.detach()
    else:
        tensors["H"] = la.H.detach()
    return {name: t.contiguous().cpu() for name, t in tensors.items()}


def load_laplace_tensors(la: ParametricLaplace, tensors: dict[str, torch.Tensor], n_data: int) -> None:
    """Restore a posterior written by `laplace_tensors` into an unfitted `la` through laplace-torch's
    `load_state_dict` (which checks the class and the number of parameters)."""
    device, dtype = la._device, la._dtype
    if isinstance(la, KronLaplace):
        blocks: dict[int, dict[int, torch.Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith("H."):
                _, i, j = name.split(".")
                blocks.setdefault(int(i), {})[int(j)] = t.to(device, dtype)
        H: Any = [[blocks[i][j] for j in sorted(blocks[i])] for i in sorted(blocks)]
    else:
        H = tensors["H"].to(device, dtype)
    state = {
        "mean": tensors["mean"].to(device, dtype),
        "H": H,
        "loss": tensors["loss"].to(device, dtype).reshape(()),
        "prior_mean": 0.0,
        "prior_precision": tensors["prior_precision"].to(device, dtype),
        "sigma_noise": 1.0,
        "n_data": n_data,
        "n_outputs": 2,
        "likelihood": "reward_modeling",
        "temperature": 1.0,
        "enable_backprop": False,
        "cls_name": type(la).__name__,
    }
    with eigendecomposition_errors_raise():
        la.load_state_dict(state)
