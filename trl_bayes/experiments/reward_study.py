"""The reward recipe's model and check (recipes/reward.py): the reward model (a Hub / local model, or the offline tiny
GPT-NeoX) with the LoRA adapter that carries the posterior, the held-out pairs scored as a consumer of the saved model
would score them, and `summary.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path

# The Laplace-LoRA posterior lives on the adapter; GPT-NeoX (Pythia, the offline default) fuses q, k, v in one module.
GPT_NEOX_LORA_TARGETS = ["query_key_value"]


def build_model_and_tokenizer(script_args, training_args, model_args):
    """The reward model (one output) and its tokenizer: from `model_name_or_path`, or the offline tiny GPT-NeoX."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPTNeoXForSequenceClassification,
        set_seed,
    )

    from trl_bayes.experiments.world import build_tokenizer, tiny_gpt_neox_config

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


def score_pairs(posterior, dataset, max_length: int | None, batch_size: int):
    """Gaussian reward differences r(chosen) - r(rejected) of `dataset` (exact covariance between the two), tokenized
    as the trainer tokenizes them.

    Returns `(mean, var, n_dropped)`, with the pairs longer than `max_length` dropped as in training.
    """
    import torch

    from trl_bayes.generation import tokenize_responses
    from trl_bayes.preference_formats import preference_pairs

    # Any TRL preference format; an implicit prompt is extracted as TRL extracts it, never left empty (an empty prompt
    # would put every response of the dataset in one group of the relative variance).
    prompts, chosen, rejected = preference_pairs(dataset)
    tokenizer = posterior.tokenizer
    chosen_ids = tokenize_responses(tokenizer, prompts, chosen)
    pairs = list(zip(chosen_ids, tokenize_responses(tokenizer, prompts, rejected), strict=True))
    kept = [pair for pair in pairs if max_length is None or max(len(ids) for ids in pair) <= max_length]
    if not kept:
        raise ValueError(f"No held-out pair fits in max_length={max_length} tokens.")
    # Scored from the ids tokenized above (what `predict_pairs` would tokenize again).
    mean, var = posterior.predict_pair_ids(kept, batch_size=batch_size, progress_bar=True)
    return mean.to(torch.float64), var.to(torch.float64), len(dataset) - len(kept)


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
