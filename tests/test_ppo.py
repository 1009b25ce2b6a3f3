"""PPOTrainer: the PPO math (`trl_bayes.rlhf`) against hand-computed tensors, tiny runs on a rule-based reward (the
reward rises, the reference stays frozen), the LoRA path, resume equals an uninterrupted run, fail-fast errors, the
held-out evaluation, two processes."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import GPTNeoXForCausalLM

from trl_bayes import PenalizedReward, PPOConfig, PPOTrainer, evaluate_policy
from trl_bayes.rlhf import (
    AdaptiveKLController,
    gae_advantages,
    kl_penalty,
    policy_loss,
    shaped_rewards,
    value_loss,
    whiten,
)
from trl_bayes.synthetic import CATEGORIES, build_tokenizer, gold_reward, tiny_gpt_neox_config, world_prompts

from .conftest import make_trainer
from .test_distributed import _launch, _run

# ---------------------------------------------------------------------------------------------------------------------
# Pure functions, hand-computed


def test_whiten_masks_padding_and_normalizes_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # Valid tokens 1, 2, 3: mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3); the padded 100 is ignored.
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1 / s, 0.0, 1 / s, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[2 - 1 / s, 2.0, 2 + 1 / s, 0.0]]))


def test_kl_estimators():
    logprobs, ref_logprobs = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.2]]))
    # k1 = log p - log q = log(0.5 / 0.25) = log 2; with r = q / p = 1/2: k3 = (r - 1) - log r = -0.5 + log 2.
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[math.log(2), 0.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([[math.log(2) - 0.5, 0.0]]))
    with pytest.raises(ValueError, match="Unknown KL estimator 'k2'"):
        kl_penalty(logprobs, ref_logprobs, "k2")


def test_shaped_rewards_put_the_score_on_the_last_completion_token():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # -0.5 * kl on completion tokens; the score lands on token 1 (row 0, two tokens) and token 2 (row 1).
    expected = torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.2, -0.25, -0.3 - 1.0]])
    torch.testing.assert_close(shaped_rewards(scores, kl, mask, kl_coef=0.5), expected)


def test_gae_advantages_and_returns():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Row 0, gamma 1, lam 0.5: d2 = 1 - 0.7 = 0.3; d1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.5 * 0.3 = 0.25;
    # d0 = 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.5 * 0.25 = 0.225. Returns = A + V.
    advantages, returns = gae_advantages(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0]]))
    # Row 1 ends after token 1 (the masked reward 9 and value 0.7 are ignored), gamma 0.9, lam 1:
    # d1 = 1 + 0.9 * 0 - 0.6 = 0.4 = A1; d0 = 0.9 * 0.6 - 0.5 = 0.04, A0 = 0.04 + 0.9 * 0.4 = 0.4.
    advantages, returns = gae_advantages(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.4, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.9, 1.0, 0.0]]))


def test_policy_loss_clips_and_masks():
    logprobs = torch.log(torch.tensor([[0.6, 0.3, 0.9]]))
    old_logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.01]]))
    advantages = torch.tensor([[1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: its huge ratio and advantage must not count
    # Ratios 1.2 and 0.6, clip 0.1: token 0 max(-1.2, -1.1) = -1.1 (clipped); token 1 max(0.6, 0.9) = 0.9 (clipped).
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.1)
    torch.testing.assert_close(loss, torch.tensor((-1.1 + 0.9) / 2))
    torch.testing.assert_close(clipfrac, torch.tensor(1.0))
    torch.testing.assert_close(approx_kl, torch.tensor(0.5 * (math.log(1.2) ** 2 + math.log(0.6) ** 2) / 2))
    # At ratio 1 (the first PPO epoch) the loss is -mean(A) and nothing is clipped.
    loss, clipfrac, _ = policy_loss(old_logprobs, old_logprobs, advantages, mask)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    assert clipfrac.item() == 0.0


def test_value_loss_clips():
    values, old_values = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    returns, mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # clip 0.2: token 0 clipped value 0.7, errors (0, 0.09) -> 0.09 (clipped); token 1 clipped 0.3, errors (1, 0.49) -> 1.
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.09 + 1.0) / 2))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 12 = 2x target: error clipped to 0.2 -> 0.1 * (1 + 0.2 * 10 / 100) = 0.102.
    assert controller.update(12.0, n_steps=10) == pytest.approx(0.102)
    # KL 3: error -0.5, clipped to -0.2 -> 0.102 * (1 - 0.02).
    assert controller.update(3.0, n_steps=10) == pytest.approx(0.102 * 0.98)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny runs


class CountWord:
    """A rule-based reward: how many of the completion's words are in `words` (default: the fruits)."""

    __name__ = "count_word"

    def __init__(self, words=tuple(CATEGORIES["fruits"])):
        self.words = set(words)

    def __call__(self, prompts, completions, **kwargs):
        return [float(sum(w in self.words for w in c.split())) for c in completions]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=1
    )
    path = tmp_path_factory.mktemp("policy")
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ppo_args(tmp_path, **kwargs) -> PPOConfig:
    defaults = dict(
        use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, save_strategy="no", seed=0,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, num_mini_batches=1, num_ppo_epochs=2,
        max_new_tokens=8, temperature=1.0, learning_rate=3e-3, kl_coef=0.01, max_steps=2,
    )  # fmt: skip
    defaults.update(kwargs)
    return PPOConfig(str(tmp_path / "out"), **defaults)


def prompts(n: int = 32) -> Dataset:
    return Dataset.from_dict({"prompt": world_prompts()[:n]})


def test_reward_rises_and_reference_stays_frozen(policy_dir, tmp_path):
    tokenizer = build_tokenizer()
    policy = GPTNeoXForCausalLM.from_pretrained(policy_dir)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    # A constant rate: completions now end at a sampled pad token (as in TRL), which this random policy samples often,
    # so the reward rises more slowly than with pads kept as tokens; a schedule decaying to 0 left it at the margin.
    args = ppo_args(
        tmp_path, max_steps=12, per_device_train_batch_size=16, gradient_accumulation_steps=1, num_ppo_epochs=4,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = PPOTrainer(policy, CountWord(), args, prompts(), tokenizer)
    history = trainer.train()
    scores = [h["objective/scores"] for h in history]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.5, scores
    for name, value in trainer.ref_model.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    changed = [k for k, v in trained.items() if v.dtype.is_floating_point and not torch.equal(v, initial[k])]
    assert len(changed) > len(initial) // 2
    expected = {"objective/kl", "objective/entropy", "policy/clipfrac", "val/clipfrac", "loss/value", "kl_coef"}
    assert expected <= set(history[-1]) and {"time/generation", "time/scoring", "time/optimization"} <= set(
        history[-1]
    )


def test_lora_policy_uses_the_disabled_adapter_as_reference(policy_dir, tmp_path):
    tokenizer = build_tokenizer()
    policy = GPTNeoXForCausalLM.from_pretrained(policy_dir)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value"])
    trainer = PPOTrainer(policy, CountWord(), ppo_args(tmp_path, max_steps=2), prompts(), tokenizer,
                         peft_config=peft_config)  # fmt: skip
    assert trainer.ref_model is None  # no second copy of the policy
    history = trainer.train()
    # The first step's KL is exactly 0: before any update the adapter (B = 0) changes nothing.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())
    for name, value in model.get_base_model().state_dict().items():
        if "lora" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(value, base[key], rtol=0, atol=0, msg=name)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_bayesian_reward_model_directly_logs_the_penalty_parts(policy_dir, tmp_path):
    reward_trainer = make_trainer(build_tokenizer(), tmp_path / "rm", num_pairs=16)
    reward_trainer.train()
    trainer = PPOTrainer(str(policy_dir), reward_trainer.posterior, ppo_args(tmp_path, max_steps=1), prompts(),
                         build_tokenizer())  # fmt: skip
    # The default penalty (std), on the marginal variance: PPO scores one completion per prompt.
    assert isinstance(trainer.reward_func, PenalizedReward) and trainer.reward_func.penalty.value == "std"
    assert trainer.reward_func.uncertainty == "marginal"
    (entry,) = trainer.train()
    # The penalty's parts, through the TRL reward protocol's `log_metric`: reward mean and std under the posterior.
    assert entry["laplace/reward_std"] > 0
    assert entry["objective/scores"] == pytest.approx(entry["laplace/reward"], abs=1e-5)


def test_conversational_prompts_go_through_the_chat_template(policy_dir, tmp_path):
    """Conversations are rendered with the tokenizer's chat template, as every TRL trainer does, and the reward gets
    the completions as assistant messages: the same samples and scores as the rendered text, same seed."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    texts = world_prompts()[:32]
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append((prompts[0], completions[0]))
        texts_ = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return CountWord()(prompts, texts_)

    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    history_chat = PPOTrainer(
        str(policy_dir), reward, ppo_args(tmp_path / "chat", max_steps=2), chat, tokenizer
    ).train()
    chat_prompt, chat_completion = seen[0]
    assert chat_prompt[0]["role"] == "user" and chat_completion[0]["role"] == "assistant"
    history_text = PPOTrainer(
        str(policy_dir), reward, ppo_args(tmp_path / "text", max_steps=2), prompts(), tokenizer
    ).train()
    text_prompt, text_completion = seen[2]
    assert text_prompt == chat_prompt[0]["content"] and text_completion == chat_completion[0]["content"]
    assert [h["objective/scores"] for h in history_chat] == [h["objective/scores"] for h in history_text]


def _no_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def test_resume_from_checkpoint_equals_uninterrupted_run(policy_dir, tmp_path):
    tokenizer = build_tokenizer()
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, eval_steps=2, adaptive_kl=True)
    gold = dict(eval_dataset=Dataset.from_dict({"prompt": world_prompts()[-6:]}), gold_reward=gold_reward)
    full_args = ppo_args(tmp_path / "full", **kwargs)
    full = PPOTrainer(str(policy_dir), CountWord(), full_args, prompts(), tokenizer, **gold)
    full_history = full.train()
    assert (tmp_path / "full" / "out" / "checkpoint-2").is_dir() and (
        tmp_path / "full" / "out" / "checkpoint-4"
    ).is_dir()
    assert [h["step"] for h in full_history if "eval/gold_reward" in h] == [0, 2, 4]

    # A run "killed" after step 2: only checkpoint-2 is left; a new trainer resumes from it.
    resumed_args = ppo_args(tmp_path / "resumed", **kwargs)
    shutil.copytree(tmp_path / "full" / "out" / "checkpoint-2", Path(resumed_args.output_dir) / "checkpoint-2")
    resumed = PPOTrainer(str(policy_dir), CountWord(), resumed_args, prompts(), tokenizer, **gold)
    resumed_history = resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4
    assert _no_times(resumed_history) == _no_times(full_history)
    for trainer_model in ("model", "value_model"):
        a = full.accelerator.unwrap_model(getattr(full, trainer_model)).state_dict()
        b = resumed.accelerator.unwrap_model(getattr(resumed, trainer_model)).state_dict()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


class LoggingCountWord(CountWord):
    """CountWord that logs the batch mean of the completions' word counts, as TRL reward functions log."""

    def __call__(self, prompts, completions, log_metric=None, **kwargs):
        if log_metric is not None:
            log_metric("count/words", sum(len(c.split()) for c in completions) / len(completions))
        return super().__call__(prompts, completions)


def test_evaluate_is_evaluate_policy_with_the_trainers_settings(policy_dir, tmp_path):
    """PPO's evaluation is `evaluate_policy` on the held-out prompts, under `eval_seed`, in chunks of
    `rollout_batch_size`, against the disabled adapter; repeated evaluations draw the same samples, and the training
    RNG is left alone."""
    tokenizer = build_tokenizer()
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value"])
    held_out = world_prompts()[-6:]
    args = ppo_args(tmp_path, max_steps=1, rollout_batch_size=5, num_eval_generations=2, eval_seed=11)
    trainer = PPOTrainer(str(policy_dir), LoggingCountWord(), args, prompts(), tokenizer, peft_config=peft_config,
                         eval_dataset=Dataset.from_dict({"prompt": held_out}), gold_reward=gold_reward)  # fmt: skip
    trainer.train()  # the adapter moves away from the base model: the KL is not 0
    state = torch.get_rng_state()
    got = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer.evaluate() == got
    expected = evaluate_policy(
        trainer.model, tokenizer, held_out, gold_reward, trainer.reward_func, trainer.generation_config,
        num_generations=2, seed=11, chunk_size=5,
    )  # fmt: skip
    assert got == {
        "eval/gold_reward": expected["gold_reward"],
        "eval/reward": expected["proxy_reward"],
        "eval/kl": expected["kl"],
        "eval/count/words": expected["count/words"],
    }
    assert got["eval/kl"] != 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Fail fast


class BadReward:
    __name__ = "bad_reward"

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, prompts, completions, **kwargs):
        if self.kind == "short":
            return [1.0] * (len(completions) - 1)
        if self.kind == "none":
            return [None] + [1.0] * (len(completions) - 1)
        return [float("nan")] * len(completions)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("short", "returned 15 rewards for 16 completions"),
        ("none", "returned None for some completions"),
        ("nan", "returned NaN or infinite rewards"),
    ],
)
def test_bad_rewards_fail_fast(policy_dir, tmp_path, kind, message):
    trainer = PPOTrainer(str(policy_dir), BadReward(kind), ppo_args(tmp_path), prompts(), build_tokenizer())
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_tokenizer_without_pad_token_fails_fast(policy_dir, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="has no pad token"):
        PPOTrainer(str(policy_dir), CountWord(), ppo_args(tmp_path), prompts(), tokenizer)


def test_prompts_longer_than_the_context_fail_fast(policy_dir, tmp_path):
    long_prompt = Dataset.from_dict({"prompt": ["apple " * 125]})  # 125 tokens + 8 new > 128 positions
    with pytest.raises(ValueError, match="longest prompt has 125 tokens; with max_new_tokens=8 it exceeds"):
        PPOTrainer(str(policy_dir), CountWord(), ppo_args(tmp_path), long_prompt, build_tokenizer())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_estimator": "k2"}, "PPOConfig.kl_estimator='k2'"),
        ({"gamma": 1.5}, r"PPOConfig.gamma=1.5: must be in \[0, 1\]"),
        ({"num_ppo_epochs": 0}, "PPOConfig.num_ppo_epochs=0"),
        ({"total_episodes": 64}, "total_episodes=64 and max_steps=2 both set the number of PPO steps"),
    ],
)
def test_bad_config_fails_fast(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ppo_args(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_two_processes_keep_the_policies_identical_under_ddp_zero2_zero3(tmp_path):
    """DDP, ZeRO-2 and ZeRO-3 (recipes/accelerate/cpu_*.yaml): each process samples its own completions, the policy
    and value weights stay identical across processes, and the three agree up to reduction order. The held-out
    evaluation of the initial policy gives exactly the numbers of one process (its chunks are seeded, not its ranks)."""
    script = Path(__file__).with_name("dist_ppo.py")
    (tmp_path / "one").mkdir()
    _run([sys.executable, str(script), str(tmp_path / "one")])
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert one["num_processes"] == 1 and [e["step"] for e in one["evaluations"]] == [0, 3]
    runs = {}
    for config in ("ddp", "zero2", "zero3"):
        (tmp_path / config).mkdir()
        _run(_launch(config, script, str(tmp_path / config)))
        ranks = [torch.load(tmp_path / config / f"rank{r}.pt") for r in (0, 1)]
        assert ranks[0]["num_processes"] == ranks[1]["num_processes"] == 2
        assert ("DEEPSPEED" in ranks[0]["distributed_type"]) == (config != "ddp")
        assert ranks[0]["completions"] != ranks[1]["completions"], "each process must sample its own completions"
        # Evaluation: both processes report the gathered means; before training, exactly those of one process.
        assert ranks[0]["evaluations"] == ranks[1]["evaluations"], config
        assert ranks[0]["evaluations"][0] == one["evaluations"][0], config
        assert {"eval/gold_reward", "eval/reward", "eval/kl"} <= set(one["evaluations"][0])
        for part in ("policy", "value"):
            for name, value in ranks[0][part].items():
                torch.testing.assert_close(ranks[1][part][name], value, rtol=0, atol=0, msg=f"{config} {part}: {name}")
        # The linear schedule counts PPO steps (3), as TRL's, the same on every process: PPO step s (from 0) runs at
        # lr = 3e-3 (1 - s / 3), as on one process (Accelerate's default would step it once per process).
        assert ranks[0]["learning_rates"] == pytest.approx([3e-3, 2e-3, 1e-3], abs=1e-12), config
        changed = [k for k, v in ranks[0]["policy"].items() if not torch.equal(v, ranks[0]["initial"][k])]
        assert len(changed) == len(ranks[0]["policy"]), f"{config}: not every policy weight trained"
        runs[config] = ranks[0]
    for config in ("zero2", "zero3"):
        # The same completions (sampling sees weights equal to ~1e-6), and weights equal up to the order of the
        # gradient reductions (DeepSpeed buckets and averages differently from DDP), amplified by 3 steps x 4 Adam
        # updates at lr <= 3e-3: about 1e-5 (measured 6e-6).
        assert runs[config]["completions"] == runs["ddp"]["completions"], config
        for part in ("policy", "value"):
            for name, value in runs["ddp"][part].items():
                torch.testing.assert_close(runs[config][part][name], value, rtol=0, atol=1e-4, msg=f"{config}: {name}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
