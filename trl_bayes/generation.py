"""Everything between text and a policy's samples, in one place: padding, tokenization (responses for the reward model,
prompts for the policy, with chat templates), the one sampling loop (`generate`), decoding, and the log-probabilities
of the sampled tokens.

Best-of-n (`BestOfNSampler`), PPO's rollouts and the held-out evaluation of PPO and GRPO (`evaluate_policy`) all sample
through `generate`, so they tokenize, pad, seed and cut completions the same way. Shapes: B sequences, P prompt tokens
(left-padded), T completion tokens (the completion mask marks the tokens up to and including the first EOS), V the
vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from trl.data_utils import _tokenize

# ---------------------------------------------------------------------------------------------------------------------
# Tokenization and padding.


def tokenize_response(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> list[int]:
    """Token ids of one (prompt, completion) as `trl.RewardTrainer` tokenizes a `prompt`/`chosen` pair.

    Plain text: `prompt + completion`, with EOS appended to the completion unless it already ends with it.
    Conversational (lists of messages): the tokenizer's chat template over `prompt + completion`.
    """
    if isinstance(completion, list):
        messages = (prompt if isinstance(prompt, list) else []) + completion
        return list(_tokenize(tokenizer, messages)["input_ids"])
    if not isinstance(completion, str) or not isinstance(prompt, str):
        raise TypeError(
            f"prompts and completions must be strings or lists of messages, got {type(prompt).__name__} and "
            f"{type(completion).__name__}"
        )
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    # TRL uses its own `_tokenize` for training pairs; calling it here keeps scoring and training identical.
    return list(_tokenize(tokenizer, prompt + completion)["input_ids"])


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any], name: str = "prompts"
) -> tuple[list[list[int]], bool]:
    """Token ids of prompts as TRL's `GRPOTrainer` tokenizes them: plain text as is, conversations (lists of messages)
    through the chat template with the generation prompt.

    Args:
        prompts: all strings or all conversations.
        name: what the prompts are called in error messages (e.g. `train_dataset['prompt']`).

    Returns:
        one list of token ids per prompt, and whether the prompts are conversational.
    """
    if isinstance(prompts, str | dict) or len(prompts) == 0:
        raise ValueError(f"{name} must be a non-empty list of strings or of conversations (lists of messages).")
    kinds = {type(p) for p in prompts}
    if kinds == {list}:
        if tokenizer.chat_template is None:
            raise ValueError(f"{name}: conversational prompts need a tokenizer with a chat template.")
        out = tokenizer.apply_chat_template(list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = [list(x) for x in out["input_ids"]]
    elif kinds == {str}:
        ids = [list(x) for x in tokenizer(list(prompts))["input_ids"]]
    else:
        raise ValueError(
            f"{name} must be all strings or all lists of messages, got {sorted(k.__name__ for k in kinds)}."
        )
    if not all(ids):
        raise ValueError(f"{name}: a prompt tokenizes to no tokens; the policy needs at least one token to continue.")
    return ids, kinds == {list}


def pad_token_ids(
    sequences: Sequence[list[int]], pad_token_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists on the `right` (scoring: the reward is read at the last real token) or the `left`
    (generation: every row continues from its last column). Returns `input_ids`, `attention_mask`, both `(B, L)`."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}.")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout) inside the block, its previous mode restored after, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling.


def chunk_seed(seed: int, chunk: int) -> int:
    """A well-mixed 32-bit seed for one chunk of prompts (or responses), from a run's seed and the chunk's global index.

    Seeding each fixed chunk on its own is what makes samples independent of the number of processes: whichever
    process draws a chunk, it draws it from the same random numbers.
    """
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


class RefuseNaNLogits(LogitsProcessor):
    """Raise on NaN logits, which greedy decoding would otherwise silently turn into token 0 (argmax of NaN)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if torch.isnan(scores).any():
            raise ValueError(
                "The policy returned NaN logits. One known cause: a float64 policy with eager attention and left "
                "padding (the softmax runs in float32, where fully masked pad rows become NaN); use float32."
            )
        return scores


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which generated tokens belong to the completion: those up to and including the first EOS.

    Args:
        completion_ids: `(B, T)` generated token ids (after the first EOS, `generate` pads).

    Returns:
        mask `(B, T)` float, and finished `(B,)` bool (the completion has an EOS).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    finished = is_eos.any(1)
    length = completion_ids.shape[1]
    first_eos = torch.where(finished, is_eos.int().argmax(1), torch.full_like(finished, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device)[None]
    return (positions <= first_eos[:, None]).float(), finished


@dataclass
class GenerationOutput:
    """What `generate` returns, on the policy's device, one row per prompt given.

    Attributes:
        prompt_ids: `(B, P)` the prompts, left-padded.
        prompt_mask: `(B, P)` 1 on prompt tokens, 0 on padding.
        completion_ids: `(B, T)` the sampled tokens, padding after the first EOS.
        completion_mask: `(B, T)` float, 1 on the completion's tokens (up to and including the first EOS).
        finished: `(B,)` bool, whether the completion ended with EOS (else it hit `max_new_tokens`).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """`(B, P + T)` prompt and completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """`(B, P + T)` long, 1 on prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask.long()], 1)


def eos_token_ids(generation_config: GenerationConfig) -> list[int]:
    """The config's EOS token ids as a list (transformers allows one id or several)."""
    eos = generation_config.eos_token_id
    return [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    generation_config: GenerationConfig,
    seed: int | None = None,
    batch_size: int | None = None,
) -> GenerationOutput:
    """Sample one completion of each prompt: the one sampling loop of Best-of-n, PPO's rollouts and the evaluation.

    The prompts are left-padded into one batch (with `generation_config.pad_token_id`) and sampled in sub-batches of
    `batch_size` rows, one after the other from the same random stream, in eval mode (no dropout; the previous mode is
    restored). Completions are cut after their first EOS (any of `generation_config.eos_token_id`): what follows is
    padding, which may be the EOS token itself.

    Args:
        model: a causal LM with whole weights (under ZeRO-3: gathered); each process generates on its own, so
            `synced_gpus` is off (transformers turns it on whenever a ZeRO-3 config is live, which would deadlock).
        prompt_ids: B lists of token ids (`tokenize_prompts`); repeat a prompt to draw several completions of it.
        generation_config: decoding settings; needs `pad_token_id` and `eos_token_id`.
        seed: sample under this seed in a forked RNG, leaving the caller's RNG state as it was (`chunk_seed` per
            chunk makes samples independent of the number of processes). `None`: draw from the global RNG stream
            (PPO's rollouts, whose RNG state is checkpointed).
        batch_size: rows per `model.generate` call (memory); `None` = all at once. Part of what the samples depend on.

    Returns:
        A `GenerationOutput` on the model's device.
    """
    pad_token_id = generation_config.pad_token_id
    eos = eos_token_ids(generation_config)
    if pad_token_id is None or not eos:
        raise ValueError(
            "generation_config needs `pad_token_id` and `eos_token_id`: set them from the tokenizer, e.g. "
            "`GenerationConfig(..., pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)`."
        )
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_token_ids(prompt_ids, pad_token_id, side="left")
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows = input_ids.shape[0]
    step = batch_size or rows
    completions, masks, finished = [], [], []
    forked = contextlib.nullcontext()
    if seed is not None:
        # Fork so that the samples depend on `seed` alone, and the caller's RNG state is left as it was.
        forked = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)
    with forked, eval_mode(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, rows, step):
            output = model.generate(
                input_ids=input_ids[start : start + step],
                attention_mask=attention_mask[start : start + step],
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([RefuseNaNLogits()]),
                synced_gpus=False,
            )
            new = output[:, input_ids.shape[1] :]
            # The mask of each sub-batch before padding them to one length: padding is never part of a completion.
            mask, done = completion_mask(new, eos)
            completions.append(new)
            masks.append(mask)
            finished.append(done)
    length = max(c.shape[1] for c in completions)
    completion_ids = torch.cat([F.pad(c, (0, length - c.shape[1]), value=pad_token_id) for c in completions])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1]), value=0.0) for m in masks])
    completion_ids = torch.where(mask.bool(), completion_ids, pad_token_id)
    return GenerationOutput(input_ids, attention_mask, completion_ids, mask, torch.cat(finished))


def end_at_pad(output: GenerationOutput, generation_config: GenerationConfig) -> GenerationOutput:
    """`output` with each completion ended before a pad token sampled ahead of its EOS, as TRL 1.12's `PPOTrainer`
    ends completions: the pad token and what follows become padding, and such a completion is not `finished`.

    A policy can sample the pad token when it is not an EOS token. `generate` keeps it as a token of the completion
    (Best-of-n and the evaluation do so; decoding without special tokens then drops it from the text); PPO's rollouts
    end the completion there instead. A no-op when the pad token is an EOS token (`generate` already cut there).

    Returns:
        A `GenerationOutput` with `completion_ids`, `completion_mask` `(B, T)` and `finished` `(B,)` updated.
    """
    pad_token_id = generation_config.pad_token_id
    early_pad = (output.completion_ids == pad_token_id) & output.completion_mask.bool()
    if pad_token_id in eos_token_ids(generation_config) or not early_pad.any():
        return output
    length = output.completion_ids.shape[1]
    cut = early_pad.any(1)
    first_pad = torch.where(cut, early_pad.int().argmax(1), torch.full_like(cut, length, dtype=torch.long))
    keep = torch.arange(length, device=cut.device)[None] < first_pad[:, None]
    return GenerationOutput(
        output.prompt_ids,
        output.prompt_mask,
        torch.where(keep, output.completion_ids, pad_token_id),
        output.completion_mask * keep,
        output.finished & ~cut,
    )


def decode_completions(
    tokenizer: PreTrainedTokenizerBase, output: GenerationOutput, conversational: bool
) -> tuple[list[Any], list[list[int]]]:
    """The completions as TRL passes them to reward functions, and their token ids (up to and including the EOS).

    Texts skip special tokens; conversational prompts get `[{"role": "assistant", "content": text}]`.
    """
    lengths = output.completion_mask.sum(1).long().tolist()
    ids = [row[:n] for row, n in zip(output.completion_ids.tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if conversational:
        texts = [[{"role": "assistant", "content": t}] for t in texts]
    return texts, ids


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities of sampled tokens.


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `tokens` `(B, T)` under `logits` `(B, T, V)`. Returns `(B, T)`."""
    return torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, `(B, T, V)` -> `(B, T)`."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def completion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """The model's `logits` at the positions that predict the completion tokens.

    Args:
        model: a causal LM (logits `(B, P + T, V)`) or a value model (per-token outputs `(B, P + T, 1)`).
        input_ids, attention_mask: `(B, P + T)` left-padded prompts followed by completions (`GenerationOutput`).
        prompt_length: P.

    Returns:
        `(B, T, ...)`: row t predicts completion token t.
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.logits[:, prompt_length - 1 : -1]


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities `(B, T)` of the completion tokens under `model` at `temperature` (those of the tempered
    distribution the tokens were drawn from), and the tempered logits `(B, T, V)`. Inputs as `completion_logits`."""
    logits = completion_logits(model, input_ids, attention_mask, prompt_length) / temperature
    return logprobs_from_logits(logits, input_ids[:, prompt_length:]), logits


def reference_logprobs(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`completion_logprobs` `(B, T)` under the reference policy: `reference`, or with `reference=None` the PEFT
    `policy` with its adapter disabled (the base model, without a second copy in memory)."""
    if reference is not None:
        return completion_logprobs(reference, input_ids, attention_mask, prompt_length, temperature)[0]
    if not isinstance(policy, PeftModel):
        raise ValueError(
            "No reference policy: pass a reference model, or a PEFT policy (its reference is itself with the adapter "
            "disabled)."
        )
    with policy.disable_adapter():
        return completion_logprobs(policy, input_ids, attention_mask, prompt_length, temperature)[0]
