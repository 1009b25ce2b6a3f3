"""The posterior fit between tokenized preference pairs and a `BayesianRewardModel`: the Laplace weights selected, the
curvature fitted on this process's share of the pairs, the prior precision chosen (`optimize_prior_precision`, with
the held-out pairs of "gridsearch"), and the settings recorded for `laplace_config.json`.

Plain functions of a model, the pairs and a `BayesianRewardConfig`: processes come in as `process_index`,
`num_processes` and an `all_reduce` callable, so nothing here touches Accelerate (`BayesianRewardTrainer.fit_posterior`
does, at the edge, and gathers ZeRO-3 weights around the call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from laplace.baselaplace import ParametricLaplace
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .enums import PriorPrecisionMethod
from .hub import FORMAT_VERSION
from .laplace_lora import (
    AllReduce,
    RewardPairModel,
    check_laplace_dtype,
    fit_laplace,
    make_laplace,
    optimize_prior_precision_gridsearch,
    optimize_prior_precision_marglik,
    pop_input_require_grads_hooks,
    reward_jacobians,
    select_laplace_parameters,
    split_validation_pairs,
)
from .per_sample import batch_jacobians, laplace_layers
from .preference_formats import pair_ids
from .reward_config import BayesianRewardConfig
from .reward_model import BayesianRewardModel

Pairs = Sequence[tuple[list[int], list[int]]]
"""`(chosen, rejected)` token ids, as `RewardTrainer` tokenizes them (`chosen_ids`, `rejected_ids`)."""


def gridsearch_datasets(train_dataset: Any, eval_dataset: Any, args: BayesianRewardConfig) -> tuple[Any, Any]:
    """The training and evaluation sets to give `RewardTrainer`: with `optimize_prior_precision="gridsearch"`, no
    `eval_dataset` and a `train_dataset` Dataset, a seeded `posterior_val_fraction` of the training rows is held out as
    the evaluation set; otherwise both come back unchanged.

    The grid search must score pairs the MAP never saw: they are held out of training, not only of the fit (pairs the
    model was trained on look better calibrated than new ones and push the prior the wrong way).
    """
    gridsearch = args.optimize_prior_precision == PriorPrecisionMethod.GRIDSEARCH
    if not gridsearch or eval_dataset is not None or not isinstance(train_dataset, Dataset):
        return train_dataset, eval_dataset
    kept, held_out = split_validation_pairs(list(range(len(train_dataset))), args.posterior_val_fraction, args.seed)
    return train_dataset.select(kept), train_dataset.select(held_out)


def gridsearch_split(pairs: list, eval_dataset: Any, args: BayesianRewardConfig) -> tuple[list, list]:
    """The pairs to fit on and the held-out pairs of the prior grid search (none unless `optimize_prior_precision` is
    "gridsearch"): all of `pairs` and the pairs of `eval_dataset` (a tokenized Dataset, e.g. the rows
    `gridsearch_datasets` held out of training), else a seeded `posterior_val_fraction` of `pairs` held out (an
    iterable training set, or an explicit set of pairs to fit on).

    Raises:
        ValueError: `eval_dataset` is a dict of several sets.
    """
    if args.optimize_prior_precision != PriorPrecisionMethod.GRIDSEARCH:
        return pairs, []
    if isinstance(eval_dataset, dict):
        raise ValueError(
            "optimize_prior_precision='gridsearch' needs one held-out set, but `eval_dataset` is a dict of "
            f"{sorted(eval_dataset)}: pass a single Dataset, or none to hold out `posterior_val_fraction`."
        )
    if isinstance(eval_dataset, Dataset) and len(eval_dataset) > 0:
        return pairs, pair_ids(eval_dataset)
    return split_validation_pairs(pairs, args.posterior_val_fraction, args.seed)


def fit_posterior(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    args: BayesianRewardConfig,
    val_pairs: Pairs = (),
    base_model: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    all_reduce: AllReduce | None = None,
    device: torch.device | str = "cpu",
    progress_bar: bool = False,
) -> BayesianRewardModel:
    """Fit the Laplace posterior of `model` (a PEFT reward model at its MAP weights) on `pairs`.

    Each process fits its share of the pairs (`process_index` of `num_processes`) and `all_reduce` sums the curvature,
    so that every process ends with the posterior of all the pairs. Attention switches to eager (the curvature needs
    double-differentiable attention) and stays so; the trainable flags, the train/eval mode and the input embeddings'
    require-grads hooks come back whatever happens.

    Args:
        args: the Laplace fields (`hessian_structure`, `subset_of_weights`, `prior_precision`, ...).
        val_pairs: held-out pairs for `optimize_prior_precision="gridsearch"` (`gridsearch_split`); each process scores
            its share.
        base_model: the base model's Hub name or path, recorded for `from_pretrained`; `None` for one built from a
            config (`save_pretrained` then writes it).
    """
    check_laplace_dtype(model)
    model.set_attn_implementation("eager")  # curvature backends need double-differentiable attention
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    embeddings_hooks = pop_input_require_grads_hooks(model)
    try:
        names = select_laplace_parameters(model, args.subset_of_weights)
        shapes = [list(p.shape) for n, p in model.named_parameters() if n in names]  # whole, even under ZeRO-3
        la = make_laplace(
            RewardPairModel(model), args.hessian_structure, args.prior_precision, args.kfac_approx, args.curvature
        )
        fit_laplace(
            la,
            pairs,
            tokenizer.pad_token_id,
            args.posterior_batch_size,
            process_index,
            num_processes,
            all_reduce,
            progress_bar=progress_bar,
            device=device,
            laplace_backend=args.laplace_backend,
            max_tokens=args.posterior_max_tokens,
        )
        val_share = val_pairs[process_index::num_processes]
        choose_prior_precision(la, model, args, val_share, tokenizer.pad_token_id, all_reduce, device)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
        model.get_input_embeddings()._forward_hooks.update(embeddings_hooks)
    metadata = {
        "format_version": FORMAT_VERSION,
        "likelihood": "reward_modeling",
        "hessian_structure": args.hessian_structure,
        "subset_of_weights": args.subset_of_weights,
        "kfac_approx": args.kfac_approx,
        "curvature": args.curvature,
        "optimize_prior_precision": args.optimize_prior_precision,
        "n_data": int(la.n_data),
        "n_params": int(la.n_params),
        "base_model": base_model,
        "parameters": [{"name": n, "shape": shape} for n, shape in zip(names, shapes, strict=True)],
    }
    return BayesianRewardModel(model, tokenizer, la, metadata)


def choose_prior_precision(
    la: ParametricLaplace,
    model: PeftModel,
    args: BayesianRewardConfig,
    val_pairs: Pairs,
    pad_token_id: int,
    all_reduce: AllReduce | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Set `la.prior_precision` per `args.optimize_prior_precision`: the marginal likelihood, or the grid value with
    the lowest NLL on `val_pairs` (this process's share; `all_reduce` sums the NLLs); `None` keeps the configured
    value."""
    if args.optimize_prior_precision == PriorPrecisionMethod.MARGLIK:
        optimize_prior_precision_marglik(la, args.prior_precision, args.prior_precision_steps)
    elif args.optimize_prior_precision == PriorPrecisionMethod.GRIDSEARCH:
        model.eval()

        def jacobian_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            input_ids, attention_mask = (batch[k].to(device) for k in ("input_ids", "attention_mask"))
            if args.laplace_backend:
                return reward_jacobians(model, la.params, input_ids, attention_mask)
            return batch_jacobians(model, la.params, laplace_layers(model, la.params), input_ids, attention_mask)

        optimize_prior_precision_gridsearch(
            la,
            jacobian_fn,
            val_pairs,
            pad_token_id,
            args.posterior_batch_size,
            torch.tensor(args.prior_precision_grid, dtype=torch.float64),
            all_reduce,
            max_tokens=args.posterior_max_tokens,
        )
