"""The drop-in: TRL's own GRPOTrainer and RLOOTrainer with `reward_funcs=[PenalizedReward(...)]`."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import GPTNeoXForCausalLM
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_bayes import PenalizedReward
from trl_bayes.synthetic import tiny_gpt_neox_config

from .conftest import make_trainer


class RecordingReward(PenalizedReward):
    """Records the prompts of every call, to check that TRL hands over whole groups of `num_generations`."""

    calls: list

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append(list(prompts))
        return super().__call__(prompts, completions, **kwargs)


@pytest.mark.parametrize(
    ("trainer_cls", "config_cls", "uncertainty"),
    [(GRPOTrainer, GRPOConfig, "marginal"), (RLOOTrainer, RLOOConfig, "relative"), (GRPOTrainer, GRPOConfig, None)],
)
def test_trl_trainer_trains_with_a_penalized_bayesian_reward(
    tokenizer, tmp_path, trainer_cls, config_cls, uncertainty
):
    reward_trainer = make_trainer(tokenizer, tmp_path / "rm", num_pairs=16)
    reward_trainer.train()
    if uncertainty is None:  # the library's defaults: hidden-state typicality, k in prompt reward sds
        reward = RecordingReward(reward_trainer.posterior)
    else:
        reward = RecordingReward(reward_trainer.posterior, penalty="std", k=1.0, uncertainty=uncertainty)
    reward.calls = []

    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    # Saved and passed by path, as users pass a Hub name: RLOO rebuilds its frozen reference policy from it.
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "policy")
    prompts = Dataset.from_dict({"prompt": ["please list fruits : ", "name a few tools : "] * 4})
    args = config_cls(
        output_dir=str(tmp_path / "policy_out"),
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
    trainer = trainer_cls(
        model=str(tmp_path / "policy"),
        reward_funcs=[reward],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    metric = "laplace/reward_std" if uncertainty else "typicality/hidden_mahalanobis"
    logs = [entry for entry in trainer.state.log_history if metric in entry]
    assert len(logs) == 2 and all(entry[metric] > 0 for entry in logs)
    assert any(f"rewards/{reward.__name__}/mean" in entry for entry in trainer.state.log_history)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, f"{trainer_cls.__name__} did not update the policy"
    # Group uncertainties and scale="prompt" measure each completion within its group: every call must hold whole
    # groups (4 per prompt).
    assert reward.calls and all(
        all(call.count(p) % args.num_generations == 0 for p in set(call)) for call in reward.calls
    )
