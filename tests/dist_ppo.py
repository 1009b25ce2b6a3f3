"""Three PPO steps on a tiny policy; run by tests/test_ppo.py under two processes, with DDP or DeepSpeed ZeRO-2/3, and
in one process.

    python tests/dist_ppo.py OUT
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no tests/dist_ppo.py OUT
    accelerate launch --config_file recipes/accelerate/cpu_zero3.yaml tests/dist_ppo.py OUT

Each process writes OUT/rank<i>.pt: its policy and value weights after training, the initial weights, the completions
it was scored on, and the held-out evaluations (before the first step and after the last). DDP averages the gradients,
so the weights must be identical across processes while the completions (each process samples its own share of
prompts under its own seed) differ. The evaluation before training sees the same policy on any number of processes, so
it must give the same numbers in one process as in two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPTNeoXForCausalLM, GPTNeoXForTokenClassification

from trl_bayes import PPOConfig, PPOTrainer
from trl_bayes.distributed import cpu_launch_defaults, shutdown
from trl_bayes.synthetic import build_tokenizer, gold_reward, tiny_gpt_neox_config, world_prompts


class CountWordRecorder:
    """Rewards the word `apple` and remembers every completion it scored."""

    __name__ = "count_apple"

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.seen.extend(completions)
        return [float(c.split().count("apple")) for c in completions]


def main(out: Path) -> None:
    tokenizer = build_tokenizer()
    config = tiny_gpt_neox_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(config)
    config.num_labels = 1
    value_model = GPTNeoXForTokenClassification(config)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    # 16 completions per process and PPO step (4 x 4), 2 minibatches of 8 = 2 micro batches of 4 each.
    args = PPOConfig(
        str(out / "run"), bf16=False, report_to="none", disable_tqdm=True, save_strategy="no",
        **cpu_launch_defaults(),
        per_device_train_batch_size=4, gradient_accumulation_steps=4, num_mini_batches=2, num_ppo_epochs=2,
        max_new_tokens=6, temperature=1.0, learning_rate=3e-3, max_steps=3, adaptive_kl=True, seed=0,
        num_eval_generations=2,
    )  # fmt: skip
    reward = CountWordRecorder()
    # 10 held-out prompts x 2 completions in chunks of the local batch (16): 2 chunks, one for each of 2 processes.
    held_out = Dataset.from_dict({"prompt": world_prompts()[-10:]})
    trainer = PPOTrainer(policy, reward, args, Dataset.from_dict({"prompt": world_prompts()[:40]}), tokenizer,
                         value_model=value_model, eval_dataset=held_out, gold_reward=gold_reward)  # fmt: skip
    trainer.train()
    accelerator = trainer.accelerator
    with trainer._whole() as whole:  # every process's own weights; gathered under ZeRO-3
        policy, value = ({k: v.clone() for k, v in m.state_dict().items()} for m in (whole.policy, whole.value_model))
    record = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "policy": policy,
        "value": value,
        "initial": initial,
        "completions": reward.seen,
        "kl_coef": trainer.kl_controller.value,
        "learning_rates": [entry["learning_rate"] for entry in trainer.log_history if "learning_rate" in entry],
        "evaluations": [
            {k: v for k, v in entry.items() if k == "step" or k.startswith("eval/")}
            for entry in trainer.log_history
            if "eval/gold_reward" in entry
        ],
    }
    torch.save(record, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    shutdown()
