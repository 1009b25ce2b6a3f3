from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, GPTNeoXForCausalLM

from trl_bayes import BestOfNSampler, PenalizedReward, best_of_n_estimate, kl_best_of_n
from trl_bayes.best_of_n import best_of_n_weights
from trl_bayes.synthetic import tiny_gpt_neox_config

from .conftest import make_trainer
from .test_distributed import _run, _two_processes

# ---------------------------------------------------------------------------------------------------------------------
# The estimator.


def _best_of_subset(rank: list[float], evals: list[float], subset: tuple[int, ...]) -> Fraction:
    """Eval score of the best of `subset`, ties among the best broken uniformly at random (in expectation)."""
    top = max(rank[i] for i in subset)
    tied = [Fraction(evals[i]) for i in subset if rank[i] == top]
    return sum(tied, Fraction(0)) / len(tied)


def _enumerated_best_of_n(rank: list[float], evals: list[float], n: int) -> Fraction:
    """The definition: the mean over all C(N, n) subsets of the best sample's eval score, in exact arithmetic."""
    subsets = list(itertools.combinations(range(len(rank)), n))
    return sum((_best_of_subset(rank, evals, s) for s in subsets), Fraction(0)) / len(subsets)


def test_estimate_matches_exhaustive_enumeration_with_ties():
    rng = np.random.default_rng(0)
    rank = rng.integers(0, 4, size=(5, 8)).astype(float)  # 4 values over 8 samples: many ties
    evals = rng.standard_normal((5, 8))
    ns = list(range(1, 9))
    got = best_of_n_estimate(rank, evals, ns, reduce=False)
    assert got.shape == (8, 5) and got.dtype == np.float64
    for p in range(5):
        for k, n in enumerate(ns):
            expected = _enumerated_best_of_n(rank[p].tolist(), evals[p].tolist(), n)
            assert got[k, p] == pytest.approx(float(expected), rel=1e-12, abs=1e-14), (p, n)
    np.testing.assert_allclose(best_of_n_estimate(rank, evals, ns), got.mean(1), rtol=1e-15)


def test_estimate_matches_exact_formula_with_big_binomials():
    # N = 200: C(200, 100) ~ 9e58, so the float64 log-binomials are checked where naive binomials overflow float32
    # and lose every digit to cancellation. Reference: sum_i C(i-1, n-1) / C(N, n) * eval_(i) with Python integers.
    rng = np.random.default_rng(1)
    num = 200
    rank, evals = rng.standard_normal((2, num)), rng.standard_normal((2, num))
    ns = [1, 2, 7, 100, 199, 200]
    got = best_of_n_estimate(rank, evals, ns, reduce=False)
    for p in range(2):
        sorted_evals = [Fraction(evals[p, i]) for i in np.argsort(rank[p])]
        for k, n in enumerate(ns):
            expected = sum(
                (Fraction(math.comb(i - 1, n - 1), math.comb(num, n)) * e for i, e in enumerate(sorted_evals, 1)),
                Fraction(0),
            )
            assert got[k, p] == pytest.approx(float(expected), rel=1e-11, abs=1e-13), (p, n)


def test_weights_are_the_exact_probabilities():
    weights = best_of_n_weights(12, [1, 3, 12])
    for k, n in enumerate([1, 3, 12]):
        expected = [math.comb(i - 1, n - 1) / math.comb(12, n) for i in range(1, 13)]
        np.testing.assert_allclose(weights[k], expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(best_of_n_weights(12_500, [1, 64, 8192]).sum(1), 1.0, rtol=1e-12)


def test_estimate_matches_monte_carlo_best_of_n():
    rng = np.random.default_rng(2)
    num, draws = 20, 40_000
    rank = rng.integers(0, 8, size=(3, num)).astype(float)  # with ties, broken at random in the draws
    evals = rng.standard_normal((3, num)) + 0.3 * rank
    ns = [1, 3, 8, 20]
    got = best_of_n_estimate(rank, evals, ns, reduce=False)
    for p in range(3):
        for k, n in enumerate(ns):
            # n of N without replacement: the first n of a random permutation; the best by rank, ties at random.
            subsets = np.argsort(rng.random((draws, num)), axis=1)[:, :n]
            tie_break = rng.random((draws, n))
            keys = rank[p][subsets] + 1e-3 * tie_break  # rank gaps are >= 1, so the jitter only orders ties
            best = subsets[np.arange(draws), keys.argmax(1)]
            values = evals[p][best]
            stderr = values.std() / math.sqrt(draws)
            assert abs(got[k, p] - values.mean()) < 4 * stderr + 1e-12, (p, n, got[k, p], values.mean(), stderr)


def test_estimate_at_n_1_is_the_mean_and_at_n_N_the_eval_of_the_argmax():
    gen = torch.Generator().manual_seed(3)
    rank, evals = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen)  # torch inputs, no ties
    got = best_of_n_estimate(rank, evals, [1, 9], reduce=False)
    np.testing.assert_allclose(got[0], evals.double().mean(1).numpy(), rtol=1e-13)
    np.testing.assert_array_equal(got[1], evals.double()[torch.arange(6), rank.argmax(1)].numpy())


def test_eval_scores_follow_the_ranking():
    # The anchor bug: sorting rank scores but reading eval scores in their original order. Here the best-ranked
    # sample (rank 3) has the worst eval score, so the buggy estimator would return 30 at n = N instead of 10.
    rank, evals = [[3.0, 1.0, 2.0]], [[10.0, 20.0, 30.0]]
    np.testing.assert_allclose(best_of_n_estimate(rank, evals, [1, 2, 3]), [20.0, (1 * 30 + 2 * 10) / 3, 10.0])
    # Permuting the samples (one permutation for both arrays) changes nothing.
    rng = np.random.default_rng(4)
    rank, evals = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))
    perm = rng.permutation(10)
    np.testing.assert_allclose(
        best_of_n_estimate(rank[:, perm], evals[:, perm], [2, 5]), best_of_n_estimate(rank, evals, [2, 5]), rtol=1e-14
    )


def test_ties_average_the_eval_scores():
    evals = [[1.0, 2.0, 6.0, 7.0]]
    # All tied: every n picks a uniformly random sample.
    np.testing.assert_allclose(best_of_n_estimate([[5.0] * 4], evals, [1, 2, 4]), [4.0, 4.0, 4.0])
    # The top two tied: at n = N the choice is one of them at random.
    np.testing.assert_allclose(best_of_n_estimate([[0.0, 1.0, 2.0, 2.0]], evals, [4]), [6.5])


def test_estimate_rejects_bad_input():
    rank = np.zeros((2, 5))
    for bad in (0, 6, 2.0, True, -1):
        with pytest.raises(ValueError, match="ns must hold integers"):
            best_of_n_estimate(rank, rank, [1, bad])
    with pytest.raises(ValueError, match="ns is empty"):
        best_of_n_estimate(rank, rank, [])
    nan = rank.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="rank_scores contains NaN"):
        best_of_n_estimate(nan, rank, [1])
    with pytest.raises(ValueError, match="eval_scores contains NaN"):
        best_of_n_estimate(rank, nan, [1])
    with pytest.raises(ValueError, match="eval_scores contains inf"):
        best_of_n_estimate(rank, np.full((2, 5), np.inf), [1])
    with pytest.raises(ValueError, match="same shape"):
        best_of_n_estimate(rank, np.zeros((2, 4)), [1])
    with pytest.raises(ValueError, match="shape \\(prompts, samples\\)"):
        best_of_n_estimate(np.zeros(5), np.zeros(5), [1])


def test_kl_best_of_n():
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(16) == pytest.approx(1.8351, abs=1e-4)
    np.testing.assert_allclose(kl_best_of_n(np.array([1, 4])), [0.0, math.log(4) - 0.75])
    # Independent check: for a continuous reward, Best-of-n has density n u^(n-1) on the policy's reward quantile u,
    # so KL = integral of n u^(n-1) log(n u^(n-1)) du over [0, 1] (midpoint rule).
    u = (np.arange(200_000) + 0.5) / 200_000
    for n in (2, 5, 64):
        log_density = math.log(n) + (n - 1) * np.log(u)  # not log(n u^(n-1)): u^63 underflows to 0
        assert kl_best_of_n(n) == pytest.approx(np.mean(np.exp(log_density) * log_density), rel=1e-4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        kl_best_of_n(0)


# ---------------------------------------------------------------------------------------------------------------------
# The sampler, on a tiny random GPT-NeoX policy.

PROMPTS = ["please list fruits : ", "name a few tools :", "give me some colors : and also", "list animals", "a few"]


class LetterCount:
    """A deterministic reward: how often the letter `e` occurs in the completion (plain text or assistant message)."""

    __name__ = "letter_count"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        self.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids})
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [float(t.count("e")) for t in texts]


def make_policy(tokenizer, dtype=torch.float32, eos_scale: float = 30.0) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    policy = GPTNeoXForCausalLM(config).to(dtype)
    # A random policy's logits are near zero (almost uniform over ~100 tokens), so it rarely says EOS; a longer EOS
    # output row makes it end some completions early (30x: about a third of the samples of 8 tokens).
    with torch.no_grad():
        policy.get_output_embeddings().weight[tokenizer.eos_token_id] *= eos_scale
    return policy


@pytest.fixture(scope="module")
def policy(tokenizer):
    return make_policy(tokenizer)


SAMPLING = GenerationConfig(do_sample=True, max_new_tokens=8)
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=8)


def make_sampler(policy, tokenizer, **kwargs) -> BestOfNSampler:
    defaults = dict(reward=LetterCount(), n=4, generation_config=SAMPLING, prompt_batch_size=2, progress_bar=False)
    return BestOfNSampler(policy, tokenizer, **{**defaults, **kwargs})


def test_sample_shapes_scores_and_selection(policy, tokenizer):
    reward = LetterCount()
    out = make_sampler(policy, tokenizer, reward=reward, score_batch_size=3)(PROMPTS)
    assert out.prompts == PROMPTS
    assert len(out.completions) == 5 and all(
        len(row) == 4 and all(isinstance(c, str) for c in row) for row in out.completions
    )
    assert out.scores.shape == (5, 4) and out.scores.dtype == np.float64
    assert out.finished.shape == (5, 4) and out.finished.dtype == bool
    assert out.finished.any() and not out.finished.all()  # the test below checks both kinds
    # Scores recomputed here, one completion at a time.
    expected = np.array([[c.count("e") for c in row] for row in out.completions], dtype=float)
    np.testing.assert_array_equal(out.scores, expected)
    assert len(set(out.scores.ravel())) > 2  # the selection below is not trivial
    np.testing.assert_array_equal(out.best_index, expected.argmax(1))
    assert out.best_completions == [row[i] for row, i in zip(out.completions, expected.argmax(1), strict=True)]
    # The reward got the TRL keyword arguments, in whole prompts: score_batch_size=3 < n=4, so one prompt per call.
    assert all(len(call["completions"]) == 4 and len(set(call["prompts"])) == 1 for call in reward.calls)
    assert sum(len(call["completions"]) for call in reward.calls) == 20
    assert all(len(call["completion_ids"]) == len(call["completions"]) for call in reward.calls)
    # Completion texts carry no special tokens.
    assert not any(t in c for row in out.completions for c in row for t in ("<pad>", "<eos>"))


def _greedy_reference(policy, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy decoding by hand: one unpadded prompt, the full sequence re-run at each step."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(policy(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    words = [t for t in tokenizer.convert_ids_to_tokens(new) if t not in ("<eos>", "<pad>")]
    return " ".join(words), new[-1] == tokenizer.eos_token_id


def test_greedy_matches_a_hand_written_decoder_for_any_chunking(tokenizer):
    # Left padding of other lengths changes the logits by rounding only (position ids follow the attention mask).
    # Not float64: transformers' eager attention takes its softmax in float32, where float64's mask value becomes -inf
    # and the fully masked rows of pad tokens turn NaN (see test_nan_logits_fail_loudly). A 3x EOS row: some
    # greedy completions end with EOS, some do not.
    policy = make_policy(tokenizer, eos_scale=3.0)
    reference = [_greedy_reference(policy, tokenizer, p, 8) for p in PROMPTS]
    assert {finished for _, finished in reference} == {True, False}  # both EOS and max_new_tokens endings
    for batch_size, generation_batch_size in ((1, None), (2, None), (5, None), (5, 3)):
        sampler = make_sampler(
            policy, tokenizer, reward=None, n=2, generation_config=GREEDY, prompt_batch_size=batch_size,
            generation_batch_size=generation_batch_size,
        )  # fmt: skip
        completions, finished = sampler.generate(PROMPTS, return_finished=True)
        assert completions == [[text, text] for text, _ in reference], batch_size
        np.testing.assert_array_equal(finished, [[f, f] for _, f in reference])


def test_nan_logits_fail_loudly(policy, tokenizer):
    broken = copy.deepcopy(policy)
    with torch.no_grad():
        broken.get_output_embeddings().weight[5, 0] = float("nan")
    for config in (GREEDY, SAMPLING):  # greedy would otherwise pick token 0 (argmax of NaN) without a word
        with pytest.raises(ValueError, match="NaN logits"):
            make_sampler(broken, tokenizer, generation_config=config, reward=None).generate(PROMPTS[:2])


def test_sampling_is_determined_by_seed_and_chunk(policy, tokenizer):
    torch.manual_seed(123)
    first = make_sampler(policy, tokenizer, seed=5)(PROMPTS)
    state = torch.get_rng_state()
    torch.manual_seed(456)  # the global RNG state does not matter ...
    again = make_sampler(policy, tokenizer, seed=5)(PROMPTS)
    assert again.completions == first.completions
    np.testing.assert_array_equal(again.best_index, first.best_index)
    # ... and is left as it was.
    torch.manual_seed(123)
    make_sampler(policy, tokenizer, seed=5).generate(PROMPTS)
    assert torch.equal(torch.get_rng_state(), state)

    # Every chunk has a seed of its own: one prompt per chunk, the same prompt twice, other samples.
    twice = make_sampler(policy, tokenizer, seed=5, prompt_batch_size=1).generate([PROMPTS[0]] * 2)
    assert twice[0] != twice[1]

    other = make_sampler(policy, tokenizer, seed=6)(PROMPTS)
    assert other.completions != first.completions
    # The samples within a prompt differ (sampling, not n copies of one completion).
    assert all(len(set(row)) > 1 for row in first.completions)
    # A chunk's samples do not depend on the chunks after it: the first two chunks (4 prompts) alone.
    assert make_sampler(policy, tokenizer, seed=5).generate(PROMPTS[:4]) == first.completions[:4]
    # generate() calls of generation_batch_size rows within a chunk: deterministic too, and all n samples are drawn.
    split = make_sampler(policy, tokenizer, seed=5, generation_batch_size=3).generate(PROMPTS)
    assert split == make_sampler(policy, tokenizer, seed=5, generation_batch_size=3).generate(PROMPTS)
    assert [len(row) for row in split] == [len(row) for row in first.completions]
    # Another chunking draws other samples (documented): chunk 0 now holds 3 prompts.
    assert make_sampler(policy, tokenizer, seed=5, prompt_batch_size=3).generate(PROMPTS) != first.completions


def test_conversational_prompts_use_the_chat_template(policy, tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}: {% endif %}"
    )
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    reward = LetterCount()
    out = make_sampler(policy, chat_tokenizer, reward=reward, seed=1)(conversations)
    # The template renders a conversation as the text "content : ", so plain text gives the same samples.
    plain = make_sampler(policy, tokenizer, seed=1)([p + " : " for p in PROMPTS[:3]])
    assert [[c[0]["content"] for c in row] for row in out.completions] == plain.completions
    assert all(c[0]["role"] == "assistant" for row in out.completions for c in row)
    assert reward.calls[0]["prompts"][0] == conversations[0]  # TRL's format: message lists in, message lists out
    np.testing.assert_array_equal(out.scores, plain.scores)


def test_peft_policy(policy, tokenizer):
    # PEFT's default LoRA init (B = 0) leaves the function unchanged: same samples as the base policy.
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["query_key_value"])
    peft_policy = get_peft_model(copy.deepcopy(policy), lora)
    got = make_sampler(peft_policy, tokenizer, seed=3)(PROMPTS[:3])
    assert got.completions == make_sampler(policy, tokenizer, seed=3)(PROMPTS[:3]).completions
    assert peft_policy.training  # the sampler's eval mode is undone


def test_sampler_with_a_penalized_bayesian_reward(policy, tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=16)
    trainer.train()
    reward = PenalizedReward(trainer.posterior, penalty="std", k=1.0, uncertainty="marginal", scale="absolute")
    out = make_sampler(policy, tokenizer, reward=reward, n=3, score_batch_size=4)(PROMPTS[:2])
    flat = [(p, c) for p, row in zip(PROMPTS[:2], out.completions, strict=True) for c in row]
    mean, var = trainer.posterior.predict([p for p, _ in flat], [c for _, c in flat])
    np.testing.assert_allclose(out.scores.ravel(), (mean - var.sqrt()).double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.best_index, out.scores.argmax(1))

    # The relative variance: each prompt's n candidates reach the reward together (score_batch_size=4 holds 1 prompt).
    relative = PenalizedReward(trainer.posterior, penalty="std", k=1.0, uncertainty="relative", scale="absolute")
    out = make_sampler(policy, tokenizer, reward=relative, n=3, score_batch_size=4)(PROMPTS[:2])
    flat = [(p, c) for p, row in zip(PROMPTS[:2], out.completions, strict=True) for c in row]
    mean, _, rel = trainer.posterior.predict_relative([p for p, _ in flat], [c for _, c in flat])
    np.testing.assert_allclose(out.scores.ravel(), (mean - rel.sqrt()).double().numpy(), rtol=1e-5, atol=1e-6)


def test_refuses_an_accelerator_that_misses_launched_processes(policy, tokenizer, monkeypatch):
    """`Accelerator()` in 2 launched CPU processes sees 1 (it needs `cpu=True`): each would sample every prompt."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, unwrap_model=lambda model: model)  # what each such process sees
    with pytest.raises(RuntimeError, match="2 processes were launched but the accelerator sees 1.*cpu=True"):
        make_sampler(policy, tokenizer, accelerator=alone)


def test_sampler_rejects_bad_input(policy, tokenizer):
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_sampler(policy, tokenizer, n=0)
    with pytest.raises(ValueError, match="prompt_batch_size"):
        make_sampler(policy, tokenizer, prompt_batch_size=0)
    with pytest.raises(ValueError, match="set `n` instead"):
        make_sampler(policy, tokenizer, generation_config=GenerationConfig(do_sample=True, num_return_sequences=4))
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        make_sampler(policy, no_pad)
    sampler = make_sampler(policy, tokenizer)
    for bad in ([], "one prompt"):
        with pytest.raises(ValueError, match="non-empty list"):
            sampler(bad)
    with pytest.raises(ValueError, match="all strings or all lists"):
        sampler(["a", [{"role": "user", "content": "b"}]])
    with pytest.raises(ValueError, match="chat template"):
        sampler([[{"role": "user", "content": "b"}]])
    with pytest.raises(ValueError, match="no tokens"):
        sampler(["a", ""])
    with pytest.raises(ValueError, match="has no reward"):
        make_sampler(policy, tokenizer, reward=None)(["a"])
    with pytest.raises(ValueError, match="None or NaN"):
        make_sampler(policy, tokenizer, reward=lambda prompts, completions, **kw: [None] * len(completions))(["a"])
    with pytest.raises(ValueError, match="returned 1 scores for 4"):
        make_sampler(policy, tokenizer, reward=lambda prompts, completions, **kw: [0.0])(["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Two processes.

SCRIPT = Path(__file__).with_name("dist_best_of_n.py")


@pytest.mark.slow
def test_two_processes_sample_what_one_process_samples(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one)])
    _run(_two_processes(SCRIPT, str(two)))
    for case in ("uneven", "fewer_chunks"):
        r1, r2 = (json.loads((d / f"{case}.json").read_text()) for d in (one, two))
        assert (r1.pop("num_processes"), r2.pop("num_processes")) == (1, 2)
        assert r2 == r1, case  # exactly: completions, finished flags, scores and selections
        assert len(r1["completions"]) == {"uneven": 5, "fewer_chunks": 2}[case]
        assert len({c for row in r1["completions"] for c in row}) > 3  # real samples, not one repeated string
