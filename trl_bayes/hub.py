"""A Bayesian reward model's folder and Hub repository: what `BayesianRewardModel.save_pretrained`, `from_pretrained`
and `push_to_hub` are built on, as huggingface_hub's `ModelHubMixin` methods are on theirs.

- The folder's files: the PEFT adapter and tokenizer, `POSTERIOR_WEIGHTS_NAME` (the posterior's tensors) and
  `POSTERIOR_CONFIG_NAME` (its settings, `FORMAT_VERSION`), written by `save_posterior`, and for a base model built
  from a config `BASE_MODEL_DIR` (`save_base_model`).
- Reading a folder back: its posterior settings (`read_posterior_config`), the PEFT reward model
  (`load_reward_model`) and the posterior over it, refused when it does not match the adapter (`load_posterior`).
- The Hub: a repository id and revision resolved to a local snapshot (`local_folder`), a folder written and uploaded
  as one commit (`push_folder`).
- Quiet by default: no progress bars or load reports unless asked for (`quiet`, `verbose`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError
from laplace.baselaplace import ParametricLaplace
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as transformers_logging

from .distributed import whole_weights
from .laplace_lora import (
    RewardPairModel,
    laplace_tensors,
    load_laplace_tensors,
    make_laplace,
    select_laplace_parameters,
)

POSTERIOR_WEIGHTS_NAME = "laplace_posterior.safetensors"
POSTERIOR_CONFIG_NAME = "laplace_config.json"
BASE_MODEL_DIR = "base_model"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Quiet by default: no progress bars or load reports unless asked for.


def verbose(progress_bar: bool | None) -> bool:
    """Whether to show progress: an explicit `progress_bar` wins; `None` follows transformers' logging level (shown at
    INFO or more verbose, `transformers.logging.set_verbosity_info()`)."""
    return progress_bar if progress_bar is not None else transformers_logging.get_verbosity() <= logging.INFO


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Inside the block: no progress bars (transformers', huggingface_hub's, datasets') and transformers' warnings
    hidden, e.g. the load report that lists the score head as newly initialized when the LoRA adapter then restores it.
    The previous settings come back after, even on error. A no-op with `enabled=False`."""
    if not enabled:
        yield
        return
    bars, dataset_bars = transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------------
# Writing a model's folder: the posterior, and the base model when it cannot be found elsewhere.


def save_posterior(la: ParametricLaplace, config: dict[str, Any], directory: str | Path) -> None:
    """Write a posterior next to its adapter: tensors to safetensors (`laplace_tensors`), `config` to JSON (never
    pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(laplace_tensors(la), str(directory / POSTERIOR_WEIGHTS_NAME))
    (directory / POSTERIOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


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
    with quiet():  # no "Writing model shards" bar
        fresh.save_pretrained(Path(directory) / BASE_MODEL_DIR)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a saved model back.


def local_folder(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """`name_or_path` itself when it is a folder, else the snapshot of the Hub repository it names (`org/name`),
    fetched with `huggingface_hub.snapshot_download(**hub_kwargs)` (`revision`, `cache_dir`, `token`,
    `local_files_only`): from the local cache when it is there, and only from it with `HF_HUB_OFFLINE=1` or
    `local_files_only`.

    Raises:
        FileNotFoundError: neither a folder nor a repository id.
    """
    directory = Path(name_or_path)
    if directory.is_dir():
        return directory
    try:
        return Path(snapshot_download(str(name_or_path), library_name="trl_bayes", **hub_kwargs))
    except HFValidationError as error:  # not a repository id either
        raise FileNotFoundError(
            f"{name_or_path} is neither a local folder nor a Hub repository id ('org/name')."
        ) from error


def read_posterior_config(directory: Path, name_or_path: str | Path) -> dict[str, Any]:
    """What `laplace_config.json` in `directory` (the folder of `name_or_path`) holds.

    Raises:
        FileNotFoundError: no posterior or no adapter in the folder.
        ValueError: the file was written in another `format_version`.
    """
    config_path = directory / POSTERIOR_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No posterior in {name_or_path}: '{POSTERIOR_CONFIG_NAME}' is missing. Fit one with "
            "`BayesianRewardTrainer.fit_posterior()` and save it with `trainer.save_model(dir)`."
        )
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No PEFT adapter in {name_or_path}: 'adapter_config.json' is missing.")
    metadata = json.loads(config_path.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version={metadata.get('format_version')}, this trl_bayes reads "
            f"{FORMAT_VERSION}."
        )
    return metadata


def load_reward_model(
    directory: Path,
    base_model: str,
    torch_dtype: torch.dtype,
    device: str | torch.device | None,
    pad_token_id: int | None,
    hub_kwargs: dict[str, Any],
) -> PeftModel:
    """The base model (Hub name or path) with the adapter in `directory`, in `torch_dtype` on `device`, in eval mode;
    `hub_kwargs` as `local_folder`'s (all but `revision`, which names the adapter's, also apply to the base model)."""
    if torch_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"torch_dtype={torch_dtype}: the Laplace posterior needs torch.float32 or torch.float64.")
    kwargs: dict[str, Any] = {"num_labels": 1, "attn_implementation": "eager", "dtype": torch_dtype}
    kwargs.update({key: value for key, value in hub_kwargs.items() if key != "revision"})  # the adapter's only
    with whole_weights():  # each process scores its own share: never sharded by a ZeRO-3 launch
        base = AutoModelForSequenceClassification.from_pretrained(base_model, **kwargs)
        base.config.pad_token_id = pad_token_id
        model = PeftModel.from_pretrained(base, directory, is_trainable=True)
    model.to(torch_dtype)  # PEFT keeps adapters in float32 by default
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_posterior(model: PeftModel, metadata: dict[str, Any], directory: Path) -> ParametricLaplace:
    """The posterior saved in `directory` (settings `metadata`), over the same weights of `model` as at fit time.

    Raises:
        ValueError: the posterior does not match the adapter (other weights, shapes or values).
    """
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
    return la


# ---------------------------------------------------------------------------------------------------------------------
# Uploading.


def push_folder(
    repo_id: str,
    write: Callable[[Path, str], None],
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Create the Hub repository `repo_id` if needed, let `write(folder, repo_id)` fill a temporary folder (`repo_id`
    as the Hub spells it) and upload that folder as one commit (`huggingface_hub.HfApi.upload_folder`)."""
    api = HfApi(library_name="trl_bayes")
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder), repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
