"""Train a Bayesian (Laplace-LoRA) reward model and check it on held-out preference pairs.

The recipe
1. trains a LoRA reward model with the Bradley-Terry loss (the MAP estimate, TRL's `RewardTrainer`),
2. fits a Laplace posterior over the LoRA weights (and the score head) and tunes its prior precision,
3. saves adapter + posterior with `trainer.save_model(output_dir)`,
4. reloads them with `BayesianRewardModel.from_pretrained(output_dir)`, as a consumer (GRPO, RLOO, best-of-n) would,
   and scores held-out pairs: `eval_summary.json` and `summary.md` land in `output_dir`.

With no arguments it runs offline on a CPU in under a minute (about 30 s on 2 cores): a tiny GPT-NeoX built from a
config, a word-level tokenizer built in memory and generated "shopping list" preference pairs (`trl_bayes.synthetic`).
Settings come from `recipes/configs/reward.yaml` unless another `--config` is given; command-line flags override yaml
keys.

    # offline default (CPU is fine)
    accelerate launch recipes/reward.py
    accelerate launch recipes/reward.py --config recipes/configs/reward.yaml --hessian_structure diag
    python recipes/reward.py --output_dir /tmp/rw --num_train_epochs 1

    # several processes (DDP, DeepSpeed ZeRO-2/3; CPU variants: cpu_ddp, cpu_zero2, cpu_zero3): README, "Scaling"
    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml recipes/reward.py
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml recipes/reward.py     # two CPU processes

    # a Hub model and a Hub preference dataset (plain-text `chosen`/`rejected`, with a `test` split), on a GPU
    accelerate launch recipes/reward.py \
        --model_name_or_path EleutherAI/pythia-70m \
        --dataset_name Anthropic/hh-rlhf \
        --max_length 512 --max_train_pairs 20000 --max_eval_pairs 1000 \
        --per_device_train_batch_size 16 --learning_rate 1e-4 --bf16 true \
        --output_dir outputs/reward-pythia-70m

    # a local preference file (json/jsonl/csv/parquet) or a folder (`save_to_disk` output or data files)
    accelerate launch recipes/reward.py --dataset_name data/prefs.jsonl --model_name_or_path path/to/model

A dataset needs `chosen` and `rejected` columns (plain text or lists of chat messages) and optionally `prompt`.
Without a `--dataset_test_split` split in the data, `eval_fraction` of the training split is held out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from world_stages import check_output_dir, run_script

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPE_DIR / "configs" / "reward.yaml"
# datasets' packaged loaders, by file suffix: a `--dataset_name` ending in one of these is a local file, never a Hub id.
LOCAL_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# The Laplace-LoRA posterior lives on the adapter; GPT-NeoX (Pythia, the offline default) fuses q, k, v in one module.
GPT_NEOX_LORA_TARGETS = ["query_key_value"]


@dataclass
class RewardScriptArguments:
    """Data and offline-default arguments of the recipe (the counterpart of TRL's `ScriptArguments`).

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id, a local file (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`) or a local folder. Unset:
            generated offline pairs (`trl_bayes.synthetic.make_preference_dataset`).
        dataset_config (`str`, *optional*):
            Dataset configuration name (`name` of `datasets.load_dataset`).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Held-out split to score; when the dataset lacks it, `eval_fraction` of the training split is held out.
        eval_fraction (`float`, *optional*, defaults to `0.1`):
            Fraction of the training split held out when there is no test split.
        max_train_pairs (`int`, *optional*):
            Train on at most this many pairs (the first ones). Unset: all.
        max_eval_pairs (`int`, *optional*, defaults to `1000`):
            Score at most this many held-out pairs: the Laplace variance needs a Jacobian per response.
        num_train_pairs (`int`, *optional*, defaults to `2048`):
            Offline default only: generated training pairs.
        num_eval_pairs (`int`, *optional*, defaults to `512`):
            Offline default only: generated held-out pairs (other seed, exact duplicates of training pairs removed).
        synthetic_seed (`int`, *optional*, defaults to `0`):
            Offline default only: seed of the training pairs; the held-out pairs use `synthetic_seed + 1`.
        synthetic_label_noise (`float`, *optional*, defaults to `0.0`):
            Offline default only: probability of flipping a preference label (train and held-out alike).
        tiny_hidden_size (`int`, *optional*, defaults to `32`):
            Offline default only: width of the tiny GPT-NeoX.
        tiny_num_hidden_layers (`int`, *optional*, defaults to `2`):
            Offline default only: depth of the tiny GPT-NeoX.
        tiny_num_attention_heads (`int`, *optional*, defaults to `4`):
            Offline default only: attention heads of the tiny GPT-NeoX (must divide `tiny_hidden_size`).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local file (json/jsonl/csv/parquet/arrow) or folder. Unset: offline pairs."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Held-out split; if absent, `eval_fraction` of the train split is held out."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the train split held out when there is no test split."}
    )
    max_train_pairs: int | None = field(default=None, metadata={"help": "Train on at most this many pairs."})
    max_eval_pairs: int | None = field(
        default=1000, metadata={"help": "Score at most this many held-out pairs (one Jacobian per response)."}
    )
    num_train_pairs: int = field(default=2048, metadata={"help": "Offline default: generated training pairs."})
    num_eval_pairs: int = field(default=512, metadata={"help": "Offline default: generated held-out pairs."})
    synthetic_seed: int = field(default=0, metadata={"help": "Offline default: seed of the training pairs."})
    synthetic_label_noise: float = field(
        default=0.0, metadata={"help": "Offline default: probability of flipping a preference label."}
    )
    tiny_hidden_size: int = field(default=32, metadata={"help": "Offline default: width of the tiny GPT-NeoX."})
    tiny_num_hidden_layers: int = field(default=2, metadata={"help": "Offline default: layers of the tiny GPT-NeoX."})
    tiny_num_attention_heads: int = field(
        default=4, metadata={"help": "Offline default: attention heads of the tiny GPT-NeoX."}
    )

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {self.eval_fraction}.")
        for name in ("max_train_pairs", "max_eval_pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 (or unset), got {value}.")
        if self.num_train_pairs < 1 or self.num_eval_pairs < 1:
            raise ValueError("`num_train_pairs` and `num_eval_pairs` must be >= 1.")


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_preference_splits(script_args: RewardScriptArguments, seed: int):
    """Training and held-out preference pairs, plus a one-line description of where they came from."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    from trl_bayes.synthetic import make_preference_dataset

    if script_args.dataset_name is None:
        # Offline default: two seeds give two samples of the same world; pairs that the (small) world happens to draw
        # twice are dropped from the held-out set so that its accuracy is on pairs never trained on.
        args = script_args
        train = make_preference_dataset(args.num_train_pairs, args.synthetic_seed, args.synthetic_label_noise)
        seen = set(zip(train["prompt"], train["chosen"], train["rejected"], strict=True))
        candidates = make_preference_dataset(
            2 * args.num_eval_pairs, args.synthetic_seed + 1, args.synthetic_label_noise
        )
        keep = [
            i
            for i, row in enumerate(
                zip(candidates["prompt"], candidates["chosen"], candidates["rejected"], strict=True)
            )
            if row not in seen
        ][: args.num_eval_pairs]
        source = (
            f"offline synthetic pairs (trl_bayes.synthetic, seeds {args.synthetic_seed}/{args.synthetic_seed + 1})"
        )
        return train, candidates.select(keep), source

    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file():
        loader = LOCAL_FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ValueError(f"Cannot read {path}: supported files are {sorted(LOCAL_FILE_LOADERS)} (or a folder).")
        data = load_dataset(loader, data_files=str(path))
    elif path.is_dir():
        # `save_to_disk` folders have their own format; any other folder goes through datasets' folder loaders.
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = load_from_disk(str(path))
        else:
            data = load_dataset(str(path), name=script_args.dataset_config)
    elif name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FILE_LOADERS or name.count("/") > 1:
        # Hub ids are `name` or `org/name`: anything else that does not exist is a mistyped local path, and sending it
        # to the Hub would only produce a confusing network error.
        raise FileNotFoundError(f"--dataset_name {name!r}: no such file or folder (cwd: {Path.cwd()}).")
    else:
        data = load_dataset(name, name=script_args.dataset_config)

    if isinstance(data, Dataset):
        data = DatasetDict({script_args.dataset_train_split: data})
    if script_args.dataset_train_split not in data:
        raise ValueError(
            f"{name} has no split {script_args.dataset_train_split!r} (it has {list(data)}): pass "
            "--dataset_train_split."
        )
    train = data[script_args.dataset_train_split]
    if script_args.dataset_test_split in data:
        held_out = data[script_args.dataset_test_split]
        source = f"{name} [{script_args.dataset_train_split} / {script_args.dataset_test_split}]"
    else:
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=seed)
        train, held_out = split["train"], split["test"]
        source = (
            f"{name} [{script_args.dataset_train_split}, no {script_args.dataset_test_split!r} split: "
            f"{script_args.eval_fraction:.0%} held out]"
        )
    if script_args.max_train_pairs is not None:
        train = train.select(range(min(script_args.max_train_pairs, len(train))))
    if script_args.max_eval_pairs is not None:
        held_out = held_out.select(range(min(script_args.max_eval_pairs, len(held_out))))
    return train, held_out, source


# ---------------------------------------------------------------------------------------------------------------------
# Model


def build_model_and_tokenizer(script_args: RewardScriptArguments, training_args, model_args):
    """The reward model (one output) and its tokenizer: from `model_name_or_path`, or the offline tiny GPT-NeoX."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPTNeoXForSequenceClassification,
        set_seed,
    )

    from trl_bayes.synthetic import build_tokenizer, tiny_gpt_neox_config

    # The score head (and the offline model's every weight) is initialized at random: the same seed on every process.
    set_seed(training_args.seed)
    if model_args.model_name_or_path is None:
        tokenizer = build_tokenizer()
        config = tiny_gpt_neox_config(
            len(tokenizer),
            hidden_size=script_args.tiny_hidden_size,
            num_hidden_layers=script_args.tiny_num_hidden_layers,
            num_attention_heads=script_args.tiny_num_attention_heads,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPTNeoXForSequenceClassification(config)
        if model_args.dtype not in (None, "auto", "float32"):
            model.to(getattr(torch, model_args.dtype))
        return (
            model,
            tokenizer,
            f"offline tiny GPT-NeoX (hidden {config.hidden_size}, {config.num_hidden_layers} layers)",
        )

    init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    init_kwargs.update(training_args.model_init_kwargs or {})
    # The model is built here, not by the trainer (which needs it built to know where its base weights come from):
    # clear the kwargs so that RewardTrainer does not warn that they are ignored.
    training_args.model_init_kwargs = None
    init_kwargs["num_labels"] = 1  # a reward model has one output, whatever model_init_kwargs says
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, **init_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    return model, tokenizer, model_args.model_name_or_path


def lora_config(model_args, model):
    """The LoRA adapter that carries the posterior, from the `lora_*` flags."""
    from trl import get_peft_config

    if not model_args.use_peft:
        raise ValueError(
            "`use_peft` is false, but Laplace-LoRA puts its posterior on a LoRA adapter: drop `--use_peft false` (and "
            "`use_peft: false` from the yaml)."
        )
    if model_args.lora_task_type != "SEQ_CLS":
        raise ValueError(
            f"`lora_task_type` is {model_args.lora_task_type!r}: a reward model needs 'SEQ_CLS' (it makes PEFT train the "
            "score head too)."
        )
    if model_args.lora_target_modules is None and model.config.model_type == "gpt_neox":
        # PEFT would pick the same by default; naming it here makes it visible in adapter_config.json and the logs.
        model_args.lora_target_modules = GPT_NEOX_LORA_TARGETS
    return get_peft_config(model_args)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def score_pairs(posterior, dataset, max_length: int | None, batch_size: int):
    """Gaussian reward differences r(chosen) - r(rejected) of `dataset` (exact covariance between the two), tokenized
    as the trainer tokenizes them.

    Returns `(mean, var, n_dropped)`, with the pairs longer than `max_length` dropped as in training.
    """
    import torch

    from trl_bayes.reward import tokenize_response

    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [""] * len(dataset)  # implicit prompt
    keep = [
        i
        for i, (prompt, chosen, rejected) in enumerate(
            zip(prompts, dataset["chosen"], dataset["rejected"], strict=True)
        )
        if max_length is None
        or max(
            len(tokenize_response(posterior.tokenizer, prompt, chosen)),
            len(tokenize_response(posterior.tokenizer, prompt, rejected)),
        )
        <= max_length
    ]
    if not keep:
        raise ValueError(f"No held-out pair fits in max_length={max_length} tokens.")
    mean, var = posterior.predict_pairs(
        [prompts[i] for i in keep],
        [dataset[i]["chosen"] for i in keep],
        [dataset[i]["rejected"] for i in keep],
        batch_size=batch_size,
        progress_bar=True,
    )
    return mean.to(torch.float64), var.to(torch.float64), len(dataset) - len(keep)


def write_summary(output_dir: Path, summary: dict) -> tuple[Path, Path]:
    json_path, md_path = output_dir / "eval_summary.json", output_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    m, s = summary["metrics"], summary["seconds"]
    lines = [
        "# Bayesian (Laplace-LoRA) reward model",
        "",
        f"- model: {summary['model']}",
        f"- data: {summary['dataset']}",
        f"- pairs: {summary['num_train_pairs']} train, {summary['num_eval_pairs']} held out",
        f"- posterior: `{summary['hessian_structure']}` over `{summary['subset_of_weights']}` "
        f"({summary['num_laplace_params']} weights), prior precision {summary['prior_precision']:.4g} "
        f"(chosen by {summary['optimize_prior_precision']})",
        "",
        "| held-out pairs | accuracy | Bradley-Terry NLL |",
        "|---|---|---|",
        f"| MAP reward | {m['map_accuracy']:.3f} | {m['map_nll']:.4f} |",
        f"| Laplace probit predictive | {m['map_accuracy']:.3f} | {m['laplace_probit_nll']:.4f} |",
        f"| chance | 0.500 | {math.log(2):.4f} |",
        "",
        "Laplace probit predictive: p(chosen > rejected) = sigmoid(mu / sqrt(1 + pi/8 var)), with mu and var the",
        "linearized mean and variance of r(chosen) - r(rejected) (their covariance included).",
        "",
        "Seconds: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in s.items()),
        "",
    ]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------------------------------


def main(script_args, training_args, model_args):
    import transformers
    from accelerate import PartialState
    from packaging.version import Version

    from trl_bayes import BayesianRewardModel, BayesianRewardTrainer
    from trl_bayes.diagnostics import pair_metrics
    from trl_bayes.distributed import check_cpu_launch

    check_cpu_launch(training_args.use_cpu)
    state = PartialState()
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    output_dir = check_output_dir(training_args.output_dir)

    train_dataset, eval_dataset, data_source = load_preference_splits(script_args, training_args.seed)
    lap("data")
    model, tokenizer, model_source = build_model_and_tokenizer(script_args, training_args, model_args)
    peft_config = lora_config(model_args, model)
    lap("model")

    # The held-out pairs go to the trainer only if it is asked to evaluate during training; note that the
    # "gridsearch" prior precision then tunes on them, which makes the held-out NLL below optimistic.
    trainer = BayesianRewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    lap("trainer_init")

    state.print(f"Training the MAP reward model on {len(trainer.train_dataset)} pairs ({data_source}).")
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.fit_posterior_after_train:
        # train() fitted the posterior too: split its time with the fit's own log entry.
        total = time.perf_counter() - clock
        fit = next(e["laplace/fit_seconds"] for e in reversed(trainer.state.log_history) if "laplace/fit_seconds" in e)
        seconds["map_training"], seconds["posterior_fit"] = total - fit, fit
        clock = time.perf_counter()
    else:
        # This recipe is about the posterior: without the automatic fit, fit it here.
        lap("map_training")
        trainer.fit_posterior()
        lap("posterior_fit")
    log_marglik = next(
        e["laplace/log_marglik"] for e in reversed(trainer.state.log_history) if "laplace/log_marglik" in e
    )

    trainer.save_model(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    lap("save")

    if state.is_main_process:
        # Reload from disk rather than reuse trainer.posterior: this checks what a consumer of `output_dir` gets.
        posterior = BayesianRewardModel.from_pretrained(output_dir, device=trainer.accelerator.device)
        lap("reload")
        diff_mean, diff_var, n_dropped = score_pairs(
            posterior, eval_dataset, training_args.max_length, training_args.per_device_eval_batch_size
        )
        metrics = pair_metrics(diff_mean, diff_var)
        lap("eval")
        seconds["total"] = time.perf_counter() - start
        summary = {
            "model": model_source,
            "dataset": data_source,
            "num_train_pairs": len(trainer.train_dataset),
            "num_eval_pairs": len(eval_dataset) - n_dropped,
            "num_eval_pairs_dropped_max_length": n_dropped,
            "metrics": metrics,
            "prior_precision": posterior.prior_precision,
            "optimize_prior_precision": training_args.optimize_prior_precision,
            "hessian_structure": posterior.hessian_structure,
            "subset_of_weights": posterior.metadata["subset_of_weights"],
            "num_laplace_params": posterior.n_params,
            "log_marglik": log_marglik,
            "train_loss": train_output.training_loss,
            "num_train_epochs": training_args.num_train_epochs,
            "learning_rate": training_args.learning_rate,
            "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
            "output_dir": str(output_dir),
        }
        json_path, md_path = write_summary(output_dir, summary)
        state.print(
            f"Held-out pairs: {summary['num_eval_pairs']} | MAP accuracy {metrics['map_accuracy']:.3f} | "
            f"NLL MAP {metrics['map_nll']:.4f}, Laplace {metrics['laplace_probit_nll']:.4f} (chance {math.log(2):.4f}) "
            f"| prior precision {summary['prior_precision']:.4g} | {seconds['total']:.1f} s"
        )
        state.print(f"Adapter + posterior saved to {output_dir}; summary in {json_path} and {md_path}.")
    trainer.accelerator.wait_for_everyone()

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, TrlParser

    from trl_bayes import BayesianRewardConfig
    from trl_bayes.distributed import cpu_launch_defaults

    dataclass_types = (RewardScriptArguments, BayesianRewardConfig, ModelConfig)
    if subparsers is not None:
        parser = subparsers.add_parser(
            "bayes-reward", help="Train a Bayesian (Laplace-LoRA) reward model", dataclass_types=dataclass_types
        )
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    # Defaults that differ from ModelConfig/RewardConfig, for runs with a yaml that leaves them out. A yaml's keys
    # replace these, and flags replace both (TrlParser sets yaml values as argparse defaults).
    # Several CPU processes: gloo, and use_cpu for DDP but not for DeepSpeed (see `cpu_launch_defaults`).
    parser.set_defaults(use_peft=True, lora_task_type="SEQ_CLS", output_dir="outputs/reward", **cpu_launch_defaults())
    return parser


if __name__ == "__main__":
    run_script(make_parser, main, DEFAULT_CONFIG)
