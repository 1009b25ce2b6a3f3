"""`BayesianRewardTrainer`: TRL's `RewardTrainer` (MAP training of a LoRA reward model) plus the Laplace posterior fit
(`trl_bayes.posterior_fit`), its held-out evaluation and its files (`trl_bayes.hub`, `trl_bayes.model_card`).
Accelerate stays here: the posterior fit itself gets processes as an index, a count and an all-reduce."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PrinterCallback
from trl import RewardTrainer

from .distributed import gathered_model, world_size
from .hub import quiet, save_base_model, verbose
from .model_card import hub_base_model
from .posterior_fit import fit_posterior, gridsearch_datasets, gridsearch_split
from .preference_formats import check_preference_dataset, pair_ids
from .reward_config import BayesianRewardConfig
from .reward_model import BayesianRewardModel


class BayesianRewardTrainer(RewardTrainer):
    """TRL's [`~trl.RewardTrainer`] (MAP Bradley-Terry training of a LoRA reward model) plus a post-hoc Laplace
    posterior over the LoRA weights: `fit_posterior()` returns a [`BayesianRewardModel`] and `save_model()` writes the
    posterior next to the adapter.

    Args: as [`~trl.RewardTrainer`], with `args` a [`BayesianRewardConfig`]. The model must be a PEFT model or come
    with a `peft_config`. Preference data in any of TRL's four formats (standard or conversational, explicit or
    implicit prompt).

    Example:
    ```python
    >>> trainer = BayesianRewardTrainer(model, args=BayesianRewardConfig("out"), train_dataset=pairs,
    ...                                 processing_class=tokenizer, peft_config=LoraConfig(task_type="SEQ_CLS"))
    >>> trainer.train()                      # MAP training, then the posterior fit
    >>> mean, var = trainer.posterior.predict(prompts, completions)
    >>> trainer.evaluate_posterior(eval_pairs)  # held-out accuracy / NLL / ECE, for the trackers and the model card
    >>> trainer.save_model("out")            # adapter + laplace_posterior.safetensors + laplace_config.json + README.md
    >>> trainer.push_to_hub()                # the same files to `hub_model_id`
    ```
    """

    _tag_names = ["trl", "reward-trainer", "reward-model", "laplace", "trl_bayes"]
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
        tokenizer = processing_class
        if tokenizer is not None and (args.pad_token or tokenizer.pad_token or tokenizer.eos_token) is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token: set `tokenizer.pad_token = ...` or pass "
                "`BayesianRewardConfig(pad_token=...)`."
            )
        train_dataset, kwargs["eval_dataset"] = gridsearch_datasets(train_dataset, kwargs.get("eval_dataset"), args)
        kwargs.update(train_dataset=train_dataset, processing_class=processing_class, peft_config=peft_config)
        super().__init__(model, args=args, **kwargs)
        if world_size() != self.accelerator.num_processes:
            raise RuntimeError(
                f"{world_size()} processes were launched but the trainer sees {self.accelerator.num_processes}: each "
                "would train alone and overwrite the others' files. On CPU pass `use_cpu=True` (`--use_cpu true`)."
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
        """Fit the Laplace posterior at the current (MAP) adapter weights (`posterior_fit.fit_posterior`) on `dataset`,
        preference pairs in any TRL format (default: the training pairs, tokenized as in training); works without
        `train()` on a trained PEFT reward model. Each process fits its share of the pairs; all end with the posterior
        of the whole dataset, a [`BayesianRewardModel`] returned and kept as `self.posterior`. The model is left in its
        own dtype (Accelerate's mixed-precision forward wrapper removed)."""
        args, acc, start = self.args, self.accelerator, time.perf_counter()
        pairs = pair_ids(self.train_dataset) if dataset is None else self._tokenized_pairs(dataset, "posterior")
        if not pairs:
            raise ValueError("No preference pairs left for the posterior fit (all longer than `max_length`?).")
        pairs, val_pairs = gridsearch_split(pairs, self.eval_dataset, args)
        # Without Accelerate's mixed-precision forward wrapper: the curvature and the predictive in the model's own
        # dtype (float32 by default), not in the autocast dtype of training; this stays so afterwards.
        model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        # Under ZeRO-3 the fit runs on the whole model, gathered on every process (see `gathered_model` for the cost).
        with gathered_model(acc, self.model_wrapped, model):
            self.posterior = fit_posterior(
                model,
                self.processing_class,
                pairs,
                args,
                val_pairs,
                self._base_model_name,
                acc.process_index,
                acc.num_processes,
                (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None,
                acc.device,
                progress_bar=acc.is_local_main_process and not args.disable_tqdm,
            )
        log_marglik = float(self.posterior.laplace.log_marginal_likelihood().detach())
        metrics = {"prior_precision": self.posterior.prior_precision, "log_marglik": log_marglik}
        self._log_quietly({**metrics, "fit_seconds": time.perf_counter() - start}, "laplace/")
        return self.posterior

    def evaluate_posterior(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Held-out accuracy, Bradley-Terry NLL and calibration error of the MAP reward and of the Laplace predictive
        (`BayesianRewardModel.evaluate`) on `dataset`, preference pairs in any TRL format: logged as `laplace/eval_*`
        and written by `save_model` / `push_to_hub` into `laplace_config.json` and the model card. `dataset` defaults
        to `eval_dataset`, on which "gridsearch" tuned the prior precision if it did (the Laplace NLL and ECE are then
        optimistic)."""
        if self.posterior is None:
            raise ValueError("No posterior to evaluate: call `fit_posterior()` (or `train()`) first.")
        if dataset is None and not isinstance(self.eval_dataset, Dataset):
            raise ValueError("The trainer has no `eval_dataset` (a single Dataset): pass held-out preference pairs.")
        pairs = pair_ids(self.eval_dataset) if dataset is None else self._tokenized_pairs(dataset, "evaluation")
        with gathered_model(self.accelerator, self.model_wrapped, self.posterior.model):
            metrics = self.posterior.evaluate_pair_ids(pairs, self.args.per_device_eval_batch_size)
        self._log_quietly(metrics, "laplace/eval_")
        return metrics

    def _log_quietly(self, metrics: dict[str, float], prefix: str) -> None:
        """`self.log` of `metrics` (names prefixed) to the trackers and `state.log_history`, without `PrinterCallback`
        printing the dict (it does whenever tqdm is disabled), unless transformers' verbosity is INFO or more."""
        printer = None if verbose(None) else self.pop_callback(PrinterCallback)
        try:
            self.log({f"{prefix}{name}": value for name, value in metrics.items()})
        finally:
            if printer is not None:
                self.add_callback(printer)

    def _tokenized_pairs(self, dataset, name: str) -> list[tuple[list[int], list[int]]]:
        """`(chosen, rejected)` token ids of preference rows, tokenized as the training pairs (`_prepare_dataset`)."""
        check_preference_dataset(dataset, "dataset")
        with quiet(not verbose(None)):
            return pair_ids(self._prepare_dataset(dataset, self.processing_class, self.args, name))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's save (adapter, tokenizer; the upload too with `push_to_hub=True`), then the posterior, the model card
        and, for models built from a config, the base model."""
        super().save_model(output_dir, _internal_call)
        if self.posterior is not None and not _internal_call:
            self._save_posterior(output_dir or self.args.output_dir)

    def _save_posterior(self, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            self.posterior.save_posterior(output_dir)
        if self._base_model_name is None:
            # Under ZeRO-3 every process takes part in gathering the sharded base weights; the main process writes.
            with gathered_model(self.accelerator, self.model_wrapped, self.model):
                if self.accelerator.is_main_process:
                    save_base_model(self.accelerator.unwrap_model(self.model), output_dir)
        if self.accelerator.is_main_process:  # after PEFT's save, whose generic card it replaces
            self._save_card(output_dir, Path(output_dir).resolve().name)

    def _save_card(self, directory: str, model_name: str | None, dataset_name: str | None = None, tags=()) -> None:
        repo_id = self.hub_model_id or self.args.hub_model_id
        card = self.posterior.model_card(repo_id, model_name, dataset_name, [*self._tag_names, *tags])
        card.save(Path(directory) / "README.md")

    def push_to_hub(self, *args, **kwargs):
        """TRL's push of `output_dir` (adapter, tokenizer, model card), with the posterior written there first; the
        arguments of `transformers.Trainer.push_to_hub`."""
        if self.posterior is not None:
            hub_base_model(self.posterior.metadata)  # fail before uploading a model others could not load
            self._save_posterior(self.args.output_dir)
        return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """The Bayesian reward model's card (`trl_bayes.model_card`) in `output_dir`; TRL's reward-model card while
        there is no posterior yet (the MAP checkpoints)."""
        if self.posterior is None:
            return super().create_model_card(model_name, dataset_name, tags)
        if self.is_world_process_zero():
            tags = [tags] if isinstance(tags, str) else tags or []
            self._save_card(self.args.output_dir, model_name, dataset_name, tags)
