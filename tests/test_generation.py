"""trl_bayes.generation: response and prompt tokenization, the one sampling loop (`generate`), decoding, and the log-probabilities
of sampled tokens, on a tiny random GPT-NeoX policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import ByT5Tokenizer, GenerationConfig, ProcessorMixin
from trl.data_utils import _tokenize

import trl_bayes.generation
from trl_bayes.experiments.world import build_tokenizer
from trl_bayes.generation import (
    chunk_seed,
    completion_logprobs,
    completion_mask,
    decode_completions,
    entropy_from_logits,
    generate,
    lean_settings,
    logprobs_from_logits,
    reference_logprobs,
    tokenize_prompts,
    tokenize_response,
    tokenize_responses,
)

from .test_best_of_n import PROMPTS, make_policy


@pytest.fixture(scope="module")
def policy(tokenizer):
    return make_policy(tokenizer)


def sampling(tokenizer, **kwargs) -> GenerationConfig:
    settings = dict(do_sample=True, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    return GenerationConfig(**{**settings, "eos_token_id": tokenizer.eos_token_id, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions, hand-computed


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    ids = torch.tensor([[5, 1, 0, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, finished = completion_mask(ids, [1])
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert finished.tolist() == [True, False, True]
    # Several EOS ids: the first of any of them ends the completion.
    mask, finished = completion_mask(ids, [7, 1])
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]))
    assert finished.tolist() == [True, True, True]


def test_logprobs_and_entropy_of_uniform_logits():
    logits = torch.zeros(1, 2, 4)
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([[0, 3]])), torch.full((1, 2), -math.log(4)))
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((1, 2), math.log(4)))


def test_chunk_seed_is_a_function_of_seed_and_chunk():
    assert chunk_seed(0, 1) == chunk_seed(0, 1)
    assert len({chunk_seed(s, c) for s in range(3) for c in range(3)}) == 9
    assert all(0 <= chunk_seed(7, c) < 2**32 for c in range(5))


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_prompts_plain_and_through_the_chat_template(tokenizer):
    ids, conversational = tokenize_prompts(tokenizer, PROMPTS)
    assert not conversational and ids == [tokenizer(p)["input_ids"] for p in PROMPTS]
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}: {% endif %}"
    )
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids, conversational = tokenize_prompts(chat, conversations)
    # The template renders "content : " and adds the generation prompt, as TRL's GRPOTrainer tokenizes prompts.
    assert conversational and ids == [tokenizer(p + " : ")["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([], "train_dataset\\['prompt'\\] must be a non-empty list"),
        ("one prompt", "must be a non-empty list"),
        (["a", [{"role": "user", "content": "b"}]], "must be all strings or all lists of messages"),
        ([[{"role": "user", "content": "b"}]], "conversational prompts need a tokenizer with a chat template"),
        (["a", ""], "a prompt tokenizes to no tokens"),
    ],
)
def test_tokenize_prompts_rejects_bad_prompts(tokenizer, prompts, message):
    with pytest.raises(ValueError, match=message):
        tokenize_prompts(tokenizer, prompts, "train_dataset['prompt']")


# Rows of every kind `tokenize_responses` takes, in one mixed list: plain text, plain text already ending with EOS (no
# second EOS), an empty completion (the prompt and EOS), a conversation, and a message completion with a text prompt
# (the prompt is dropped: only messages reach the chat template).
def response_rows(eos: str) -> tuple[list, list]:
    chat_prompt = [{"role": "user", "content": "name a few fruits :"}]
    assistant = [{"role": "assistant", "content": "apple pear"}]
    prompts = ["name a few fruits : ", "name a few fruits : ", "list animals", chat_prompt, "ignored", "a few"]
    completions = ["apple pear", "apple pear" + eos, "", assistant, assistant, " tools"]
    return prompts, completions


def with_chat_template(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{{ eos_token }}"
    return chat


def slow_tokenizer():
    # A python (slow) tokenizer that needs no files: ByT5 encodes UTF-8 bytes and appends its own EOS `</s>`.
    return ByT5Tokenizer()


# ByT5 warns when a text already ends with its EOS (the rows ending with EOS); it adds no second one.
@pytest.mark.filterwarnings("ignore:This sequence already has")
@pytest.mark.parametrize("make", [build_tokenizer, slow_tokenizer], ids=["fast", "slow"])
def test_tokenize_responses_equals_trl_tokenize_row_by_row(make):
    tokenizer = with_chat_template(make())
    prompts, completions = response_rows(tokenizer.eos_token)
    # The reference: TRL's `_tokenize` on each row, as `RewardTrainer` tokenizes a training pair.
    expected = [
        _tokenize(tokenizer, c if isinstance(p, str) else p + c)["input_ids"]
        if isinstance(c, list)
        else _tokenize(tokenizer, p + (c if c.endswith(tokenizer.eos_token) else c + tokenizer.eos_token))["input_ids"]
        for p, c in zip(prompts, completions, strict=True)
    ]
    ids = tokenize_responses(tokenizer, prompts, completions)
    assert ids == [list(e) for e in expected]
    assert ids == [tokenize_response(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    # Plain text only (all rows in one batch call) and a sub-list give the same rows.
    plain = [i for i, c in enumerate(completions) if isinstance(c, str)]
    assert tokenize_responses(tokenizer, [prompts[i] for i in plain], [completions[i] for i in plain]) == [
        ids[i] for i in plain
    ]
    assert tokenize_responses(tokenizer, [], []) == []


def test_tokenize_responses_hand_computed(tokenizer):
    tokenizer = with_chat_template(tokenizer)
    vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
    fruits = [vocab[w] for w in ["name", "a", "few", "fruits", ":", "apple", "pear"]] + [eos]
    prompts, completions = response_rows(tokenizer.eos_token)
    ids = tokenize_responses(tokenizer, prompts, completions)
    # One EOS whether or not the completion ends with it; the chat template renders the same words, then its EOS.
    assert ids[:2] == [fruits, fruits] and ids[3] == fruits
    assert ids[2] == [vocab["list"], vocab["animals"], eos]
    assert ids[4] == [vocab["apple"], vocab["pear"], eos]


class BatchingProcessor(ProcessorMixin):
    """A stand-in for a VLM processor: it returns a batch of one for one text, which TRL's `_tokenize` unwraps."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def eos_token(self) -> str:
        return self.tokenizer.eos_token

    def __call__(self, text: str):
        return self.tokenizer(text=[text])


def test_tokenize_responses_of_a_processor_go_one_by_one(tokenizer):
    prompts, completions = ["name a few fruits : ", "list animals"], ["apple pear", ""]
    # Batched, the processor's rows would come back as one nested list per call.
    expected = tokenize_responses(tokenizer, prompts, completions)
    assert tokenize_responses(BatchingProcessor(tokenizer), prompts, completions) == expected


@pytest.mark.parametrize(
    ("prompts", "completions", "error", "message"),
    [
        (["a", "b"], ["c"], ValueError, "Got 2 prompts but 1 completions"),
        (["a", 3], ["b", "c"], TypeError, "got int and str"),
        (["a"], [None], TypeError, "got str and NoneType"),
    ],
)
def test_tokenize_responses_rejects_bad_rows(tokenizer, prompts, completions, error, message):
    with pytest.raises(error, match=message):
        tokenize_responses(tokenizer, prompts, completions)


# ---------------------------------------------------------------------------------------------------------------------
# generate


def test_generate_cuts_after_the_first_eos_and_pads(policy, tokenizer):
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS * 4)
    out = generate(policy, prompt_ids, sampling(tokenizer), seed=0, batch_size=7)
    assert out.finished.any() and not out.finished.all()  # both endings are checked
    assert out.prompt_ids.shape == (20, out.prompt_length) and out.completion_ids.shape[0] == 20
    mask, finished = completion_mask(out.completion_ids, [tokenizer.eos_token_id])
    torch.testing.assert_close(out.completion_mask, mask)
    assert torch.equal(out.finished, finished)
    # After the first EOS: padding, outside the mask; unfinished completions ran to max_new_tokens.
    assert (out.completion_ids[out.completion_mask == 0] == tokenizer.pad_token_id).all()
    assert (out.completion_mask.sum(1)[~out.finished] == 8).all()
    # Prompts are left-padded: each row's prompt tokens are the last ones of its prompt part.
    for row, ids in enumerate(prompt_ids):
        assert out.prompt_ids[row, -len(ids) :].tolist() == ids and out.prompt_mask[row].sum() == len(ids)
    assert out.input_ids.shape == out.attention_mask.shape == (20, out.prompt_length + out.completion_ids.shape[1])


def test_generate_is_determined_by_its_seed_and_leaves_the_rng_alone(policy, tokenizer):
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(policy, prompt_ids, sampling(tokenizer), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    assert torch.equal(generate(policy, prompt_ids, sampling(tokenizer), seed=5).completion_ids, first.completion_ids)
    assert not torch.equal(
        generate(policy, prompt_ids, sampling(tokenizer), seed=6).completion_ids, first.completion_ids
    )
    # seed=None draws from the global stream (PPO's rollouts): reproducible from torch.manual_seed, and it advances.
    torch.manual_seed(9)
    state = torch.get_rng_state()
    a = generate(policy, prompt_ids, sampling(tokenizer))
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(9)
    assert torch.equal(generate(policy, prompt_ids, sampling(tokenizer)).completion_ids, a.completion_ids)


def test_generate_restores_train_mode_and_refuses_configs_without_pad_or_eos(tokenizer):
    policy = make_policy(tokenizer).train()
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS[:2])
    generate(policy, prompt_ids, sampling(tokenizer), seed=0)
    assert policy.training
    with pytest.raises(ValueError, match="needs `pad_token_id` and `eos_token_id`"):
        generate(policy, prompt_ids, GenerationConfig(do_sample=True, max_new_tokens=2), seed=0)


def test_decode_completions(policy, tokenizer):
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    out = generate(policy, prompt_ids, sampling(tokenizer), seed=1)
    texts, ids = decode_completions(tokenizer, out, conversational=False)
    assert [len(i) for i in ids] == out.completion_mask.sum(1).long().tolist()
    assert texts == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    assert not any("<eos>" in t or "<pad>" in t for t in texts)
    messages, _ = decode_completions(tokenizer, out, conversational=True)
    assert messages == [[{"role": "assistant", "content": t}] for t in texts]


# ---------------------------------------------------------------------------------------------------------------------
# The lean loop (`decode`) against `model.generate`: the same tokens, bit for bit, and the same random draws


def lora_policy(policy):
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["query_key_value"], init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(policy), lora)


# The policy's config turns the KV cache off (`use_cache=False`), so generate's default here is no cache. Each setup:
# settings, rows per sub-batch, and the policy ("lora": a random adapter on it; "eos x3": a policy whose greedy
# completions end some with EOS and some without).
LEAN_SETUPS = {
    "best-of-n default (top-k 50, no cache)": (dict(), None, None),
    "KV cache": (dict(use_cache=True), None, None),
    "PPO rollouts (temperature, top-k 0, cache, sub-batches)": (
        dict(top_k=0, top_p=1.0, temperature=0.7, use_cache=True),
        7,
        None,
    ),
    "top-p": (dict(top_k=0, top_p=0.8, temperature=1.3), None, None),
    "greedy": (dict(do_sample=False, use_cache=True), 6, "eos x3"),
    "LoRA policy": (dict(use_cache=True), None, "lora"),
    "two EOS ids, top-k 10": (dict(eos_token_id=[1, 7], top_k=10, use_cache=True), None, None),
}


def recording_logits(monkeypatch) -> list[torch.Tensor]:
    """The float32 logits of every step, as both loops hand them to their first logits processor (`RefuseNaNLogits`):
    equal samples alone would miss a last-bit difference, which rarely moves a draw."""
    seen = []
    check = trl_bayes.generation.RefuseNaNLogits.__call__
    monkeypatch.setattr(
        trl_bayes.generation.RefuseNaNLogits,
        "__call__",
        lambda self, input_ids, scores: seen.append(scores.clone()) or check(self, input_ids, scores),
    )
    return seen


def generate_with_hf(monkeypatch, *args, **kwargs):
    """`generate` with the lean loop turned off: every sub-batch through `model.generate`."""
    with monkeypatch.context() as patch:
        patch.setattr(trl_bayes.generation, "lean_settings", lambda model, config: None)
        return generate(*args, **kwargs)


@pytest.mark.parametrize("setup", list(LEAN_SETUPS))
def test_the_lean_loop_samples_what_generate_samples(policy, tokenizer, monkeypatch, setup):
    settings, batch_size, kind = LEAN_SETUPS[setup]
    model = {None: policy, "lora": lora_policy(policy), "eos x3": make_policy(tokenizer, eos_scale=3.0)}[kind]
    config = sampling(tokenizer, max_new_tokens=10, **settings)
    assert lean_settings(model.get_base_model() if kind == "lora" else model, config) is not None  # what is checked
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS * 4)
    assert len({len(ids) for ids in prompt_ids}) > 1  # left padding, so position ids and the mask matter
    finished = []
    logits = recording_logits(monkeypatch)
    for seed in range(4):
        lean = generate(model, prompt_ids, config, seed=seed, batch_size=batch_size)
        lean_logits = logits[:]
        logits.clear()
        hf = generate_with_hf(monkeypatch, model, prompt_ids, config, seed=seed, batch_size=batch_size)
        for field in ("completion_ids", "completion_mask", "finished"):
            assert torch.equal(getattr(lean, field), getattr(hf, field)), (setup, seed, field)
        assert len(lean_logits) == len(logits) and all(map(torch.equal, lean_logits, logits)), (setup, seed)
        logits.clear()
        finished.append(lean.finished)
    finished = torch.cat(finished)
    assert finished.any() and not finished.all(), "both endings are compared"
    # From the global stream (PPO's rollouts): the same tokens, and the stream is left in the same state.
    torch.manual_seed(11)
    lean = generate(model, prompt_ids, config, batch_size=batch_size)
    lean_state = torch.get_rng_state()
    torch.manual_seed(11)
    hf = generate_with_hf(monkeypatch, model, prompt_ids, config, batch_size=batch_size)
    assert torch.equal(lean.completion_ids, hf.completion_ids) and torch.equal(torch.get_rng_state(), lean_state)


def test_the_lean_loop_without_padding_and_with_pad_equal_to_eos(policy, tokenizer, monkeypatch):
    # One prompt length: generate drops the all-ones attention mask, and so does the lean loop.
    prompt_ids = [tokenize_prompts(tokenizer, PROMPTS[:1])[0][0]] * 6
    config = sampling(tokenizer, pad_token_id=tokenizer.eos_token_id, use_cache=True)
    for seed in range(3):
        lean = generate(policy, prompt_ids, config, seed=seed)
        hf = generate_with_hf(monkeypatch, policy, prompt_ids, config, seed=seed)
        assert torch.equal(lean.completion_ids, hf.completion_ids) and torch.equal(lean.finished, hf.finished)


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.2),
        dict(num_beams=2),
        dict(min_new_tokens=2),
        dict(no_repeat_ngram_size=2),
        dict(max_new_tokens=None, max_length=12),
        dict(top_k=0, min_p=0.1),
    ],
    ids=lambda settings: ",".join(settings),
)
def test_settings_the_lean_loop_does_not_cover_go_through_generate(policy, tokenizer, settings):
    config = sampling(tokenizer, **settings)
    assert lean_settings(policy, config) is None
    calls = []
    spy = copy.deepcopy(policy)
    original = spy.generate
    spy.generate = lambda **kwargs: calls.append(kwargs) or original(**kwargs)
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS[:2])
    out = generate(spy, prompt_ids, config, seed=0)
    assert len(calls) == 1 and out.completion_ids.shape[0] == 2


def test_covered_settings_never_call_generate(policy, tokenizer):
    spy = copy.deepcopy(policy)

    def refuse(**kwargs):
        raise AssertionError("model.generate called for settings the lean loop covers")

    spy.generate = refuse
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    generate(spy, prompt_ids, sampling(tokenizer), seed=0)  # Best-of-n's default settings
    generate(spy, prompt_ids, sampling(tokenizer, top_k=0, temperature=0.7, use_cache=True))  # PPO's


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities


def test_completion_logprobs_match_unpadded_forwards(policy, tokenizer):
    """Left padding and position ids: each completion's log-probabilities equal those of its unpadded sequence."""
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    out = generate(policy, prompt_ids, sampling(tokenizer), seed=2)
    with torch.no_grad():
        logprobs, logits = completion_logprobs(policy, out.input_ids, out.attention_mask, out.prompt_length, 0.5)
    assert logits.shape[:2] == logprobs.shape == out.completion_ids.shape
    _, ids = decode_completions(tokenizer, out, conversational=False)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, ids, strict=True)):
        with torch.no_grad():
            full = policy(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 0.5
        expected = full.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs[row, : len(completion)], expected, rtol=1e-5, atol=1e-5)


def test_reference_logprobs_of_a_peft_policy_are_the_base_models(policy, tokenizer):
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["query_key_value"], init_lora_weights=False
    )
    peft_policy = get_peft_model(copy.deepcopy(policy), lora)
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    out = generate(peft_policy, prompt_ids, sampling(tokenizer), seed=3)
    inputs = (out.input_ids, out.attention_mask, out.prompt_length)
    with torch.no_grad():
        base = completion_logprobs(policy, *inputs)[0]
        adapted = completion_logprobs(peft_policy, *inputs)[0]
        torch.testing.assert_close(reference_logprobs(peft_policy, None, *inputs), base)
        torch.testing.assert_close(reference_logprobs(peft_policy, policy, *inputs), base)
    assert not torch.allclose(adapted, base)  # the random adapter changes the policy: the check above is not vacuous
    with pytest.raises(ValueError, match="No reference policy"):
        reference_logprobs(policy, None, *inputs)


def test_scoring_forwards_of_a_caching_policy_build_no_cache_and_give_the_same_logprobs(
    policy, tokenizer, monkeypatch
):
    """A policy whose config asks for a KV cache (as Hub checkpoints do) is scored with `use_cache=False`: no cache is
    built, and the log-probabilities equal those of the same policy with caching off in its config."""
    from trl_bayes.generation import no_cache

    caching = copy.deepcopy(policy)
    caching.config.use_cache = True
    prompt_ids, _ = tokenize_prompts(tokenizer, PROMPTS)
    out = generate(policy, prompt_ids, sampling(tokenizer), seed=4)
    inputs = (out.input_ids, out.attention_mask, out.prompt_length)
    seen = []
    forward = type(caching).forward
    monkeypatch.setattr(
        type(caching), "forward", lambda self, *a, **kw: seen.append(kw.get("use_cache")) or forward(self, *a, **kw)
    )
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(caching, *inputs)[0], completion_logprobs(policy, *inputs)[0])
    assert seen == [False, None]  # the caching policy is told not to cache; the non-caching one is called as before
    assert (
        no_cache(caching) == {"use_cache": False} and no_cache(policy) == {} and no_cache(torch.nn.Linear(1, 1)) == {}
    )
