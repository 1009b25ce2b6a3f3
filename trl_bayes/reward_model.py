"""`BayesianRewardModel`: a LoRA reward model with a Laplace posterior over its adapter, so that every reward is a
Gaussian N(mean, var); its predictions (marginal, pairs, relative), its evaluation on held-out pairs, its files
(`save_pretrained` / `from_pretrained`: adapter, tokenizer, posterior as safetensors + JSON, a model card, and the base
model when it has no Hub name) and its Hub repository (`push_to_hub`, `from_pretrained("org/name", revision=...)`).
The files and the Hub are `trl_bayes.hub`'s; preference rows in TRL's formats are `trl_bayes.preference_formats`'.

`PenalizedReward` (`trl_bayes.penalties`) turns one or several of these models into a TRL reward function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, ModelCard
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .batching import DEFAULT_MAX_TOKENS, scoring_batches
from .diagnostics import pair_metrics
from .generation import eval_mode, pad_token_ids, tokenize_responses

# The folder's files and quiet loading live in `hub`, the preference formats in `preference_formats`; their names stay
# importable from here.
from .hub import (  # noqa: F401
    BASE_MODEL_DIR,
    FORMAT_VERSION,
    POSTERIOR_CONFIG_NAME,
    POSTERIOR_WEIGHTS_NAME,
    base_model_state_dict,
    load_posterior,
    load_reward_model,
    local_folder,
    push_folder,
    quiet,
    read_posterior_config,
    save_base_model,
    save_posterior,
    verbose,
)
from .laplace_lora import glm_variance, pair_differences, reward_jacobians, without_input_require_grads_hooks
from .model_card import hub_base_model, model_card
from .per_sample import LaplaceLayer, glm_predictive, laplace_layers
from .preference_formats import PREFERENCE_FORMATS, preference_format, preference_pairs  # noqa: F401
from .relative_variance import prompt_key, reference_gradient_means, relative_predict_ids


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module):
    """Inside the block: the model in eval mode (no dropout) and without the input embeddings' require-grads hooks (no
    backward below the first Laplace layer); both restored after, even on error."""
    with eval_mode(model), without_input_require_grads_hooks(model):
        yield


class BayesianRewardModel:
    """A LoRA reward model with a Laplace posterior over its adapter: every reward is N(mean, var).

    `mean` is the MAP reward, `var` the linearized (GLM) predictive variance J Σ J^T, with J the gradient of the reward
    with respect to the Laplace weights and Σ the posterior covariance. Each batch takes one forward and one backward:
    the per-sample gradients of the LoRA layers are projected onto Σ layer by layer as the backward reaches them
    (`per_sample.glm_predictive`). `laplace_backend=True` on the predict methods gives the reference path instead: one
    forward and backward per response, then laplace-torch's `functional_variance`.

    Args:
        model ([`~peft.PeftModel`]): the reward model (sequence classification, one label).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the tokenizer the reward model was trained with.
        laplace: the fitted laplace-torch posterior, built over `RewardPairModel(model)`.
        metadata (`dict`): what `save_pretrained` writes to `laplace_config.json`.
    """

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, laplace, metadata: dict[str, Any]):
        self.model = model
        self.tokenizer = tokenizer
        self.laplace = laplace
        self.metadata = metadata
        self.params = list(laplace.params)
        # Mean reward gradients of reference completions per prompt key (`predict_relative(reference=...)`).
        self.reference_cache: dict[str, dict[int, torch.Tensor]] = {}

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def hessian_structure(self) -> str:
        return self.metadata["hessian_structure"]

    @property
    def prior_precision(self) -> float:
        return float(torch.as_tensor(self.laplace.prior_precision).reshape(-1)[0])

    @property
    def n_params(self) -> int:
        return self.laplace.n_params

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def layers(self) -> list[LaplaceLayer]:
        """The linear layers that carry the Laplace weights (found once, on the first fast prediction)."""
        return laplace_layers(self.model, self.params)

    def _predict_batch(
        self, token_ids: Sequence[list[int]], pairs: bool, laplace_backend: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of one batch of responses, or of the differences of interleaved pairs."""
        input_ids, attention_mask = pad_token_ids(token_ids, self.tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if not laplace_backend:
            mean, var = glm_predictive(self.laplace, self.model, self.layers, input_ids, attention_mask, pairs)
            return mean.cpu(), var.detach().cpu()
        rewards, jac = reward_jacobians(self.model, self.params, input_ids, attention_mask)
        if pairs:
            rewards, jac = pair_differences(rewards, jac)
        return rewards.detach().cpu(), glm_variance(self.laplace, jac).detach().cpu()

    # -- prediction ----------------------------------------------------------------------------------------------
    def predict(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        batch_size: int | None = None,
        return_var: bool = True,
        progress_bar: bool = False,
        laplace_backend: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gaussian rewards of `completions` to `prompts`.

        Args:
            prompts, completions: strings, or lists of chat messages (conversational), one each per response.
            batch_size: responses per forward (and backward) pass; memory grows linearly with it. `None` (the
                default): batches of up to `max_tokens` padded tokens (`batching.scoring_batches`).
            return_var: `False` skips the backward and returns `(mean, None)` (the MAP reward only).
            progress_bar: show a tqdm bar over batches (for long scoring jobs).
            laplace_backend: compute the variance on the reference path (per-response Jacobians, laplace-torch's
                `functional_variance`); slower, same result.
            max_tokens: padded tokens (responses x longest response) per batch when `batch_size` is `None`; a longer
                response is scored alone. Batches keep the input order; another batching changes only round-off.

        Returns:
            `mean` and `var`, float tensors of shape `(B,)` on the CPU.
        """
        ids = tokenize_responses(self.tokenizer, prompts, completions)  # refuses unequal lengths
        return self.predict_ids(
            ids,
            batch_size=batch_size,
            return_var=return_var,
            progress_bar=progress_bar,
            laplace_backend=laplace_backend,
            max_tokens=max_tokens,
        )

    def predict_ids(
        self,
        token_ids: Sequence[list[int]],
        batch_size: int | None = None,
        return_var: bool = True,
        progress_bar: bool = False,
        laplace_backend: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like `predict`, from token ids already tokenized with `tokenize_response`."""
        if len(token_ids) == 0:
            empty = torch.zeros(0)
            return empty, (empty if return_var else None)
        means, variances = [], []
        with scoring_mode(self.model):
            batches = scoring_batches([len(ids) for ids in token_ids], batch_size, max_tokens)
            for rows in tqdm(batches, desc="Scoring (mean, var)", disable=not progress_bar):
                batch = token_ids[rows[0] : rows[-1] + 1]  # consecutive rows
                if return_var:
                    mean, var = self._predict_batch(batch, pairs=False, laplace_backend=laplace_backend)
                    variances.append(var)
                else:
                    input_ids, attention_mask = (
                        t.to(self.device) for t in pad_token_ids(batch, self.tokenizer.pad_token_id)
                    )
                    with torch.no_grad():
                        mean = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.reshape(-1).cpu()
                means.append(mean)
        return torch.cat(means), (torch.cat(variances) if return_var else None)

    def predict_pairs(
        self,
        prompts: Sequence[Any],
        chosen: Sequence[Any],
        rejected: Sequence[Any],
        batch_size: int | None = None,
        progress_bar: bool = False,
        laplace_backend: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian reward differences r(chosen) - r(rejected) of preference pairs, with their exact covariance.

        The variance is (J_c - J_r) Σ (J_c - J_r)^T: chosen and rejected share the weights (and the prompt), so it is
        not var_c + var_r. Bradley-Terry predictive: p(chosen > rejected) ~ sigmoid(mean / sqrt(1 + pi/8 var)).
        Rows of any TRL preference format: `predict_pairs(*preference_pairs(dataset))`.

        Args:
            batch_size: pairs per forward-backward pass (2 x `batch_size` responses); `None` (the default): batches of
                whole pairs within `max_tokens` padded tokens (both responses of a pair count).

        Returns:
            `mean` and `var` of the differences, float tensors of shape `(B,)` on the CPU.
        """
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"Got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected.")
        chosen_ids = tokenize_responses(self.tokenizer, prompts, chosen)
        pairs = list(zip(chosen_ids, tokenize_responses(self.tokenizer, prompts, rejected), strict=True))
        return self.predict_pair_ids(pairs, batch_size, progress_bar, laplace_backend, max_tokens)

    def predict_pair_ids(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        batch_size: int | None = None,
        progress_bar: bool = False,
        laplace_backend: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `predict_pairs`, from `(chosen, rejected)` token ids: `tokenize_response`'s, or the `chosen_ids` /
        `rejected_ids` of a dataset tokenized by `RewardTrainer`."""
        # Interleaved (chosen_0, rejected_0, chosen_1, ...), the layout `pair_differences` reads.
        ids = [ids for pair in pairs for ids in pair]
        # A pair's two rows pad to its longer response: a budget of max_tokens // 2 per pair row.
        lengths = [max(len(chosen), len(rejected)) for chosen, rejected in pairs]
        batches = scoring_batches(lengths, batch_size, max(1, max_tokens // 2))
        means, variances = [], []
        with scoring_mode(self.model):
            for rows in tqdm(batches, desc="Scoring pairs", disable=not progress_bar):
                mean, var = self._predict_batch(ids[2 * rows[0] : 2 * rows[-1] + 2], True, laplace_backend)
                means.append(mean)
                variances.append(var)
        if not means:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(means), torch.cat(variances)

    def predict_relative(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        batch_size: int | None = None,
        weights: Sequence[float] | torch.Tensor | None = None,
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
        progress_bar: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussian rewards with their relative variance: Var(r_i - mean_j r_j), j over the completions of the same
        prompt (see `trl_bayes.relative_variance`). The prompt's unidentified reward offset cancels.

        Args:
            prompts, completions: one each per response; responses to an equal prompt form a group. For preference
                rows with an implicit prompt, the prompts `preference_pairs` extracts (TRL's `extract_prompt`).
            batch_size: responses per forward-backward pass; `None` (the default): batches of up to `max_tokens`
                padded tokens, as `predict`.
            weights: per response, its weight in its group's mean (e.g. how often a deduplicated sample was drawn);
                `None` = 1 each.
            reference: the group's mean is taken over a reference set instead of the scored completions: per prompt
                (a mapping from `prompt_key(prompt)`, or a callable of the prompt), completions such as K samples of
                the reference policy. Needed when a prompt comes with a single completion (PPO).
            progress_bar: a tqdm bar over blocks of prompts.
            max_tokens: padded tokens per batch when `batch_size` is `None`.

        Returns:
            `mean`, `var` (marginal) and `relative_var`, float tensors of shape `(B,)` on the CPU.
        """
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(completions)} completions: pass one prompt per completion."
            )
        keys = [prompt_key(p) for p in prompts]
        ids = tokenize_responses(self.tokenizer, prompts, completions)
        with scoring_mode(self.model):
            reference_means = None
            if reference is not None:
                reference_means = self.reference_gradient_means(
                    {key: p for key, p in zip(keys, prompts, strict=True)}, reference, batch_size, max_tokens
                )
            return relative_predict_ids(
                self, ids, keys, weights, reference_means, batch_size, progress_bar, max_tokens=max_tokens
            )

    def reference_gradient_means(
        self,
        prompts: Mapping[str, Any],
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]],
        batch_size: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Per prompt key, the mean reward gradient of the prompt's reference completions (P floats per prompt), the
        J_mean of `predict_relative(..., reference=...)`. Keys already in `self.reference_cache` are not recomputed.

        Args:
            prompts: `prompt_key(prompt) -> prompt` of the prompts needed.
            reference: completions per prompt key (a mapping) or per prompt (a callable).
            batch_size, max_tokens: the batching, as `predict`.
        """
        todo = {}
        for key, prompt in prompts.items():
            if key in self.reference_cache:
                continue
            if callable(reference):
                completions = reference(prompt)
            elif key in reference:
                completions = reference[key]
            else:
                raise ValueError(f"`reference` has no completions for the prompt {key[:60]!r}.")
            todo[key] = tokenize_responses(self.tokenizer, [prompt] * len(completions), completions)
        if todo:
            with scoring_mode(self.model):
                self.reference_cache.update(reference_gradient_means(self, todo, batch_size, max_tokens))
        return {key: self.reference_cache[key] for key in prompts}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(
        self,
        prompts: Sequence[Any],
        chosen: Sequence[Any],
        rejected: Sequence[Any],
        batch_size: int | None = None,
        progress_bar: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> dict[str, float]:
        """Held-out accuracy, Bradley-Terry NLL and expected calibration error of the MAP reward and of the Laplace
        predictive on preference pairs (`diagnostics.pair_metrics`, plus `num_pairs`). Kept in
        `metadata["eval_metrics"]`: `laplace_config.json` and the model card report them. Batches as
        `predict_pairs` (`None`: whole pairs within the `max_tokens` budget).

        Rows of any TRL preference format: `model.evaluate(*preference_pairs(dataset))`.
        """
        chosen_ids = tokenize_responses(self.tokenizer, prompts, chosen)
        pairs = list(zip(chosen_ids, tokenize_responses(self.tokenizer, prompts, rejected), strict=True))
        return self.evaluate_pair_ids(pairs, batch_size, progress_bar, max_tokens)

    def evaluate_pair_ids(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        batch_size: int | None = None,
        progress_bar: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> dict[str, float]:
        """Like `evaluate`, from `(chosen, rejected)` token ids (as `predict_pair_ids`)."""
        if len(pairs) == 0:
            raise ValueError("No preference pairs to evaluate on.")
        mean, var = self.predict_pair_ids(pairs, batch_size, progress_bar, max_tokens=max_tokens)
        metrics = {**pair_metrics(mean, var), "num_pairs": len(pairs)}
        self.metadata["eval_metrics"] = metrics
        return metrics

    # -- files and the Hub ---------------------------------------------------------------------------------------
    def posterior_config(self) -> dict[str, Any]:
        """What `laplace_config.json` holds: the fit's settings and parameters (`metadata`, with `eval_metrics` once
        evaluated), the prior precision and the loss."""
        config = dict(self.metadata)
        config["prior_precision"] = torch.as_tensor(self.laplace.prior_precision).reshape(-1).tolist()
        config["loss"] = float(torch.as_tensor(self.laplace.loss))
        return config

    def save_posterior(self, directory: str | Path) -> None:
        """Write the posterior next to an adapter: tensors to safetensors, metadata to JSON (never pickle)."""
        save_posterior(self.laplace, self.posterior_config(), directory)

    def model_card(
        self,
        repo_id: str | None = None,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: Sequence[str] = (),
    ) -> ModelCard:
        """This model's card (`trl_bayes.model_card.model_card`), the README.md that `save_pretrained` and
        `push_to_hub` write."""
        return model_card(self.posterior_config(), repo_id, model_name, dataset_name, tags)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write adapter, tokenizer, posterior and model card (README.md), and the base model too when it has no Hub
        name or path."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if not self.metadata.get("base_model"):
            save_base_model(self.model, directory)
        self.save_posterior(directory)
        self.model_card(model_name=directory.resolve().name).save(directory / "README.md")  # in place of PEFT's card

    def push_to_hub(
        self,
        repo_id: str,
        dataset_name: str | None = None,
        tags: Sequence[str] = (),
        commit_message: str = "Upload Bayesian reward model",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> CommitInfo:
        """Upload the model to the Hub repository `repo_id` (created if needed): what `save_pretrained` writes, i.e.
        adapter, tokenizer, `laplace_posterior.safetensors`, `laplace_config.json`, the base model when it has no Hub
        name, and a model card naming the repository.

        Args:
            repo_id: `org/name`.
            dataset_name: the Hub id of the preference data, for the card. tags: more tags for the card.
            commit_message, private, token, revision, create_pr: as `huggingface_hub.HfApi.upload_folder`.

        Returns:
            The commit (`huggingface_hub.CommitInfo`); reload with `BayesianRewardModel.from_pretrained(repo_id)`.

        Raises:
            ValueError: the base model is a local folder, which others could not load.
        """
        hub_base_model(self.metadata)

        def write(folder: Path, full_id: str) -> None:
            self.save_pretrained(folder)
            self.model_card(full_id, dataset_name=dataset_name, tags=tags).save(folder / "README.md")

        return push_folder(repo_id, write, commit_message, private, token, revision, create_pr)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        base_model: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        progress_bar: bool | None = None,
    ) -> BayesianRewardModel:
        """Load adapter + posterior written by `BayesianRewardTrainer.save_model`, `save_pretrained` or `push_to_hub`.

        Args:
            pretrained_model_name_or_path: a folder with `adapter_config.json` and `laplace_config.json`, or the id
                of a Hub repository holding them (`org/name`), fetched with `huggingface_hub.snapshot_download`: from
                the local cache when it is there, and only from it with `HF_HUB_OFFLINE=1` or `local_files_only`.
            base_model: override the base model (Hub name or path); by default `base_model/` next to the adapter if
                present, else the base model recorded at fit time.
            torch_dtype: dtype to load the model in: float32 (the default, whatever the checkpoint's dtype) or float64;
                the posterior algebra needs one of them.
            device: where to put the model.
            revision: branch, tag or commit of a Hub repository.
            cache_dir, token, local_files_only: as `huggingface_hub.snapshot_download` (also used for a base model
                named by its Hub id).
            progress_bar: show download and loading progress bars and transformers' load report; `None` (the
                default) shows them only at transformers' INFO verbosity or more.

        Raises:
            FileNotFoundError: no posterior (or no adapter) in the folder, or neither a folder nor a Hub id.
            ValueError: the posterior does not match the adapter (other weights, shapes or values).
        """
        name = pretrained_model_name_or_path
        hub_kwargs = {
            "revision": revision,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
        }
        with quiet(not verbose(progress_bar)):
            directory = local_folder(name, **hub_kwargs)
            metadata = read_posterior_config(directory, name)
            if base_model is None:
                local_base = directory / BASE_MODEL_DIR
                base_model = str(local_base) if local_base.is_dir() else metadata.get("base_model")
            if not base_model:
                raise ValueError(f"{name} names no base model and has no '{BASE_MODEL_DIR}/': pass `base_model=`.")
            tokenizer = AutoTokenizer.from_pretrained(directory)
            model = load_reward_model(directory, base_model, torch_dtype, device, tokenizer.pad_token_id, hub_kwargs)
            return cls(model, tokenizer, load_posterior(model, metadata, directory), metadata)
