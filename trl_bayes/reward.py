"""Bayesian reward models at inference: `BayesianRewardModel` gives each (prompt, completion) a Gaussian reward
N(mean, var); `PenalizedReward` turns one or several of them into a TRL reward function.

Penalties (Yang et al. 2024, arXiv 2402.13210): `std` = mean - k sqrt(var), `var` = mean - k var.
Ensembles of Laplace reward models ("LA Ens") combine as the mean of independent Gaussians:
mean = (1/M) sum mean_i, var = (1/M^2) sum var_i. MAP-ensemble baselines (Coste et al., ICLR 2024,
arXiv 2310.02743): `wco` = min over members, `uwo` = mean - k * (population variance of the members' means).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from trl.data_utils import _tokenize

from .distributed import whole_weights
from .laplace_lora import (
    RewardPairModel,
    glm_variance,
    laplace_tensors,
    load_laplace_tensors,
    make_laplace,
    pair_differences,
    reward_jacobians,
    select_laplace_parameters,
    without_input_require_grads_hooks,
)
from .per_sample import LaplaceLayer, glm_predictive, laplace_layers
from .relative_variance import prompt_key, reference_gradient_means, relative_predict_ids

POSTERIOR_WEIGHTS_NAME = "laplace_posterior.safetensors"
POSTERIOR_CONFIG_NAME = "laplace_config.json"
BASE_MODEL_DIR = "base_model"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization: exactly as TRL's RewardTrainer tokenizes training pairs.


def tokenize_response(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> list[int]:
    """Token ids of one (prompt, completion) as `trl.RewardTrainer` tokenizes a `prompt`/`chosen` pair.

    Plain text: `prompt + completion`, with EOS appended to the completion unless it already ends with it.
    Conversational (lists of messages): the tokenizer's chat template over `prompt + completion`.
    """
    if isinstance(completion, list):
        messages = (prompt if isinstance(prompt, list) else []) + completion
        return list(_tokenize(tokenizer, messages)["input_ids"])
    if not isinstance(completion, str) or not isinstance(prompt, str):
        raise TypeError(
            f"prompts and completions must be strings or lists of messages, got {type(prompt).__name__} and "
            f"{type(completion).__name__}"
        )
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    # TRL uses its own `_tokenize` for training pairs; calling it here keeps scoring and training identical.
    return list(_tokenize(tokenizer, prompt + completion)["input_ids"])


def pad_token_ids(
    sequences: Sequence[list[int]], pad_token_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists on the `right` (scoring: the reward is read at the last real token) or the `left`
    (generation: every row continues from its last column). Returns `input_ids`, `attention_mask`, both `(B, L)`."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}.")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------------
# Saving the base model next to the adapter when it cannot be found elsewhere.


def base_model_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's own weights out of a PEFT-wrapped model (LoRA and `modules_to_save` copies dropped)."""
    state = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def save_base_model(model: PeftModel, directory: str | Path) -> None:
    """Write the base model under `directory/base_model`, for reward models built from a config (no Hub name)."""
    base = model.get_base_model()
    fresh = type(base)(base.config)
    fresh.load_state_dict(base_model_state_dict(model), strict=True)
    fresh.save_pretrained(Path(directory) / BASE_MODEL_DIR)


# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module):
    """Inside the block: the model in eval mode (no dropout) and without the input embeddings' require-grads hooks (no
    backward below the first Laplace layer); both restored after, even on error."""
    with eval_mode(model), without_input_require_grads_hooks(model):
        yield


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout) inside the block, its previous mode restored after, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
        batch_size: int = 16,
        return_var: bool = True,
        progress_bar: bool = False,
        laplace_backend: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gaussian rewards of `completions` to `prompts`.

        Args:
            prompts, completions: strings, or lists of chat messages (conversational), one each per response.
            batch_size: responses per forward (and backward) pass; memory grows linearly with it.
            return_var: `False` skips the backward and returns `(mean, None)` (the MAP reward only).
            progress_bar: show a tqdm bar over batches (for long scoring jobs).
            laplace_backend: compute the variance on the reference path (per-response Jacobians, laplace-torch's
                `functional_variance`); slower, same result.

        Returns:
            `mean` and `var`, float tensors of shape `(B,)` on the CPU.
        """
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(completions)} completions: pass one prompt per completion."
            )
        ids = [tokenize_response(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.predict_ids(
            ids,
            batch_size=batch_size,
            return_var=return_var,
            progress_bar=progress_bar,
            laplace_backend=laplace_backend,
        )

    def predict_ids(
        self,
        token_ids: Sequence[list[int]],
        batch_size: int = 16,
        return_var: bool = True,
        progress_bar: bool = False,
        laplace_backend: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like `predict`, from token ids already tokenized with `tokenize_response`."""
        if len(token_ids) == 0:
            empty = torch.zeros(0)
            return empty, (empty if return_var else None)
        means, variances = [], []
        with scoring_mode(self.model):
            starts = range(0, len(token_ids), batch_size)
            for start in tqdm(starts, desc="Scoring (mean, var)", disable=not progress_bar):
                batch = token_ids[start : start + batch_size]
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
        batch_size: int = 16,
        progress_bar: bool = False,
        laplace_backend: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian reward differences r(chosen) - r(rejected) of preference pairs, with their exact covariance.

        The variance is (J_c - J_r) Σ (J_c - J_r)^T: chosen and rejected share the weights (and the prompt), so it is
        not var_c + var_r. Bradley-Terry predictive: p(chosen > rejected) ~ sigmoid(mean / sqrt(1 + pi/8 var)).

        Returns:
            `mean` and `var` of the differences, float tensors of shape `(B,)` on the CPU.
        """
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"Got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected.")
        # Interleaved (chosen_0, rejected_0, chosen_1, ...), the layout `pair_differences` reads.
        ids = [
            tokenize_response(self.tokenizer, p, completion)
            for p, c, r in zip(prompts, chosen, rejected, strict=True)
            for completion in (c, r)
        ]
        means, variances = [], []
        with scoring_mode(self.model):
            for start in tqdm(range(0, len(ids), 2 * batch_size), desc="Scoring pairs", disable=not progress_bar):
                mean, var = self._predict_batch(ids[start : start + 2 * batch_size], True, laplace_backend)
                means.append(mean)
                variances.append(var)
        if not means:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(means), torch.cat(variances)

    def predict_relative(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        batch_size: int = 16,
        weights: Sequence[float] | torch.Tensor | None = None,
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
        progress_bar: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussian rewards with their relative variance: Var(r_i - mean_j r_j), j over the completions of the same
        prompt (see `trl_bayes.relative_variance`). The prompt's unidentified reward offset cancels.

        Args:
            prompts, completions: one each per response; responses to an equal prompt form a group.
            batch_size: responses per forward-backward pass.
            weights: per response, its weight in its group's mean (e.g. how often a deduplicated sample was drawn);
                `None` = 1 each.
            reference: the group's mean is taken over a reference set instead of the scored completions: per prompt
                (a mapping from `prompt_key(prompt)`, or a callable of the prompt), completions such as K samples of
                the reference policy. Needed when a prompt comes with a single completion (PPO).
            progress_bar: a tqdm bar over blocks of prompts.

        Returns:
            `mean`, `var` (marginal) and `relative_var`, float tensors of shape `(B,)` on the CPU.
        """
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(completions)} completions: pass one prompt per completion."
            )
        keys = [prompt_key(p) for p in prompts]
        ids = [tokenize_response(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        with scoring_mode(self.model):
            reference_means = None
            if reference is not None:
                reference_means = self.reference_gradient_means(
                    {key: p for key, p in zip(keys, prompts, strict=True)}, reference, batch_size
                )
            return relative_predict_ids(self, ids, keys, weights, reference_means, batch_size, progress_bar)

    def reference_gradient_means(
        self,
        prompts: Mapping[str, Any],
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]],
        batch_size: int = 16,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Per prompt key, the mean reward gradient of the prompt's reference completions (P floats per prompt), the
        J_mean of `predict_relative(..., reference=...)`. Keys already in `self.reference_cache` are not recomputed.

        Args:
            prompts: `prompt_key(prompt) -> prompt` of the prompts needed.
            reference: completions per prompt key (a mapping) or per prompt (a callable).
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
            todo[key] = [tokenize_response(self.tokenizer, prompt, c) for c in completions]
        if todo:
            with scoring_mode(self.model):
                self.reference_cache.update(reference_gradient_means(self, todo, batch_size))
        return {key: self.reference_cache[key] for key in prompts}

    # -- serialization -------------------------------------------------------------------------------------------
    def save_posterior(self, directory: str | Path) -> None:
        """Write the posterior next to an adapter: tensors to safetensors, metadata to JSON (never pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(laplace_tensors(self.laplace), str(directory / POSTERIOR_WEIGHTS_NAME))
        metadata = dict(self.metadata)
        metadata["prior_precision"] = torch.as_tensor(self.laplace.prior_precision).reshape(-1).tolist()
        metadata["loss"] = float(torch.as_tensor(self.laplace.loss))
        (directory / POSTERIOR_CONFIG_NAME).write_text(json.dumps(metadata, indent=2) + "\n")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write adapter, tokenizer, posterior, and the base model too when it has no Hub name or path."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if not self.metadata.get("base_model"):
            save_base_model(self.model, directory)
        self.save_posterior(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        base_model: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> BayesianRewardModel:
        """Load adapter + posterior written by `BayesianRewardTrainer.save_model` or `save_pretrained`.

        Args:
            directory: the folder with `adapter_config.json` and `laplace_config.json`.
            base_model: override the base model (Hub name or path); by default `directory/base_model` if present,
                else the base model recorded at fit time.
            torch_dtype: dtype to load the model in: float32 (the default, whatever the checkpoint's dtype) or float64;
                the posterior algebra needs one of them.
            device: where to put the model.

        Raises:
            FileNotFoundError: no posterior (or no adapter) in `directory`.
            ValueError: the posterior does not match the adapter (other weights, shapes or values).
        """
        directory = Path(directory)
        config_path = directory / POSTERIOR_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"No posterior in {directory}: '{POSTERIOR_CONFIG_NAME}' is missing. Fit one with "
                "`BayesianRewardTrainer.fit_posterior()` and save it with `trainer.save_model(dir)`."
            )
        if not (directory / "adapter_config.json").is_file():
            raise FileNotFoundError(f"No PEFT adapter in {directory}: 'adapter_config.json' is missing.")
        metadata = json.loads(config_path.read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version={metadata.get('format_version')}, this trl_bayes reads "
                f"{FORMAT_VERSION}."
            )
        if base_model is None:
            local_base = directory / BASE_MODEL_DIR
            base_model = str(local_base) if local_base.is_dir() else metadata.get("base_model")
        if not base_model:
            raise ValueError(f"{directory} names no base model and has no '{BASE_MODEL_DIR}/': pass `base_model=`.")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if torch_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"torch_dtype={torch_dtype}: the Laplace posterior needs torch.float32 or torch.float64.")
        kwargs: dict[str, Any] = {"num_labels": 1, "attn_implementation": "eager", "dtype": torch_dtype}
        with whole_weights():  # each process scores its own share: never sharded by a ZeRO-3 launch
            base = AutoModelForSequenceClassification.from_pretrained(base_model, **kwargs)
            base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, directory, is_trainable=True)
        model.to(torch_dtype)  # PEFT keeps adapters in float32 by default
        if device is not None:
            model.to(device)
        model.eval()

        names = select_laplace_parameters(model, metadata["subset_of_weights"])
        shapes = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        saved = {p["name"]: p["shape"] for p in metadata["parameters"]}
        if names != list(saved) or any(shapes[n] != saved[n] for n in names):
            missing = sorted(set(saved) - set(names))[:3]
            extra = sorted(set(names) - set(saved))[:3]
            wrong = [n for n in names if n in saved and shapes[n] != saved[n]][:3]
            raise ValueError(
                f"The posterior in {directory} does not match the adapter: it was fitted over {len(saved)} weight "
                f"tensors, the adapter has {len(names)} (missing: {missing}, unexpected: {extra}, other shapes: "
                f"{wrong}). Refit the posterior for this adapter with `BayesianRewardTrainer.fit_posterior()`."
            )
        la = make_laplace(
            RewardPairModel(model),
            metadata["hessian_structure"],
            kfac_approx=metadata["kfac_approx"],
            curvature=metadata.get("curvature", "ggn"),  # posteriors saved before the field existed are GGN
        )
        tensors = load_file(str(directory / POSTERIOR_WEIGHTS_NAME))
        current = torch.cat([p.detach().flatten() for p in la.params]).cpu().double()
        fitted = tensors["mean"].double()
        tolerance = 1e-5
        if current.shape != fitted.shape or (current - fitted).norm() > tolerance * (fitted.norm() + 1e-12):
            raise ValueError(
                f"The posterior in {directory} was fitted at other adapter weights than the ones loaded (relative "
                "difference above tolerance). The adapter was changed after the fit: refit the posterior."
            )
        load_laplace_tensors(la, tensors, n_data=metadata["n_data"])
        return cls(model, tokenizer, la, metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Penalties: pure functions over tensors of shape (M, B) = (ensemble members, responses).


UNCERTAINTIES = ("marginal", "relative")
"""Which variance a penalty uses: J Σ J^T, or that of the reward minus its prompt group's mean (`relative_variance`)."""


class Penalty(str, Enum):
    """How a (possibly ensembled) Gaussian reward becomes one number per response."""

    NONE = "none"
    """The (ensemble-mean) MAP reward, no penalty."""
    STD = "std"
    """mean - k * sqrt(var): the paper's standard-deviation penalty."""
    VAR = "var"
    """mean - k * var: the paper's variance penalty."""
    WCO = "wco"
    """Worst-case optimization over MAP ensemble members: min_i mean_i (Coste et al.)."""
    UWO = "uwo"
    """Uncertainty-weighted optimization: mean - k * population variance of the members' MAP rewards (Coste et al.)."""


def combine_gaussians(means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of M independent Gaussians per response.

    Args:
        means, variances: `(M, B)`.

    Returns:
        mean `(B,)` = (1/M) sum_i mean_i and variance `(B,)` = (1/M^2) sum_i var_i.
    """
    m = means.shape[0]
    return means.mean(0), variances.sum(0) / m**2


PENALTY_SCALES = ("absolute", "prompt")
"""Units of k: `absolute` (k * std in reward units, the paper's) or `prompt` (relative to each prompt's spreads)."""


def prompt_scale(reward: torch.Tensor, uncertainty: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per response, sd_g(reward) / mean_g(uncertainty) over the responses of its group g (e.g. one prompt's
    candidates): the factor that puts a penalty k * uncertainty_i in units of the group's reward spread relative to
    its typical uncertainty, k * sd_g(r) * u_i / mean_g(u). Then k = 1 moves a response with the group's mean
    uncertainty down by one reward standard deviation of its group, whatever the scale of the reward and of the
    variance, which differ between models, prompts and worlds.

    Standard deviations are population ones (divided by the group size). A group of one response, or of equal rewards,
    gets factor 0 (no spread to compare with); so does a group whose mean uncertainty is 0.

    Args:
        reward: `(B,)` the unpenalized reward (the ensemble's mean MAP reward).
        uncertainty: `(B,)` what is penalized: the std or the variance.
        groups: `(B,)` integer group of each response.

    Returns:
        `(B,)`.
    """
    _, index = torch.unique(groups, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, torch.ones_like(reward))
    group_mean = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, reward) / count
    spread = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, (reward - group_mean[index]) ** 2)
    sd = (spread / count).sqrt()
    mean_uncertainty = torch.zeros(num_groups, dtype=reward.dtype).index_add_(0, index, uncertainty.to(reward)) / count
    factor = torch.where(mean_uncertainty > 0, sd / mean_uncertainty.clamp_min(torch.finfo(reward.dtype).tiny), 0.0)
    return factor[index]


def penalized_reward(
    means: torch.Tensor,
    variances: torch.Tensor | None,
    penalty: Penalty | str,
    k: float,
    scale: str = "absolute",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `penalty` with strength `k` to member rewards.

    Args:
        means: `(M, B)` MAP rewards of M members (M = 1 for a single model).
        variances: `(M, B)` Laplace variances, or `None` for the penalties that do not use them.
        scale: units of k for `std` / `var`: `"absolute"` (mean - k u) or `"prompt"` (mean - k * prompt_scale * u,
            see `prompt_scale`, within each of `groups`).
        groups: `(B,)` integer group (prompt) of each response; needed with `scale="prompt"`.

    Returns:
        `(B,)` rewards.
    """
    if scale not in PENALTY_SCALES:
        raise ValueError(f"Unknown penalty scale {scale!r}: choose one of {list(PENALTY_SCALES)}.")
    if scale == "prompt" and groups is None:
        raise ValueError("scale='prompt' needs the `groups` (prompts) of the responses.")
    penalty = Penalty(penalty)
    if penalty == Penalty.WCO:
        return means.min(0).values
    if penalty == Penalty.UWO:
        return means.mean(0) - k * means.var(0, unbiased=False)
    if penalty == Penalty.NONE:
        return means.mean(0)
    if variances is None:
        raise ValueError(f"penalty='{penalty.value}' needs the Laplace variances.")
    mean, var = combine_gaussians(means, variances)
    uncertainty = var.sqrt() if penalty == Penalty.STD else var
    if scale == "prompt":
        uncertainty = prompt_scale(mean, uncertainty, groups) * uncertainty
    return mean - k * uncertainty


class PenalizedReward:
    """A TRL reward function from one Bayesian reward model or an ensemble of them.

    Not an `nn.Module` on purpose: GRPO/RLOO treat module rewards as Hugging Face models and score them their own way.
    A plain class rather than a closure, so TRL names it (`__name__`) and it can carry state (the models).

    Args:
        models (`BayesianRewardModel` or a list of them): one model, or independently trained members.
        penalty (`str`, *optional*, defaults to `"std"`): `"none"`, `"std"`, `"var"`, `"wco"` or `"uwo"`. The default
            is what won the uncertainty study across worlds and proxy backbones (README, issue 7).
        k (`float`, *optional*, defaults to `1.0`): penalty strength (the λ of `"uwo"`).
        batch_size (`int`, *optional*, defaults to `16`): responses per forward pass.
        uncertainty (`str`, *optional*, defaults to `"relative"`): which variance the `std`/`var` penalties use.
            `"relative"`: Var(r_i - mean_j r_j) over the completions of the same prompt in the call (Best-of-N's
            candidates, GRPO/RLOO's `num_generations` group), or over `reference`'s completions when given; the
            prompt's unidentified reward offset cancels. A prompt with a single completion and no `reference` is
            refused. Costs a second forward-backward per response. `"marginal"`: Var(r_i) = J_i Σ J_i^T (the
            paper's), for one completion per prompt without a reference. Ensembles: per member, then combined. The
            default won the uncertainty study in three of its four world x backbone panels (README, issue 7).
        reference (mapping or callable, *optional*): with `uncertainty="relative"`, completions per prompt (a mapping
            from the prompt string, or a callable of the prompt) whose mean the reward is centered on, e.g. K samples
            of the reference policy: for callers that score one completion per prompt (PPO). Their mean gradients
            are cached per prompt (P floats each).
        scale (`str`, *optional*, defaults to `"absolute"`): units of k for `std` / `var`. `"absolute"`: the penalty
            is k * std (or k * var) in reward units. `"prompt"`: k * sd_g(r) * std_i / mean_g(std) within the
            completions of each prompt in the call (the groups of `uncertainty="relative"`; see `prompt_scale`), so
            that one k fits models and prompts whose rewards and variances live on different scales. Needs several
            completions per prompt in a call (Best-of-N, GRPO / RLOO groups); a prompt alone gets no penalty.

    Example:
    ```python
    >>> reward = PenalizedReward(BayesianRewardModel.from_pretrained("rm"), penalty="std", k=1.0)
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], ...)
    ```
    """

    __name__ = "penalized_reward"  # TRL names reward functions (columns, metrics) by `__name__`

    def __init__(
        self,
        models: BayesianRewardModel | Sequence[BayesianRewardModel],
        penalty: Penalty | str = Penalty.STD,
        k: float = 1.0,
        batch_size: int = 16,
        uncertainty: str = "relative",
        reference: Mapping[str, Sequence[Any]] | Callable[[Any], Sequence[Any]] | None = None,
        scale: str = "absolute",
    ):
        self.models = [models] if isinstance(models, BayesianRewardModel) else list(models)
        if not self.models:
            raise ValueError("PenalizedReward needs at least one BayesianRewardModel.")
        if penalty not in [p.value for p in Penalty]:
            raise ValueError(f"Unknown penalty {penalty!r}: choose one of {[p.value for p in Penalty]}.")
        self.penalty = Penalty(penalty)
        if self.penalty in (Penalty.WCO, Penalty.UWO) and len(self.models) < 2:
            raise ValueError(f"penalty='{self.penalty.value}' is an ensemble penalty: pass at least two models.")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        self.k = float(k)
        self.batch_size = batch_size
        if uncertainty not in UNCERTAINTIES:
            raise ValueError(f"Unknown uncertainty {uncertainty!r}: choose one of {list(UNCERTAINTIES)}.")
        if reference is not None and uncertainty != "relative":
            raise ValueError("`reference` centers the relative variance: set uncertainty='relative' to use it.")
        self.uncertainty = uncertainty
        self.reference = reference
        if scale not in PENALTY_SCALES:
            raise ValueError(f"Unknown scale {scale!r}: choose one of {list(PENALTY_SCALES)}.")
        if scale == "prompt" and self.penalty not in (Penalty.STD, Penalty.VAR):
            raise ValueError(f"scale='prompt' applies to the 'std' and 'var' penalties, not '{self.penalty.value}'.")
        self.scale = scale

    @property
    def needs_variance(self) -> bool:
        return self.penalty in (Penalty.STD, Penalty.VAR)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> dict[str, torch.Tensor]:
        """All parts of the reward: `reward` `(B,)`, member `means`/`variances` `(M, B)`, combined `mean`/`var` `(B,)`
        (`variances`/`var` are the relative ones with `uncertainty="relative"`, then also `marginal_variances`)."""
        if self.needs_variance and self.uncertainty == "relative":
            # Per member: (mean, relative variance); the marginal variance comes free with it and is kept for logs.
            triples = [
                m.predict_relative(prompts, completions, self.batch_size, reference=self.reference)
                for m in self.models
            ]
            outputs = [(mean, relative) for mean, _, relative in triples]
            marginal = torch.stack([var for _, var, _ in triples])
        else:
            outputs = [
                m.predict(prompts, completions, self.batch_size, return_var=self.needs_variance) for m in self.models
            ]
            marginal = None
        means = torch.stack([mean for mean, _ in outputs])
        variances = torch.stack([var for _, var in outputs]) if self.needs_variance else None
        groups = None
        if self.scale == "prompt":  # integer group of each response: equal prompts share one
            index: dict[str, int] = {}
            groups = torch.tensor([index.setdefault(prompt_key(p), len(index)) for p in prompts])
        reward = penalized_reward(means, variances, self.penalty, self.k, self.scale, groups)
        parts = {"reward": reward, "means": means}
        if variances is not None:
            parts["variances"] = variances
            parts["mean"], parts["var"] = combine_gaussians(means, variances)
        if marginal is not None:
            parts["marginal_variances"] = marginal
        return parts

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[list[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        # completion_ids are the policy's tokens; the reward model may use another tokenizer, so it re-tokenizes text.
        parts = self.score(prompts, completions)
        if log_metric is not None:
            log_metric("laplace/reward", parts["reward"].mean().item())
            log_metric("laplace/map_reward", parts["means"].mean().item())
            if "var" in parts:
                log_metric("laplace/reward_std", parts["var"].sqrt().mean().item())
        return parts["reward"].tolist()
