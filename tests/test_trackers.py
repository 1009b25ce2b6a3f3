"""A real tracker (TensorBoard, in the `dev` extra): what the reward trainer, `PPOTrainer` and TRL's `GRPOTrainer` with a
`PenalizedReward` log must arrive in the event files, read back with TensorBoard's own `EventAccumulator`: the Laplace
fit and held-out metrics, `laplace/*` from the reward's `log_metric`, the proxy and gold rewards, and the KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GPTNeoXForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_bayes import PenalizedReward, PPOConfig, PPOTrainer
from trl_bayes.experiments.world import gold_reward, make_preference_dataset, tiny_gpt_neox_config, world_prompts

from .conftest import make_trainer

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard (the `dev` extra) reads the logs"
)


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`, by tag: `(step, value)` in logging order."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    folders = sorted({path.parent for path in directory.rglob("events.out.tfevents.*")})
    assert folders, f"no TensorBoard event file under {directory}"
    for folder in folders:
        accumulator = event_accumulator.EventAccumulator(str(folder))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


@pytest.fixture(scope="module")
def reward_trainer(tokenizer, tmp_path_factory):
    trainer = make_trainer(tokenizer, tmp_path_factory.mktemp("rm"), num_pairs=16, report_to=["tensorboard"])
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def policy_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("policy")
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_trainer_logs_the_fit_and_the_held_out_metrics(reward_trainer):
    metrics = reward_trainer.evaluate_posterior(make_preference_dataset(8, seed=5))
    scalars = read_scalars(Path(reward_trainer.args.output_dir))
    # transformers' TensorBoardCallback files training logs under `train/`.
    (step, prior), *_ = scalars["train/laplace/prior_precision"]
    assert step == reward_trainer.state.global_step
    assert prior == pytest.approx(reward_trainer.posterior.prior_precision, rel=1e-6)
    assert "train/laplace/log_marglik" in scalars and "train/train_loss" in scalars
    for name in ("map_accuracy", "map_nll", "map_ece", "laplace_probit_nll", "laplace_ece", "num_pairs"):
        (_, value), *_ = scalars[f"train/laplace/eval_{name}"]
        assert value == pytest.approx(metrics[name], rel=1e-6), name


def test_ppo_logs_proxy_penalty_gold_and_kl(reward_trainer, policy_dir, tokenizer, tmp_path):
    args = PPOConfig(
        str(tmp_path / "ppo"), use_cpu=True, bf16=False, report_to=["tensorboard"], run_name="ppo", disable_tqdm=True,
        save_strategy="no", seed=0, per_device_train_batch_size=8, num_ppo_epochs=1, max_new_tokens=6, max_steps=2,
        logging_steps=1, num_eval_generations=1,
    )  # fmt: skip
    prompts = world_prompts()
    trainer = PPOTrainer(
        str(policy_dir), PenalizedReward(reward_trainer.posterior, uncertainty="marginal", scale="absolute"), args,
        Dataset.from_dict({"prompt": prompts[:16]}), tokenizer,
        eval_dataset=Dataset.from_dict({"prompt": prompts[-4:]}), gold_reward=gold_reward,
    )  # fmt: skip
    history = trainer.train()
    scalars = read_scalars(tmp_path / "ppo")
    logged = {(entry["step"], name): value for entry in history for name, value in entry.items() if name != "step"}
    for name in ("objective/scores", "objective/kl", "laplace/reward", "laplace/map_reward", "laplace/reward_std",
                 "eval/gold_reward", "eval/reward", "eval/kl", "eval/laplace/reward_std"):  # fmt: skip
        assert name in scalars, f"{name} not in the event files: {sorted(scalars)}"
        for step, value in scalars[name]:
            assert value == pytest.approx(logged[(step, name)], rel=1e-5, abs=1e-6), (name, step)
    assert [step for step, _ in scalars["eval/gold_reward"]] == [0, 2]  # before training and at the end


def test_grpo_logs_the_penalty_parts_gold_and_kl(reward_trainer, policy_dir, tokenizer, tmp_path):
    # The gold reward as a second reward function of weight 0: TRL logs it (`rewards/gold_reward/mean`), the policy
    # does not see it. beta > 0 makes GRPO compute and log the KL to its reference policy.
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), use_cpu=True, bf16=False, report_to=["tensorboard"], max_steps=2,
        logging_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=6, beta=0.04,
        learning_rate=1e-2, save_strategy="no", disable_tqdm=True, reward_weights=[1.0, 0.0],
    )  # fmt: skip
    reward = PenalizedReward(reward_trainer.posterior, penalty="std", k=1.0, uncertainty="relative")  # groups of 4
    trainer = GRPOTrainer(
        model=str(policy_dir), reward_funcs=[reward, gold_reward], args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": world_prompts()[:8]}),
    )  # fmt: skip
    trainer.train()
    scalars = read_scalars(tmp_path / "grpo")
    logged = [entry for entry in trainer.state.log_history if "laplace/reward_std" in entry]
    assert len(logged) == 2
    for name in ("laplace/reward", "laplace/map_reward", "laplace/reward_std", "rewards/penalized_reward/mean",
                 "rewards/gold_reward/mean", "kl", "reward"):  # fmt: skip
        assert f"train/{name}" in scalars, f"train/{name} not in the event files: {sorted(scalars)}"
        assert [value for _, value in scalars[f"train/{name}"]] == pytest.approx(
            [entry[name] for entry in logged], rel=1e-5, abs=1e-6
        ), name
