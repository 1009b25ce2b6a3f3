"""Train a Bayesian (Laplace-LoRA) reward model and check it on held-out preference pairs.

The recipe
1. trains a LoRA reward model with the Bradley-Terry loss (the MAP estimate, TRL's `RewardTrainer`),
2. fits a Laplace posterior over the LoRA weights (and the score head) and tunes its prior precision,
3. saves adapter + posterior + model card with `trainer.save_model(output_dir)` (`--push_to_hub true`: uploads them),
4. reloads them with `BayesianRewardModel.from_pretrained(output_dir)`, as a consumer (GRPO, RLOO, best-of-n) would,
   and scores held-out pairs: `eval_summary.json`, `summary.md` and `run_config.json` land in `output_dir`.

With no arguments it runs offline on a CPU in under a minute (about 30 s on 2 cores): a tiny GPT-NeoX built from a
config, a word-level tokenizer built in memory and generated "shopping list" preference pairs
(`trl_bayes.experiments.world`). Defaults, each in one place: `RewardScriptArguments` (below) for the data and the
offline model, `make_parser` for the `BayesianRewardConfig` / `trl.ModelConfig` fields this recipe sets (LoRA, learning
rate, ...), `BayesianRewardConfig` for the posterior. A `--config` YAML replaces defaults and flags replace both;
`main()` from Python runs the bare command line's run.

    accelerate launch recipes/reward.py                               # offline default (CPU is fine)
    accelerate launch recipes/reward.py --hessian_structure diag --optimize_prior_precision gridsearch
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

    accelerate launch recipes/reward.py --dataset_name data/prefs.jsonl --model_name_or_path path/to/model  # local

Any TRL preference format (`chosen`/`rejected` text or messages, `prompt` optional); without a `--dataset_test_split`
split, `eval_fraction` of the training split is held out. Trackers: `--report_to tensorboard`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from trl_bayes.distributed import shutdown
from trl_bayes.experiments.launch import check_output_dir, fill_defaults
from trl_bayes.experiments.preference_data import load_preference_splits
from trl_bayes.experiments.report import write_run_record
from trl_bayes.experiments.reward_study import build_model_and_tokenizer, lora_config, score_pairs, write_summary
from trl_bayes.experiments.stages import StageClock


@dataclass
class RewardScriptArguments:
    """Data and offline-default arguments of the recipe (the counterpart of TRL's `ScriptArguments`).

    Parameters that control the data:
        dataset_name: a Hub dataset id, a local file (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`) or a local
            folder; unset = generated offline pairs (`trl_bayes.experiments.world.make_preference_dataset`).
        dataset_config, dataset_train_split, dataset_test_split: which configuration and splits; without the test
            split, `eval_fraction` of the training split is held out.
        max_train_pairs, max_eval_pairs: at most this many pairs (the first ones); the Laplace variance needs a
            Jacobian per held-out response.

    Parameters of the offline default only:
        num_train_pairs, num_eval_pairs: generated pairs (held-out ones from seed `synthetic_seed + 1`, exact
            duplicates of training pairs removed); synthetic_seed, synthetic_label_noise (flipped labels).
        tiny_hidden_size, tiny_num_hidden_layers, tiny_num_attention_heads: the tiny GPT-NeoX (heads divide width).
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
        for name, value in (("max_train_pairs", self.max_train_pairs), ("max_eval_pairs", self.max_eval_pairs)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 (or unset), got {value}.")
        if self.num_train_pairs < 1 or self.num_eval_pairs < 1:
            raise ValueError("`num_train_pairs` and `num_eval_pairs` must be >= 1.")


def main(script_args: RewardScriptArguments | None = None, training_args=None, model_args=None) -> None:
    """Train, fit, save, reload and check; an argument left `None` takes the recipe's default (a bare command line's)."""
    import transformers
    from accelerate import PartialState
    from packaging.version import Version

    from trl_bayes import BayesianRewardModel, BayesianRewardTrainer
    from trl_bayes.diagnostics import pair_metrics
    from trl_bayes.distributed import check_cpu_launch

    script_args, training_args, model_args = fill_defaults(make_parser, script_args, training_args, model_args)
    check_cpu_launch(training_args.use_cpu)
    state = PartialState()
    clock = StageClock()
    output_dir = check_output_dir(training_args.output_dir)

    # 1. data and model
    train_dataset, eval_dataset, data_source = load_preference_splits(script_args, training_args.seed)
    clock.lap("data")
    model, tokenizer, model_source = build_model_and_tokenizer(script_args, training_args, model_args)
    peft_config = lora_config(model_args, model)
    clock.lap("model")
    # Held-out pairs go to the trainer only to evaluate during training ("gridsearch" then tunes on them: optimistic).
    trainer = BayesianRewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    clock.lap("trainer_init")

    # 2. MAP training and the Laplace fit
    state.print(f"Training the MAP reward model on {len(trainer.train_dataset)} pairs ({data_source}).")
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.fit_posterior_after_train:
        # train() fitted the posterior too: split its time with the fit's own log entry.
        clock.lap("map_training")
        fit = next(e["laplace/fit_seconds"] for e in reversed(trainer.state.log_history) if "laplace/fit_seconds" in e)
        clock.seconds["map_training"] -= fit
        clock.seconds["posterior_fit"] = fit
    else:
        # This recipe is about the posterior: without the automatic fit, fit it here.
        clock.lap("map_training")
        trainer.fit_posterior()
        clock.lap("posterior_fit")
    log_marglik = next(
        e["laplace/log_marglik"] for e in reversed(trainer.state.log_history) if "laplace/log_marglik" in e
    )

    trainer.evaluate_posterior(eval_dataset)  # MAP / Laplace accuracy, NLL, ECE: logged, and into the model card
    # 3. save (and share: adapter, posterior, model card)
    if training_args.push_to_hub:  # saves into output_dir, then uploads: one commit
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    else:
        trainer.save_model(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    clock.lap("save")

    # 4. reload from disk rather than reuse trainer.posterior: this checks what a consumer of `output_dir` gets
    if state.is_main_process:
        posterior = BayesianRewardModel.from_pretrained(output_dir, device=trainer.accelerator.device)
        clock.lap("reload")
        diff_mean, diff_var, n_dropped = score_pairs(
            posterior, eval_dataset, training_args.max_length, training_args.per_device_eval_batch_size
        )
        metrics = pair_metrics(diff_mean, diff_var)
        clock.lap("eval")
        seconds = clock.finish()
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
        # Not `config.json`: this folder is a model folder, where that name is a model's config.
        write_run_record(output_dir / "run_config.json", script_args, training_args, model_args)
        state.print(
            f"Held-out pairs: {summary['num_eval_pairs']} | MAP accuracy {metrics['map_accuracy']:.3f} | "
            f"NLL MAP {metrics['map_nll']:.4f}, Laplace {metrics['laplace_probit_nll']:.4f} (chance {math.log(2):.4f}) "
            f"| prior precision {summary['prior_precision']:.4g} | {seconds['total']:.1f} s"
        )
        state.print(f"Adapter + posterior saved to {output_dir}; summary in {json_path} and {md_path}.")
    trainer.accelerator.wait_for_everyone()

    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers, destroy the process group


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
    # The recipe's defaults of the `BayesianRewardConfig` / `ModelConfig` fields it sets (the others keep theirs).
    parser.set_defaults(
        output_dir="outputs/reward",
        # Required: the posterior lives on the LoRA adapter; SEQ_CLS makes PEFT train (and the posterior cover) the
        # score head too. No dropout: the posterior is fitted at the MAP weights without it, so train without it.
        use_peft=True, lora_task_type="SEQ_CLS", lora_r=8, lora_alpha=16, lora_dropout=0.0,
        # Pairs longer (in tokens) are dropped, in training and in the held-out score; the offline pairs are < 20
        # tokens: raise it (512-1024) for real data. A high learning rate for LoRA, right for the tiny random-init
        # model (~1e-4 on pretrained ones). `3`, not 3.0: as the YAML configs wrote it.
        max_length=128, num_train_epochs=3, learning_rate=5e-3, per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        activation_checkpointing=False,  # RewardConfig turns it on; here it only costs time
        bf16=False,  # RewardConfig's True fails on a machine without a GPU: pass `--bf16 true` on one
        save_strategy="no", report_to="none",
        # Several CPU processes: gloo, and use_cpu for DDP but not for DeepSpeed (see `cpu_launch_defaults`).
        **cpu_launch_defaults(),
    )  # fmt: skip
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    shutdown()
