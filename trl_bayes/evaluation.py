"""Evaluate a policy on held-out prompts: the gold reward, the proxy reward and the KL to a reference policy.

`evaluate_policy` serves every trainer: `PPOTrainer.evaluate` (reference: the PEFT policy with its adapter disabled, or
the frozen reference model; proxy: the reward it trains on) and TRL's `GRPOTrainer` / `RLOOTrainer` through a callback
in recipes/grpo.py (reference: the SFT policy; proxy: the MAP reward of the proxy reward models).

Distribution: the held-out responses (each prompt repeated `num_generations` times) are cut into fixed chunks of
`chunk_size` responses; each chunk is sampled under its own seed, `chunk_seed(seed, chunk)`, whichever process draws it;
the chunks are dealt to the processes and the per-response results gathered back in order. The numbers are therefore
the same on 1 and N processes, and every evaluation of a run draws the same random numbers, so that differences between
evaluations reflect the policy, not the draw. The caller's RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .generation import (
    chunk_seed,
    completion_logprobs,
    decode_completions,
    eval_mode,
    generate,
    reference_logprobs,
    tokenize_prompts,
)


class MetricLog:
    """A TRL `log_metric(name, value)` that keeps what a reward function logs during a call, for its means."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)

    def __call__(self, name: str, value: float) -> None:
        self.values[name].append(value)

    def means(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self.values.items()}


# What `reward_scores` passes a reward function, by keyword (TRL's reward protocol).
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "log_metric")


def check_reward_function(reward_func: Any, name: str) -> None:
    """Refuse, before any training, a reward that `reward_scores` could not call: a model (TRL 1.12's `reward_model`)
    instead of a function of text, or a function that cannot take TRL's keyword arguments.

    Args:
        reward_func: the reward (a function or callable object).
        name: its argument's name in error messages (e.g. `reward_func`).
    """
    if isinstance(reward_func, torch.nn.Module):
        raise TypeError(
            f"{name} is a model ({type(reward_func).__name__}); it must be a TRL reward function `(prompts, "
            "completions, completion_ids=None, log_metric=None, **kwargs) -> list[float]`, one finite score per "
            "completion, which reads text (its tokenizer may differ from the policy's). Wrap a sequence-"
            "classification reward model in such a function (docs/ppo_from_trl.md, 'Reward model')."
        )
    if not callable(reward_func):
        raise TypeError(f"{name} must be callable (a TRL reward function), got {type(reward_func).__name__}.")
    try:
        parameters = inspect.signature(reward_func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: it meets its first call unchecked
        return
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [] if any(p.kind == p.VAR_KEYWORD for p in parameters) else sorted(set(REWARD_ARGUMENTS) - by_keyword)
    required = [
        p.name
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in REWARD_ARGUMENTS
    ]
    if missing or required:
        label = getattr(reward_func, "__name__", type(reward_func).__name__)
        problems = ([f"does not accept {', '.join(missing)}"] if missing else []) + (
            [f"requires {', '.join(required)}, which nobody passes"] if required else []
        )
        raise TypeError(
            f"{name} ({label}{inspect.signature(reward_func)}) {' and '.join(problems)}. Reward functions are called "
            "with the keyword arguments prompts, completions, completion_ids and log_metric (TRL's reward protocol): "
            "give it `**kwargs`, e.g. `def reward(prompts, completions, **kwargs)`."
        )


def reward_scores(
    reward_func: Callable[..., list[float]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[list[int]] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
) -> list[float]:
    """A TRL reward function's scores, refused unless they are one finite number per completion.

    The reward is called with TRL's keyword arguments (`prompts`, `completions`, `completion_ids`, `log_metric`).
    """
    name = getattr(reward_func, "__name__", type(reward_func).__name__)
    rewards = reward_func(
        prompts=prompts, completions=completions, completion_ids=completion_ids, log_metric=log_metric
    )
    if rewards is None or len(rewards) != len(prompts):
        got = "None" if rewards is None else len(rewards)
        raise ValueError(f"The reward function {name} returned {got} rewards for {len(prompts)} completions.")
    if any(r is None for r in rewards):
        raise ValueError(
            f"The reward function {name} returned None for some completions: training and evaluation need every score."
        )
    scores = [float(r) for r in rewards]
    if not all(math.isfinite(r) for r in scores):
        raise ValueError(f"The reward function {name} returned NaN or infinite rewards: {rewards}.")
    return scores


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    gold_reward: Callable[..., list[float]],
    proxy_reward: Callable[..., list[float]],
    generation_config: GenerationConfig,
    reference: torch.nn.Module | None = None,
    num_generations: int = 1,
    seed: int = 0,
    chunk_size: int = 16,
    accelerator: Accelerator | PartialState | None = None,
    prompt_ids: Sequence[list[int]] | None = None,
) -> dict[str, float]:
    """Sample `num_generations` completions of each held-out prompt and average, over all of them, the gold reward, the
    proxy reward (and every metric the proxy logs through `log_metric`) and the KL to the reference policy.

    The KL of a completion is its sequence log-ratio sum_t log pi(y_t) - log pi_ref(y_t) at the sampling temperature
    (`generation_config.temperature`): an unbiased estimate of KL(pi || pi_ref), as PPO's `objective/kl`.

    Args:
        policy: the causal LM, with whole weights (under ZeRO-3: gathered, e.g. inside `unwrapped_whole`); evaluated in
            eval mode, its mode restored after.
        tokenizer: the policy's tokenizer (prompts through its chat template when they are conversations).
        prompts: the held-out prompts, strings or conversations.
        gold_reward, proxy_reward: TRL reward functions `(prompts, completions, completion_ids, log_metric, **kwargs)
            -> list[float]`. What the proxy logs is averaged over completions (each call's value weighted by its
            number of completions); the gold reward gets no `log_metric`.
        generation_config: the sampling settings (with `pad_token_id` and `eos_token_id`), usually the training's.
        reference: the reference policy; `None` = `policy` is a PEFT model whose reference is itself with the adapter
            disabled.
        num_generations: completions per prompt.
        seed: the evaluation's seed; fix it to evaluate every step (and every run) on the same random numbers.
        chunk_size: responses per chunk: one `generate` call, one reward call, one forward per model. Part of what the
            samples depend on (another chunk size draws other, equally valid, samples); not the number of processes.
        accelerator: an `Accelerator` or `PartialState` whose processes share the chunks; `None` = this process alone.
        prompt_ids: the prompts' token ids when they come pre-tokenized (`prompts` then only goes to the rewards);
            `None` = tokenize `prompts` (`tokenize_prompts`).

    Returns:
        `gold_reward`, `proxy_reward`, `kl`, and the proxy's logged metrics under their own names, each a mean over
        the `len(prompts) * num_generations` completions, the same on every process.
    """
    if num_generations < 1 or chunk_size < 1:
        raise ValueError(f"num_generations and chunk_size must be >= 1, got {num_generations} and {chunk_size}.")
    if prompt_ids is None:
        prompt_ids, conversational = tokenize_prompts(tokenizer, prompts, "the evaluation prompts")
    else:
        conversational = isinstance(prompts[0], list)
    responses = [i for i in range(len(prompts)) for _ in range(num_generations)]
    starts = list(range(0, len(responses), chunk_size))
    chunk_indices = list(range(len(starts)))
    if accelerator is not None:
        with accelerator.split_between_processes(chunk_indices) as local:
            local_chunks = list(local)
    else:
        local_chunks = chunk_indices
    temperature = generation_config.temperature
    records = []
    # Both models without dropout (their modes restored after); the policy samples in eval mode too (`generate`).
    frozen_reference = eval_mode(reference) if reference is not None else contextlib.nullcontext()
    with eval_mode(policy), frozen_reference:
        for c in local_chunks:
            rows = responses[starts[c] : starts[c] + chunk_size]
            chunk_prompts = [prompts[i] for i in rows]
            # 1. sample: under the chunk's own seed, whichever process runs it
            output = generate(policy, [prompt_ids[i] for i in rows], generation_config, seed=chunk_seed(seed, c))
            completions, completion_ids = decode_completions(tokenizer, output, conversational)
            # 2. KL to the reference: the log-ratio summed over each completion's tokens
            inputs = (output.input_ids, output.attention_mask, output.prompt_length, temperature)
            logprobs = completion_logprobs(policy, *inputs)[0]
            kl = ((logprobs - reference_logprobs(policy, reference, *inputs)) * output.completion_mask).sum(1)
            # 3. rewards: what the proxy logs is a batch mean, kept per chunk to be weighted by the chunk's size
            logged = MetricLog()
            gold = reward_scores(gold_reward, chunk_prompts, completions, completion_ids)
            proxy = reward_scores(proxy_reward, chunk_prompts, completions, completion_ids, logged)
            records.append({
                "chunk": c,
                "gold_reward": gold,
                "proxy_reward": proxy,
                "kl": kl.tolist(),
                "logged": logged.means(),
            })  # fmt: skip
    if accelerator is not None and accelerator.num_processes > 1:
        records = gather_object(records)  # contiguous blocks of chunks per process, concatenated in process order
    assert [r["chunk"] for r in records] == chunk_indices, "chunks were gathered out of order"

    metrics: dict[str, float] = {}
    for name in ("gold_reward", "proxy_reward", "kl"):  # summed in response order: the same float on any process count
        values = [v for r in records for v in r[name]]
        metrics[name] = sum(values) / len(values)
    for name in sorted({name for r in records for name in r["logged"]}):
        if name in metrics:
            raise ValueError(f"The proxy reward logs a metric named {name!r}, which evaluate_policy reports itself.")
        mine = [(r["logged"][name], len(r["kl"])) for r in records if name in r["logged"]]
        metrics[name] = sum(value * n for value, n in mine) / sum(n for _, n in mine)
    return metrics
