"""A TRL 1.12 `PPOTrainer` setup ported onto `trl_bayes.PPOTrainer`: one test per friction found porting TRL's PPO
example (docs/ppo_from_trl.md). Each checks behaviour: the same meaning as in TRL, or an early error that names our
field."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    GenerationConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    TrainerCallback,
)

import trl_bayes.ppo_trainer as ppo_trainer
from trl_bayes import PPOConfig, PPOTrainer
from trl_bayes.generation import GenerationOutput, end_at_pad, generate
from trl_bayes.synthetic import CATEGORIES, build_tokenizer, tiny_gpt_neox_config, world_prompts


def count_fruits(prompts, completions, **kwargs):
    return [float(sum(w in CATEGORIES["fruits"] for w in c.split())) for c in completions]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def policy(tokenizer):
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=1)
    return GPTNeoXForCausalLM(config)


def trl_args(tmp_path, **kwargs) -> PPOConfig:
    """TRL's PPO example settings, scaled down: TRL's names and values."""
    defaults = dict(
        use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, save_strategy="no", seed=0,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2,
        response_length=6, stop_token="eos", temperature=1.0, learning_rate=3e-3, total_episodes=16,
    )  # fmt: skip
    defaults.update(kwargs)
    return PPOConfig(str(tmp_path / "out"), **defaults)


def prompts(n: int = 32) -> Dataset:
    return Dataset.from_dict({"prompt": world_prompts()[:n]})


class Recorder(TrainerCallback):
    def __init__(self, stop_at: int | None = None):
        self.events, self.steps, self.logs, self.stop_at = [], [], [], stop_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("train_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append("train_end")


# 1. The batch: TRL's per_device_train_batch_size x gradient_accumulation_steps per update, split into minibatches.
def test_trl_batch_values_give_trls_updates_and_optimizer_steps(policy, tokenizer, tmp_path, monkeypatch):
    # TRL: local batch 8 x 1 = 8 per update, 2 minibatches of 4, 16 episodes -> 2 updates of 2 epochs x 2 steps.
    args = trl_args(tmp_path)
    assert (args.local_batch_size, args.local_mini_batch_size, args.local_micro_batch_size) == (8, 4, 4)
    trainer = PPOTrainer(policy, count_fruits, args, prompts(), tokenizer)
    assert trainer.max_steps == 2
    rows, steps = [], []
    forward = ppo_trainer.PolicyAndValue.forward
    monkeypatch.setattr(ppo_trainer.PolicyAndValue, "forward", lambda self, **x: rows.append(len(x["input_ids"])) or forward(self, **x))  # fmt: skip
    trainer.optimizer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: steps.append(1))
    trainer.train()
    assert rows == [4] * 8 and len(steps) == 8  # 2 updates x 2 epochs x 2 minibatches, one micro batch of 4 each
    # Micro batches smaller than a minibatch accumulate into one optimizer step.
    args = trl_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert (args.local_batch_size, args.local_mini_batch_size, args.local_micro_batch_size) == (8, 4, 2)
    assert PPOTrainer(policy, count_fruits, args, prompts(), tokenizer).accelerator.gradient_accumulation_steps == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_device_train_batch_size": 6, "num_mini_batches": 4}, "6 \\* 1 = 6 completions per process must split"),
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}, "a minibatch of 6 completions"),
        ({"max_steps": 3}, "total_episodes=16 and max_steps=3 both set"),
    ],
)
def test_batch_settings_that_do_not_divide_fail_in_the_config(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trl_args(tmp_path, **kwargs)


# 2. max_grad_norm clips by default (documented); 0 gives TRL 1.12's unclipped updates.
@pytest.mark.parametrize(("max_grad_norm", "clips"), [(1.0, 8), (0.0, 0)])
def test_max_grad_norm_clips_each_optimizer_step_and_zero_turns_it_off(
    policy, tokenizer, tmp_path, monkeypatch, max_grad_norm, clips
):
    trainer = PPOTrainer(policy, count_fruits, trl_args(tmp_path, max_grad_norm=max_grad_norm), prompts(), tokenizer)
    calls = []
    clip = trainer.accelerator.clip_grad_norm_
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]) or clip(*a, **k))
    trainer.train()
    assert calls == [max_grad_norm] * clips
    assert "1.12's PPO ignored this field and never clipped" in " ".join(PPOConfig.__doc__.split())


# 3. optim is honoured, as `Trainer.create_optimizer` honours it.
@pytest.mark.parametrize(
    ("optim", "expected"), [("adamw_torch_fused", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)]
)  # fmt: skip
def test_optim_builds_the_optimizer_trainer_would(policy, tokenizer, tmp_path, optim, expected):
    args = trl_args(tmp_path, optim=optim, weight_decay=0.1)
    trainer = PPOTrainer(policy, count_fruits, args, prompts(), tokenizer)
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is expected
    # Weight decay on matrices, not on biases and layer norms (Trainer.get_decay_parameter_names).
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): n for n, p in trainer.policy_and_value.named_parameters()}
    assert decayed and all("bias" not in names[i] and "layernorm" not in names[i] for i in decayed)
    trainable = sum(p.numel() for p in trainer.policy_and_value.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable


# 4. The schedule counts PPO updates; the logged learning rate is the one each update used.
def test_schedule_steps_once_per_update_and_logs_the_rate_it_used(policy, tokenizer, tmp_path):
    args = trl_args(tmp_path, total_episodes=24, lr_scheduler_type="linear")
    trainer = PPOTrainer(policy, count_fruits, args, prompts(), tokenizer)
    used = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"])
    )
    history = trainer.train()
    # 3 updates, linear from 3e-3 to 0 over 3: updates run at 3e-3, 2e-3, 1e-3, each for all its 4 optimizer steps.
    assert [h["learning_rate"] for h in history] == pytest.approx([3e-3, 2e-3, 1e-3])
    assert used == pytest.approx([3e-3] * 4 + [2e-3] * 4 + [1e-3] * 4)


# 5. A value model must give one value per token: checked at construction.
def test_a_sequence_classification_value_model_fails_at_construction(policy, tokenizer, tmp_path):
    config = tiny_gpt_neox_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    with pytest.raises(ValueError, match=r"shape \(1, 1\).*one value per token, shape \(1, 2, 1\)"):
        PPOTrainer(policy, count_fruits, trl_args(tmp_path), prompts(), tokenizer,
                   value_model=GPTNeoXForSequenceClassification(config))  # fmt: skip
    PPOTrainer(policy, count_fruits, trl_args(tmp_path), prompts(), tokenizer,
               value_model=GPTNeoXForTokenClassification(config))  # fmt: skip


# 6. TRL's names are accepted (or refused naming ours); pre-tokenized prompts are accepted.
def test_trl_names_map_onto_ours(tmp_path):
    args = trl_args(tmp_path, response_length=9, local_rollout_forward_batch_size=4, whiten_rewards=True)
    assert (args.max_new_tokens, args.rollout_batch_size, args.whiten_rewards) == (9, 4, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"response_length": 9, "max_new_tokens": 12}, "response_length=9 .* and max_new_tokens=12 disagree"),
        ({"stop_token": "</s>"}, "stop_token='</s>': only 'eos'.*set stop_token_id"),
        ({"stop_token_id": 5}, "set stop_token='eos' or stop_token_id, not both"),
        ({"num_sample_generations": 10}, "prints no sample tables.*eval_steps"),
    ],
)
def test_trl_names_we_do_not_offer_fail_naming_ours(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trl_args(tmp_path, **kwargs)


def test_whiten_rewards_rescales_the_shaped_rewards(policy, tokenizer, tmp_path, monkeypatch):
    calls = []
    whiten = ppo_trainer.rlhf.whiten
    monkeypatch.setattr(ppo_trainer.rlhf, "whiten", lambda x, m, shift_mean=True: calls.append(shift_mean) or whiten(x, m, shift_mean))  # fmt: skip
    PPOTrainer(policy, count_fruits, trl_args(tmp_path, whiten_rewards=True, total_episodes=8), prompts(), tokenizer).train()  # fmt: skip
    assert calls == [False, True]  # the rewards (mean kept), then the advantages


def test_pretokenized_prompts_are_accepted(policy, tokenizer, tmp_path):
    texts = world_prompts()[:16]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    padded = [row + [tokenizer.pad_token_id] * 2 for row in ids]  # padding is dropped, as TRL masks it
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(prompts)
        return count_fruits(prompts, completions)

    trainer = PPOTrainer(policy, reward, trl_args(tmp_path, total_episodes=8), Dataset.from_dict({"input_ids": padded}), tokenizer)  # fmt: skip
    assert trainer.train_prompt_ids == ids
    trainer.train()
    assert set(seen) <= {tokenizer.decode(row, skip_special_tokens=True) for row in ids} and seen
    # With a prompt column too, the rewards see its text.
    both = Dataset.from_dict({"input_ids": ids, "prompt": texts})
    trainer = PPOTrainer(policy, count_fruits, trl_args(tmp_path), both, tokenizer, eval_dataset=both)
    assert trainer.train_prompts == texts and trainer.eval_prompt_ids == ids
    with pytest.raises(ValueError, match="needs a 'prompt' column .* or an 'input_ids' column"):
        PPOTrainer(policy, count_fruits, trl_args(tmp_path), Dataset.from_dict({"query": texts}), tokenizer)


# 7. total_episodes rounds up; without it (or max_steps), num_train_epochs passes over the prompts, as in TRL.
@pytest.mark.parametrize(("kwargs", "steps"), [({"total_episodes": 20}, 3), ({"total_episodes": None, "num_train_epochs": 1}, 4)])  # fmt: skip
def test_total_episodes_round_up_and_default_to_epochs(policy, tokenizer, tmp_path, kwargs, steps):
    trainer = PPOTrainer(policy, count_fruits, trl_args(tmp_path, **kwargs), prompts(), tokenizer)
    assert trainer.max_steps == steps  # ceil(20 / 8) = 3; 1 epoch of 32 prompts / 8 = 4


# 8. A reward function's signature is checked before anything runs.
def test_a_reward_without_kwargs_fails_at_construction(policy, tokenizer, tmp_path):
    def strict(prompts, completions):
        return [0.0] * len(prompts)

    with pytest.raises(TypeError, match=r"reward_func \(strict\(prompts, completions\)\) does not accept completion_ids, log_metric.*\*\*kwargs"):  # fmt: skip
        PPOTrainer(policy, strict, trl_args(tmp_path), prompts(), tokenizer)
    with pytest.raises(TypeError, match="gold_reward .* does not accept"):
        PPOTrainer(policy, count_fruits, trl_args(tmp_path), prompts(), tokenizer, gold_reward=strict)
    with pytest.raises(TypeError, match="requires category, which nobody passes"):
        PPOTrainer(policy, lambda prompts, completions, category, **kw: [], trl_args(tmp_path), prompts(), tokenizer)
    # TRL 1.12's reward_model (a sequence classifier) is refused with what to pass instead.
    reward_model = GPTNeoXForSequenceClassification(tiny_gpt_neox_config(len(tokenizer), num_labels=1))
    with pytest.raises(TypeError, match="reward_func is a model .* must be a TRL reward function"):
        PPOTrainer(policy, reward_model, trl_args(tmp_path), prompts(), tokenizer)


# 9. TrainerCallbacks, with TrainerState / TrainerControl as in TRL's trainers.
def test_callbacks_see_each_step_and_each_log_and_can_stop(policy, tokenizer, tmp_path):
    recorder = Recorder(stop_at=2)
    trainer = PPOTrainer(policy, count_fruits, trl_args(tmp_path, total_episodes=40), prompts(), tokenizer,
                         callbacks=[recorder])  # fmt: skip
    history = trainer.train()
    assert recorder.events == ["train_begin", "train_end"]
    assert recorder.steps == [1, 2] and trainer.global_step == 2 < trainer.max_steps == 5  # stopped after step 2
    assert [log["objective/scores"] for log in recorder.logs] == [h["objective/scores"] for h in history]
    assert trainer.state.log_history is trainer.log_history and trainer.state.max_steps == 5
    assert [h["episode"] for h in history] == [8, 16]


# 11. Without a value model, the value model's backbone is the policy's in memory (not the checkpoint on disk).
def test_the_default_value_model_starts_from_the_in_memory_policy(policy, tokenizer, tmp_path):
    policy.save_pretrained(tmp_path / "policy")
    with torch.no_grad():
        policy.gpt_neox.embed_in.weight.add_(1.0)  # changed in memory only
    trainer = PPOTrainer(policy, count_fruits, trl_args(tmp_path), prompts(), tokenizer)
    value_backbone = trainer.value_model.gpt_neox.state_dict()
    for name, tensor in trainer.model.gpt_neox.state_dict().items():
        torch.testing.assert_close(value_backbone[name], tensor, rtol=0, atol=0, msg=name)
        assert value_backbone[name].data_ptr() != tensor.data_ptr(), f"{name} shares the policy's storage"
    assert trainer.value_model.classifier.out_features == 1


# 12. A pad token sampled before EOS ends the completion in PPO (TRL's cut); generate keeps it (Best-of-n).
def test_a_pad_token_before_eos_ends_the_completion_in_ppo_only(policy, tokenizer, tmp_path, monkeypatch):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(pad_token_id=pad, eos_token_id=eos)
    word = tokenizer.convert_tokens_to_ids("apple")
    # Row 0: apple pad apple eos (cut after the first apple); row 1: apple eos (unchanged); row 2: pad first (empty).
    completion_ids = torch.tensor([[word, pad, word, eos], [word, eos, pad, pad], [pad, word, word, word]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    output = GenerationOutput(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long), completion_ids,
                              mask, torch.tensor([True, True, False]))  # fmt: skip
    cut = end_at_pad(output, config)
    assert cut.completion_mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert cut.completion_ids.tolist() == [[word, pad, pad, pad], [word, eos, pad, pad], [pad, pad, pad, pad]]
    assert cut.finished.tolist() == [False, True, False]
    # A pad that is the EOS token: nothing to cut (generate already ended there).
    assert end_at_pad(output, GenerationConfig(pad_token_id=eos, eos_token_id=eos)) is output
    # A policy that samples only the pad token: `generate` (Best-of-n, the evaluation) keeps the pads as completion
    # tokens, PPO's rollouts end every completion before its first one.
    with torch.no_grad():
        policy.gpt_neox.final_layer_norm.weight.zero_()
        policy.gpt_neox.final_layer_norm.bias.fill_(1.0)  # every hidden state is all ones
        policy.get_output_embeddings().weight.zero_()
        policy.get_output_embeddings().weight[pad] = 1.0  # the pad logit is hidden_size, every other 0
    sampled = generate(policy, [[word]], GenerationConfig(do_sample=True, max_new_tokens=3, pad_token_id=pad, eos_token_id=eos))  # fmt: skip
    assert sampled.completion_ids.tolist() == [[pad] * 3] and sampled.completion_mask.tolist() == [[1.0] * 3]
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((completions, completion_ids))
        return [0.0] * len(completions)

    args = trl_args(tmp_path, total_episodes=8, missing_eos_penalty=1.0)
    history = PPOTrainer(policy, reward, args, prompts(), tokenizer).train()
    assert seen == [([""] * 8, [[]] * 8)]
    assert history[0]["completions/mean_length"] == 0 and history[0]["objective/scores"] == -1.0  # no EOS: penalized
