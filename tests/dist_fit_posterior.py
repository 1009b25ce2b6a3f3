"""Fit posteriors on a fixed tiny model and data set; run by tests/test_distributed.py under 1 and 2 processes.

    python tests/dist_fit_posterior.py OUT
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        tests/dist_fit_posterior.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import GPTNeoXForSequenceClassification

from trl_bayes import BayesianRewardConfig, BayesianRewardTrainer
from trl_bayes.distributed import shutdown
from trl_bayes.synthetic import build_tokenizer, make_preference_dataset, tiny_gpt_neox_config


def main(out: Path) -> None:
    tokenizer = build_tokenizer()
    pairs = make_preference_dataset(22, seed=5)
    for structure, method in [("kron", "marglik"), ("diag", "gridsearch")]:
        torch.manual_seed(0)
        config = tiny_gpt_neox_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
        model = GPTNeoXForSequenceClassification(config)
        args = BayesianRewardConfig(
            str(out / structure),
            use_cpu=True,
            bf16=False,
            report_to="none",
            disable_tqdm=True,
            # gloo: the CPU process group; a single plain process has none to configure.
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            hessian_structure=structure,
            optimize_prior_precision=method,
            posterior_batch_size=3,
            prior_precision_grid=[0.1, 0.3, 1.0, 3.0, 10.0],
            posterior_val_fraction=0.3,
        )
        lora = LoraConfig(
            task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query_key_value"], init_lora_weights=False
        )
        trainer = BayesianRewardTrainer(
            model, args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora
        )
        posterior = trainer.fit_posterior()
        mean, var = posterior.predict(pairs["prompt"][:5], pairs["chosen"][:5])
        trainer.save_model(str(out / structure))
        if trainer.accelerator.is_main_process:
            info = {"num_processes": trainer.accelerator.num_processes, "mean": mean.tolist(), "var": var.tolist()}
            (out / structure / "predictions.json").write_text(json.dumps(info))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    shutdown()
