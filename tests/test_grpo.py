"""The drop-in: TRL's own GRPOTrainer with `reward_funcs=[PenalizedReward(...)]`."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import GPTNeoXForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_bayes import PenalizedReward
from trl_bayes.synthetic import tiny_gpt_neox_config

from .conftest import make_trainer


def test_grpo_trains_with_a_penalized_bayesian_reward(tokenizer, tmp_path):
    reward_trainer = make_trainer(tokenizer, tmp_path / "rm", num_pairs=16)
    reward_trainer.train()
    reward = PenalizedReward(reward_trainer.posterior, penalty="std", k=1.0)

    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    policy = GPTNeoXForCausalLM(config)
    prompts = Dataset.from_dict({"prompt": ["please list fruits : ", "name a few tools : "] * 4})
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=args, train_dataset=prompts, processing_class=tokenizer
    )
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "laplace/reward_std" in entry]
    assert len(logs) == 2 and all(entry["laplace/reward_std"] > 0 for entry in logs)
    assert any(f"rewards/{reward.__name__}/mean" in entry for entry in trainer.state.log_history)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "GRPO did not update the policy"
