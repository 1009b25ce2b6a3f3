"""trl_bayes.evaluation: `evaluate_policy` against a chunk-by-chunk hand computation, its seeding, its reference
policies, and `reward_scores`' checks. Two processes: tests/test_ppo.py (PPO's evaluation on 1 and 2 processes)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from trl_bayes import evaluate_policy
from trl_bayes.evaluation import MetricLog, reward_scores
from trl_bayes.generation import chunk_seed, completion_logprobs, decode_completions, generate, tokenize_prompts

from .test_best_of_n import PROMPTS, LetterCount, make_policy


class LengthLogger:
    """A proxy reward: the completion's length in characters; logs the batch mean of the word count, as a TRL reward
    function logs through `log_metric`."""

    __name__ = "length"

    def __call__(self, prompts, completions, log_metric=None, **kwargs):
        if log_metric is not None:
            log_metric("test/words", sum(len(c.split()) for c in completions) / len(completions))
        return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def models(tokenizer):
    policy = make_policy(tokenizer)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference the policy has moved away from: the KL is not 0
        reference.get_output_embeddings().weight.mul_(0.5)
    return policy, reference


def sampling(tokenizer) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def test_evaluate_policy_matches_a_chunk_by_chunk_computation(models, tokenizer):
    policy, reference = models
    config = sampling(tokenizer)
    got = evaluate_policy(policy, tokenizer, PROMPTS, LetterCount(), LengthLogger(), config, reference=reference,
                          num_generations=2, seed=3, chunk_size=4)  # fmt: skip
    # By hand: 5 prompts x 2 = 10 responses (each prompt twice in a row), chunks of 4, 4 and 2, each under its seed.
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    rows = [i for i in range(5) for _ in range(2)]
    gold, proxy, kl, words = [], [], [], []
    for c, start in enumerate(range(0, 10, 4)):
        chunk = rows[start : start + 4]
        out = generate(policy, [prompt_ids[i] for i in chunk], config, seed=chunk_seed(3, c))
        texts, _ = decode_completions(tokenizer, out, conversational=False)
        inputs = (out.input_ids, out.attention_mask, out.prompt_length, 0.8)
        with torch.no_grad():
            log_ratio = completion_logprobs(policy, *inputs)[0] - completion_logprobs(reference, *inputs)[0]
        kl += (log_ratio * out.completion_mask).sum(1).tolist()
        gold += [float(t.count("e")) for t in texts]
        proxy += [float(len(t)) for t in texts]
        words += [len(t.split()) for t in texts]
    assert list(got) == ["gold_reward", "proxy_reward", "kl", "test/words"]
    assert got["gold_reward"] == pytest.approx(sum(gold) / 10, rel=1e-12)
    assert got["proxy_reward"] == pytest.approx(sum(proxy) / 10, rel=1e-12)
    assert got["kl"] == pytest.approx(sum(kl) / 10, rel=1e-6)
    assert abs(got["kl"]) > 1e-3
    # The proxy logs one mean per chunk (4, 4, 2 completions): weighted by size, it is the mean over completions.
    assert got["test/words"] == pytest.approx(sum(words) / 10, rel=1e-12)
    assert len(set(gold)) > 1 and len(set(proxy)) > 1  # real samples, not one repeated completion


def test_evaluations_repeat_their_draw_and_leave_rng_and_modes_alone(models, tokenizer):
    policy, reference = models
    policy.train(), reference.train()  # as TRL's trainer holds its policy; evaluated without dropout all the same
    torch.manual_seed(0)
    state = torch.get_rng_state()
    args = (policy, tokenizer, PROMPTS, LetterCount(), LengthLogger(), sampling(tokenizer))
    first = evaluate_policy(*args, reference=reference, seed=1, chunk_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert policy.training and reference.training  # modes restored
    assert evaluate_policy(*args, reference=reference, seed=1, chunk_size=2) == first
    assert evaluate_policy(*args, reference=reference, seed=2, chunk_size=2) != first


def test_kl_to_the_policy_itself_is_zero(models, tokenizer):
    policy, _ = models
    # PEFT's default LoRA (B = 0): the policy equals its reference, the adapter disabled.
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["query_key_value"])
    peft_policy = get_peft_model(copy.deepcopy(policy), lora)
    args = (tokenizer, PROMPTS, LetterCount(), LengthLogger(), sampling(tokenizer))
    assert evaluate_policy(peft_policy, *args, reference=None)["kl"] == 0.0
    assert evaluate_policy(policy, *args, reference=copy.deepcopy(policy))["kl"] == 0.0
    with pytest.raises(ValueError, match="No reference policy"):
        evaluate_policy(policy, *args, reference=None)


def test_conversational_prompts_reach_the_rewards_as_messages(models, tokenizer):
    policy, reference = models
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    seen = []

    def gold(prompts, completions, **kwargs):
        seen.append((prompts[0], completions[0]))
        return [float(c[0]["content"].count("e")) for c in completions]

    chat_metrics = evaluate_policy(policy, chat, conversations, gold, gold, sampling(tokenizer), reference=reference)
    assert seen[0][0] == conversations[0] and seen[0][1][0]["role"] == "assistant"
    # The template renders the bare content: the same samples and scores as the plain prompts.
    plain = evaluate_policy(policy, tokenizer, PROMPTS, LetterCount(), LetterCount(), sampling(tokenizer),
                            reference=reference)  # fmt: skip
    assert chat_metrics == plain


def test_metric_log_averages_what_a_reward_logs():
    log = MetricLog()
    for value in (1.0, 2.0, 6.0):
        log("a", value)
    log("b", -1.0)
    assert log.means() == {"a": 3.0, "b": -1.0}


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        (None, "returned None rewards for 2 completions"),
        ([1.0], "returned 1 rewards for 2 completions"),
        ([1.0, None], "returned None for some completions"),
        ([1.0, float("nan")], "returned NaN or infinite rewards"),
        ([1.0, float("inf")], "returned NaN or infinite rewards"),
    ],
)
def test_reward_scores_refuse_bad_rewards(rewards, message):
    def reward(prompts, completions, **kwargs):
        return rewards

    with pytest.raises(ValueError, match=f"The reward function reward {message}"):
        reward_scores(reward, ["p", "q"], ["a", "b"])
    assert reward_scores(lambda **kwargs: [1, 2.5], ["p", "q"], ["a", "b"]) == [1.0, 2.5]
