"""Everything between text and a policy's samples, in one place: padding, tokenization (responses for the reward model,
prompts for the policy, with chat templates), the one sampling loop (`generate`), decoding, and the log-probabilities
of the sampled tokens.

Best-of-n (`BestOfNSampler`), PPO's rollouts and the held-out evaluation of PPO and GRPO (`evaluate_policy`) all sample
through `generate`, so they tokenize, pad, seed and cut completions the same way. `generate` decodes with `decode`, a
lean loop that reproduces `model.generate` token for token under plain sampling and greedy settings (`lean_settings`
says which), and hands any other setting (beam search, repetition penalty, ...) to `model.generate` itself.

Shapes: B sequences, P prompt tokens (left-padded), T completion tokens (the completion mask marks the tokens up to and
including the first EOS), V the vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, PeftType
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation import GenerationMode
from trl.data_utils import _tokenize

# ---------------------------------------------------------------------------------------------------------------------
# Tokenization and padding.


def tokenize_response(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> list[int]:
    """Token ids of one (prompt, completion) as `trl.RewardTrainer` tokenizes a `prompt`/`chosen` pair.

    Plain text: `prompt + completion`, with EOS appended to the completion unless it already ends with it.
    Conversational (lists of messages): the tokenizer's chat template over `prompt + completion`.
    """
    return tokenize_responses(tokenizer, [prompt], [completion])[0]


def tokenize_responses(
    tokenizer: PreTrainedTokenizerBase | ProcessorMixin, prompts: Sequence[Any], completions: Sequence[Any]
) -> list[list[int]]:
    """Token ids of many (prompt, completion), equal row for row to `tokenize_response` of each.

    The plain-text rows go through one `tokenizer(text=[...])` call: a fast tokenizer encodes the list in parallel in
    Rust, the same ids as one call per text (no padding or truncation either way), 1.7 x faster on 1024 responses of
    256 tokens on 2 idle cores (scripts/bench_posterior.py measures its scoring batch). Conversational rows go through
    the chat template one by one, as do all rows of a `ProcessorMixin` (TRL's `_tokenize` unwraps the batch dimension a
    processor adds). Order is kept.

    Returns:
        B lists of token ids, B = `len(prompts)` = `len(completions)`.
    """
    if len(prompts) != len(completions):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(completions)} completions: pass one prompt per completion."
        )
    ids: list[list[int]] = [[] for _ in prompts]
    rows, texts = [], []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(completion, list):
            messages = (prompt if isinstance(prompt, list) else []) + completion
            ids[row] = list(_tokenize(tokenizer, messages)["input_ids"])
            continue
        if not isinstance(completion, str) or not isinstance(prompt, str):
            raise TypeError(
                f"prompts and completions must be strings or lists of messages, got {type(prompt).__name__} and "
                f"{type(completion).__name__}"
            )
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        rows.append(row)
        texts.append(prompt + completion)
    if isinstance(tokenizer, ProcessorMixin):
        encoded = [_tokenize(tokenizer, text)["input_ids"] for text in texts]
    elif texts:
        # TRL's `_tokenize` calls `tokenizer(text=text)` on each training pair; the batch call gives the same ids.
        encoded = tokenizer(text=texts)["input_ids"]
    else:
        encoded = []
    for row, row_ids in zip(rows, encoded, strict=True):
        ids[row] = list(row_ids)
    return ids


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


# Settings that `decode` leaves out, each with the values at which `model.generate` builds no logits processor or
# stopping rule for it (transformers 5.x `_get_logits_processor`, `_get_stopping_criteria`). A config that sets any of
# them to another value is decoded by `model.generate` itself.
_OFF = {
    "guidance_scale": (None, 1.0),
    "sequence_bias": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "top_h": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "max_time": (None,),
    "stop_strings": (None,),
    "token_healing": (None, False),
    "cache_implementation": (None,),
    "prefill_chunk_size": (None,),
    "num_return_sequences": (None, 1),
    "is_assistant": (None, False),
}


def lean_settings(model: torch.nn.Module, generation_config: GenerationConfig) -> GenerationConfig | None:
    """The settings `model.generate` would decode with (`generation_config`, then the model's own
    `generation_config` for what it leaves unset, then transformers' defaults), if `decode` reproduces its tokens for
    them; `None` if not (beam search, repetition penalty, stop strings, ... or a model whose generation inputs
    differ from the causal LM's), and then `model.generate` decodes.

    Args:
        model: a causal LM with whole weights (a PEFT policy: its base model, the adapter injected in it).
    """
    if not isinstance(model, GenerationMixin) or model.config.is_encoder_decoder:
        return None
    # A model that builds its own generation inputs (multimodal, prompt tuning) is decoded by `model.generate`.
    if type(model).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return None
    accepted = inspect.signature(model.forward).parameters
    if not {"attention_mask", "position_ids", "logits_to_keep", "cache"} <= accepted.keys():
        return None  # e.g. remote code still on `past_key_values`: a `cache` would land in **kwargs, unused
    # Only mps defers generate's stop check by a step (one more sample drawn, then undone).
    if model.device.type == "mps":
        return None
    # Two private transformers internals, both what `model.generate` itself calls: the merge of the settings, and
    # whether the model takes a `DynamicCache` (test_generation.py's equality tests fail if either changes meaning).
    settings, model_kwargs = model._prepare_generation_config(generation_config)
    if settings.get_generation_mode() not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH) or model_kwargs:
        return None
    if settings.max_new_tokens is None or settings.max_new_tokens < 1:
        return None
    if any(getattr(settings, name) not in off for name, off in _OFF.items()):
        return None
    if settings.use_cache and not model._supports_default_dynamic_cache():
        return None
    return settings


def sampling_processors(settings: GenerationConfig) -> list[LogitsProcessor]:
    """The logits processors `model.generate` applies under `settings` (those `lean_settings` accepts), in its order:
    ours (`RefuseNaNLogits`) after transformers' own (none under these settings), then the sampling warpers."""
    processors: list[LogitsProcessor] = [RefuseNaNLogits()]
    if settings.do_sample:
        if settings.temperature is not None and settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k is not None and settings.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
    return processors


@torch.inference_mode()
def decode(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationConfig
) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask, settings)`'s output, token for token, without its per-call and
    per-step generality: the same forward calls (inputs, position ids, mask, cache, `logits_to_keep=1`), the same
    logits processors in the same order on the same float32 logits, the same draws (`torch.multinomial` on the
    softmax; argmax when greedy), the same padding of finished rows and the same stop rule. tests/test_generation.py
    checks the equality.

    Runs in inference mode (generate's `no_grad` plus no autograd bookkeeping: the same numbers, less time per step);
    its output is an inference tensor, to be copied before autograd saves it.

    Args:
        model: a causal LM that `lean_settings` accepts.
        input_ids, attention_mask: `(B, P)` left-padded prompts.
        settings: what `lean_settings` returned.

    Returns:
        `(B, P + T)` prompts and samples (T <= `max_new_tokens`; rows that ended earlier are padded).
    """
    processors = sampling_processors(settings)
    eos = torch.tensor(eos_token_ids(settings), device=input_ids.device)
    # As generate: position ids count each prompt's tokens from its first non-pad one; a mask of ones is left out.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    cache = DynamicCache(config=model.config.get_text_config(decoder=True)) if settings.use_cache else None
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids, step_positions, last_position = input_ids, position_ids, position_ids[:, -1:]
    for _ in range(settings.max_new_tokens):
        outputs = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            logits_to_keep=1,
            use_cache=settings.use_cache,
            return_dict=True,
            **({"cache": cache} if cache is not None else {}),
        )
        scores = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        for processor in processors:
            scores = processor(input_ids, scores)
        if settings.do_sample:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, settings.pad_token_id)  # finished rows get padding
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        last_position = last_position + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        unfinished = unfinished & ~torch.isin(tokens, eos)
        if not unfinished.any():
            break
        if cache is not None:  # only the new token goes in
            step_ids, step_positions = input_ids[:, -1:], last_position
        else:  # the whole sequence again
            position_ids = torch.cat([position_ids, last_position], dim=-1)
            step_ids, step_positions = input_ids, position_ids
    return input_ids


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
        batch_size: rows decoded together (memory); `None` = all at once. Part of what the samples depend on.

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
    # The lean loop where it reproduces `model.generate` exactly (a LoRA policy: its base model, adapter injected),
    # `model.generate` itself for any other setting or model.
    causal_lm = model
    if isinstance(model, PeftModel):
        peft_config = model.active_peft_config
        decoded_by_peft = peft_config.is_prompt_learning or peft_config.peft_type == PeftType.POLY
        causal_lm = None if decoded_by_peft else model.get_base_model()
    settings = lean_settings(causal_lm, generation_config) if causal_lm is not None else None
    completions, masks, finished = [], [], []
    forked = contextlib.nullcontext()
    if seed is not None:
        # Fork so that the samples depend on `seed` alone, and the caller's RNG state is left as it was.
        forked = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)
    with forked, eval_mode(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, rows, step):
            ids, att = input_ids[start : start + step], attention_mask[start : start + step]
            if settings is not None:
                output = decode(causal_lm, ids, att, settings).clone()  # a normal tensor again (for autograd)
            else:
                output = model.generate(
                    input_ids=ids,
                    attention_mask=att,
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
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **no_cache(model))
    return out.logits[:, prompt_length - 1 : -1]


def no_cache(model: torch.nn.Module) -> dict[str, bool]:
    """`{"use_cache": False}` for a model whose config asks for a KV cache (Hub checkpoints such as Pythia's do), else
    `{}`: a scoring or training forward that builds a cache it never reads costs about a tenth of a PPO update on the
    tiny setup (scripts/bench_ppo_vs_trl.py --policy_cache). A config without `use_cache` gets nothing, so models that
    do not take the argument are called as before."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", False) else {}


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
