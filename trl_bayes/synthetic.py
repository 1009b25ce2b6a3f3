"""Offline building blocks: a locally built tokenizer, tiny GPT-NeoX (Pythia architecture) configs and generated
preference data. Nothing here touches the Hugging Face Hub, so tests and the recipes' defaults run anywhere.

The preference data is a small "shopping list" world: a prompt asks for items of one category, a completion lists
words. The gold score rewards distinct on-topic items and penalizes off-topic words and repetition, so a reward model
has learnable but imperfect signal.
"""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPTNeoXConfig, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"

CATEGORIES: dict[str, list[str]] = {
    "fruits": ["apple", "pear", "plum", "fig", "grape", "lemon", "mango", "kiwi"],
    "tools": ["hammer", "saw", "drill", "wrench", "file", "chisel", "level", "clamp"],
    "colors": ["red", "blue", "green", "black", "white", "pink", "gray", "gold"],
    "animals": ["cat", "dog", "horse", "cow", "owl", "fox", "bear", "wolf"],
}
PROMPT_WORDS = ["please", "list", "some", "name", "a", "few", "give", "me", ":"]
FILLER_WORDS = ["and", "also", "maybe", "the", "very", "nice", "ok", "so"]


def vocabulary() -> list[str]:
    """All words of the offline world, special tokens first (ids 0, 1, 2 = pad, eos, unk)."""
    words = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *PROMPT_WORDS, *CATEGORIES, *FILLER_WORDS]
    for items in CATEGORIES.values():
        words.extend(items)
    return list(dict.fromkeys(words))


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download), splitting on whitespace and punctuation.

    Special tokens: `<pad>` (padding, distinct from EOS so sequence-classification models find the last real token),
    `<eos>` (appended by TRL's `RewardTrainer` to plain-text pairs) and `<unk>`.
    """
    words = vocabulary() if words is None else words
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN})
    return tokenizer


def tiny_gpt_neox_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 128,
    **kwargs,
) -> GPTNeoXConfig:
    """A GPT-NeoX (Pythia architecture) config small enough to train and differentiate on a CPU in seconds.

    Eager attention: the Laplace fit's curvature backends differentiate through attention in ways PyTorch's SDPA
    kernels do not support on every device.
    """
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=0.25,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,
        **kwargs,
    )
    config._attn_implementation = "eager"
    return config


def gold_score(category: str, completion: str) -> float:
    """The oracle: +1 per distinct on-topic item, -0.5 per off-topic item, -1 per repeated word."""
    words = completion.split()
    items = set(CATEGORIES[category])
    all_items = {w for ws in CATEGORIES.values() for w in ws}
    seen: set[str] = set()
    score = 0.0
    for word in words:
        if word in seen:
            score -= 1.0
        elif word in items:
            score += 1.0
        elif word in all_items:
            score -= 0.5
        seen.add(word)
    return score


def _random_completion(rng: random.Random, category: str) -> str:
    pool = CATEGORIES[category] * 2 + rng.choice(list(CATEGORIES.values())) + FILLER_WORDS
    return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))


def make_preference_dataset(num_pairs: int, seed: int = 0, label_noise: float = 0.0) -> Dataset:
    """Preference pairs `prompt`/`chosen`/`rejected` labelled by `gold_score`, deterministic for a seed.

    Ties are resampled; with probability `label_noise` the label is flipped (Coste et al. use 25%).
    Prompts end with a space because TRL joins prompt and completion with no separator.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    while len(rows["prompt"]) < num_pairs:
        category = rng.choice(list(CATEGORIES))
        prompt = f"{rng.choice(['please list', 'name a few', 'give me some'])} {category} : "
        first, second = _random_completion(rng, category), _random_completion(rng, category)
        s1, s2 = gold_score(category, first), gold_score(category, second)
        if s1 == s2:
            continue
        chosen, rejected = (first, second) if s1 > s2 else (second, first)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows["prompt"].append(prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
    return Dataset.from_dict(rows)
