from __future__ import annotations

import os
import time
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names

from .distributed import gathered_model
from .laplace_lora import (
    PriorPrecisionMethod,
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
from .reward import FORMAT_VERSION, BayesianRewardModel, save_base_model
from .reward_config import BayesianRewardConfig


def check_preference_dataset(dataset: Any, name: str) -> None:
    """Fail fast, naming the problem, on datasets `RewardTrainer` would reject late or obscurely."""
    if dataset is None:
        raise ValueError(
            f"`{name}` is required: a dataset of preference pairs (`chosen`/`rejected`, optional `prompt`)."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: it needs at least one preference pair.")
    columns = set(get_dataset_column_names(dataset))
    if {"chosen_ids", "rejected_ids"} <= columns:
        return
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise ValueError(
            f"`{name}` lacks column(s) {missing}; it has {sorted(columns)}. A preference dataset needs `chosen` and "
            "`rejected` (plus an optional `prompt`), or tokenized `chosen_ids` and `rejected_ids`."
        )


class BayesianRewardTrainer(RewardTrainer):
    """TRL's [`~trl.RewardTrainer`] (MAP Bradley-Terry training of a LoRA reward model) plus a post-hoc Laplace
    posterior over the LoRA weights: `fit_posterior()` returns a [`BayesianRewardModel`] and `save_model()` writes the
    posterior next to the adapter.

    Args: as [`~trl.RewardTrainer`], with `args` a [`BayesianRewardConfig`]. The model must be a PEFT model or come
    with a `peft_config`.

    Example:
    ```python
    >>> trainer = BayesianRewardTrainer(model, args=BayesianRewardConfig("out"), train_dataset=pairs,
    ...                                 processing_class=tokenizer, peft_config=LoraConfig(task_type="SEQ_CLS"))
    >>> trainer.train()                      # MAP training, then the posterior fit
    >>> mean, var = trainer.posterior.predict(prompts, completions)
    >>> trainer.save_model("out")            # adapter + laplace_posterior.safetensors + laplace_config.json
    ```
    """

    _tag_names = ["trl", "reward-trainer", "trl-bayes", "laplace"]
    _name = "BayesianReward"

    def __init__(
        self,
        model,
        args: BayesianRewardConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = BayesianRewardConfig("bayesian-reward-model")
        elif not isinstance(args, BayesianRewardConfig):
            raise TypeError(f"`args` must be a BayesianRewardConfig, got {type(args).__name__}.")
        check_preference_dataset(train_dataset, "train_dataset")
        if peft_config is None and not is_peft_model(model):
            raise ValueError(
                "BayesianRewardTrainer fits a Laplace posterior over LoRA weights, but the model has no adapter: pass "
                "`peft_config=LoraConfig(task_type='SEQ_CLS', ...)` or a `PeftModel`."
            )
        if (
            processing_class is not None
            and (args.pad_token or processing_class.pad_token or processing_class.eos_token) is None
        ):
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token: set `tokenizer.pad_token = ...` or pass "
                "`BayesianRewardConfig(pad_token=...)`."
            )
        if (
            args.optimize_prior_precision == PriorPrecisionMethod.GRIDSEARCH
            and kwargs.get("eval_dataset") is None
            and isinstance(train_dataset, Dataset)
        ):
            # The grid search must score pairs the MAP never saw: hold them out of training, not only of the fit
            # (pairs the model was trained on look better calibrated than new ones and push the prior the wrong way).
            kept, held_out = split_validation_pairs(
                list(range(len(train_dataset))), args.posterior_val_fraction, args.seed
            )
            kwargs["eval_dataset"] = train_dataset.select(held_out)
            train_dataset = train_dataset.select(kept)
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise RuntimeError(
                f"{launched} processes were launched but the trainer sees {self.accelerator.num_processes}: each would "
                "train alone and overwrite the others' files. On CPU pass `use_cpu=True` (`--use_cpu true`)."
            )
        # A model built from a config has no Hub name or path to reload its base from: save_model writes it.
        self._base_model_name = self.accelerator.unwrap_model(self.model).get_base_model().config._name_or_path or None
        self.posterior: BayesianRewardModel | None = None

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.fit_posterior_after_train:
            self.fit_posterior()
        return output

    def fit_posterior(self, dataset: Dataset | None = None) -> BayesianRewardModel:
        """Fit the Laplace posterior at the current (MAP) adapter weights; works without `train()` on a trained PEFT
        reward model. Leaves the model in its own dtype (Accelerate's mixed-precision forward wrapper removed).

        Each process fits its share of the pairs and the curvature is summed over processes, so every process ends
        with the posterior of the whole dataset. The prior precision is then chosen per `optimize_prior_precision`.

        Args:
            dataset: preference pairs to fit on; defaults to the training pairs (tokenized as in training).

        Returns:
            The [`BayesianRewardModel`], also kept as `self.posterior`.
        """
        args, start = self.args, time.perf_counter()
        if dataset is None:
            dataset = self.train_dataset
        else:
            check_preference_dataset(dataset, "dataset")
            dataset = self._prepare_dataset(dataset, self.processing_class, args, "posterior")
        pairs = list(zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
        if not pairs:
            raise ValueError("No preference pairs left for the posterior fit (all longer than `max_length`?).")
        val_pairs: list = []
        if args.optimize_prior_precision == PriorPrecisionMethod.GRIDSEARCH:
            pairs, val_pairs = self._gridsearch_split(pairs)

        # Without Accelerate's mixed-precision forward wrapper: the curvature and the predictive are computed in the
        # model's own dtype (float32 by default), not in the autocast dtype of training. This stays so afterwards.
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        check_laplace_dtype(model)
        model.set_attn_implementation("eager")  # curvature backends need double-differentiable attention
        acc = self.accelerator
        all_reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
        pad_token_id = self.processing_class.pad_token_id
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        # Under ZeRO-3 the weights are sharded: the fit runs on the whole model, gathered on every process (see
        # `gathered_model` for what that costs); each process still fits its own share of the pairs. A no-op otherwise.
        with gathered_model(acc, self.model_wrapped, model):
            embeddings_hooks = pop_input_require_grads_hooks(model)
            try:  # the model's trainable flags and hooks come back whatever happens
                names = select_laplace_parameters(model, args.subset_of_weights)
                shapes = [list(p.shape) for n, p in model.named_parameters() if n in names]  # whole, even under ZeRO-3
                la = make_laplace(
                    RewardPairModel(model),
                    args.hessian_structure,
                    args.prior_precision,
                    args.kfac_approx,
                    args.curvature,
                )
                fit_laplace(
                    la,
                    pairs,
                    pad_token_id,
                    args.posterior_batch_size,
                    acc.process_index,
                    acc.num_processes,
                    all_reduce,
                    progress_bar=acc.is_local_main_process and not args.disable_tqdm,
                    device=acc.device,
                    laplace_backend=args.laplace_backend,
                )
                self._choose_prior_precision(la, model, val_pairs, pad_token_id, all_reduce)
            finally:
                for name, p in model.named_parameters():
                    p.requires_grad_(requires_grad[name])
                model.train(self.model.training)
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
            "base_model": self._base_model_name,
            "parameters": [{"name": n, "shape": shape} for n, shape in zip(names, shapes, strict=True)],
        }
        self.posterior = BayesianRewardModel(model, self.processing_class, la, metadata)
        log_marglik = float(la.log_marginal_likelihood().detach())
        self.log(
            {
                "laplace/prior_precision": self.posterior.prior_precision,
                "laplace/log_marglik": log_marglik,
                "laplace/fit_seconds": time.perf_counter() - start,
            }
        )
        return self.posterior

    def _choose_prior_precision(self, la, model, val_pairs: list, pad_token_id: int, all_reduce) -> None:
        """Set `la.prior_precision` per `optimize_prior_precision`: the marginal likelihood, or the grid value with the
        lowest NLL on `val_pairs` (each process scores its share); `None` keeps the configured value."""
        args, acc = self.args, self.accelerator
        if args.optimize_prior_precision == PriorPrecisionMethod.MARGLIK:
            optimize_prior_precision_marglik(la, args.prior_precision, args.prior_precision_steps)
        elif args.optimize_prior_precision == PriorPrecisionMethod.GRIDSEARCH:
            model.eval()

            def jacobian_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                input_ids, attention_mask = (batch[k].to(acc.device) for k in ("input_ids", "attention_mask"))
                if args.laplace_backend:
                    return reward_jacobians(model, la.params, input_ids, attention_mask)
                return batch_jacobians(model, la.params, laplace_layers(model, la.params), input_ids, attention_mask)

            optimize_prior_precision_gridsearch(
                la,
                jacobian_fn,
                val_pairs[acc.process_index :: acc.num_processes],
                pad_token_id,
                args.posterior_batch_size,
                torch.tensor(args.prior_precision_grid, dtype=torch.float64),
                all_reduce,
            )

    def _gridsearch_split(self, pairs: list) -> tuple[list, list]:
        """Held-out pairs for the prior grid search: `eval_dataset` (given, or held out of `train_dataset` before
        training), else a seeded fraction of `pairs` (an iterable training set, or an explicit `fit_posterior` set)."""
        if isinstance(self.eval_dataset, dict):
            raise ValueError(
                "optimize_prior_precision='gridsearch' needs one held-out set, but `eval_dataset` is a dict of "
                f"{sorted(self.eval_dataset)}: pass a single Dataset, or none to hold out `posterior_val_fraction`."
            )
        if isinstance(self.eval_dataset, Dataset) and len(self.eval_dataset) > 0:
            return pairs, list(zip(self.eval_dataset["chosen_ids"], self.eval_dataset["rejected_ids"], strict=True))
        return split_validation_pairs(pairs, self.args.posterior_val_fraction, self.args.seed)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's save (adapter, tokenizer), then the posterior and, for models built from a config, the base model."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.posterior is None or _internal_call:
            return
        if self.accelerator.is_main_process:
            self.posterior.save_posterior(output_dir)
        if self._base_model_name is None:
            # Under ZeRO-3 every process takes part in gathering the sharded base weights; the main process writes.
            with gathered_model(self.accelerator, self.model_wrapped, self.model):
                if self.accelerator.is_main_process:
                    save_base_model(self.accelerator.unwrap_model(self.model), output_dir)
