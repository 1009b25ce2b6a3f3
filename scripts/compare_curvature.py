"""Compare the curvature structures on one tiny reward model: predictive variances and log marginal likelihoods of
K-FAC-expand, K-FAC-reduce, the exact diagonal GGN and the exact dense GGN, at the same fixed prior precision.

The dense GGN is exact (up to the linearization); the other structures approximate it. Why this matters: K-FAC-expand
treats every token as an example, which fits per-token losses, not one reward per sequence.

    .venv/bin/python scripts/compare_curvature.py [--num-pairs 64] [--prior-precision 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import datasets
import torch
import transformers
from peft import LoraConfig
from transformers import GPTNeoXForSequenceClassification, PrinterCallback

from trl_bayes import BayesianRewardConfig, BayesianRewardTrainer
from trl_bayes.experiments.world import build_tokenizer, make_preference_dataset, tiny_gpt_neox_config

VARIANTS = [("kron", "expand"), ("kron", "reduce"), ("diag", "reduce"), ("full", "reduce")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")

    tokenizer = build_tokenizer()
    pairs = make_preference_dataset(args.num_pairs, seed=args.seed)
    probe = make_preference_dataset(16, seed=args.seed + 1)
    print(f"tiny GPT-NeoX (hidden 32, 2 layers), LoRA r=4 + score head, {args.num_pairs} pairs, MAP-trained 2 epochs,")
    print(f"prior precision fixed at {args.prior_precision}; variances averaged over 16 held-out responses\n")
    print(f"{'structure':<10} {'kfac_approx':<12} {'mean var':>10} {'var / full':>11} {'log marglik':>12}")
    results = {}
    for structure, kfac_approx in VARIANTS:
        torch.manual_seed(args.seed)
        config = tiny_gpt_neox_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = BayesianRewardTrainer(
                GPTNeoXForSequenceClassification(config),
                args=BayesianRewardConfig(
                    tmp,
                    use_cpu=True,
                    bf16=False,
                    report_to="none",
                    save_strategy="no",
                    disable_tqdm=True,
                    num_train_epochs=2,
                    learning_rate=5e-3,
                    per_device_train_batch_size=16,
                    seed=args.seed,
                    hessian_structure=structure,
                    kfac_approx=kfac_approx,
                    optimize_prior_precision=None,
                    prior_precision=args.prior_precision,
                    fit_posterior_after_train=True,
                    logging_steps=1000,
                ),
                train_dataset=pairs,
                processing_class=tokenizer,
                peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query_key_value"]),
            )
            trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints every log dict
            trainer.train()
            _, var = trainer.posterior.predict(probe["prompt"], probe["chosen"])
            results[(structure, kfac_approx)] = (
                var.mean().item(),
                trainer.posterior.laplace.log_marginal_likelihood(),
            )
    full = results[("full", "reduce")][0]
    for (structure, kfac_approx), (var, marglik) in results.items():
        label = kfac_approx if structure == "kron" else "-"
        print(f"{structure:<10} {label:<12} {var:10.4g} {var / full:11.3f} {float(marglik):12.2f}")


if __name__ == "__main__":
    main()
