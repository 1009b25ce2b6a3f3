"""The offline world: a locally built tokenizer, tiny GPT-NeoX (Pythia architecture) configs and generated
preference data. Nothing here touches the Hugging Face Hub, so tests and the recipes' defaults run anywhere.
(`trl_bayes.synthetic`, its old home, re-exports it.)

The preference data is a small "shopping list" world: a prompt asks for items of one category, a completion lists
words. The gold score rewards distinct on-topic items and penalizes off-topic words and repetition, so a reward model
has learnable but imperfect signal. Three worlds (`World`) vary the gold and the demonstrations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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
    "drinks": ["tea", "coffee", "milk", "juice", "water", "soda", "cocoa", "cider"],
    "vegetables": ["carrot", "onion", "leek", "bean", "pea", "kale", "corn", "beet"],
    "sports": ["tennis", "golf", "rugby", "chess", "polo", "boxing", "judo", "darts"],
    "instruments": ["piano", "violin", "flute", "drum", "harp", "guitar", "cello", "oboe"],
}
# Prompts are OPENER QUANTIFIER CATEGORY ":" - 6 x 6 x 8 = 288 instructions; the gold reward reads only the category.
OPENERS = ["please list", "name", "give me", "write down", "tell me", "suggest"]
QUANTIFIERS = ["some", "a few", "several", "many", "your favorite", "good"]
PROMPT_WORDS = sorted({w for phrase in OPENERS + QUANTIFIERS for w in phrase.split()} | {":"})
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


def off_topic_gold_score(category: str, completion: str) -> float:
    """The oracle of the off-topic world (`World.OFF_TOPIC`): +1 per distinct on-topic item, -1 per item of another
    category (each occurrence), and nothing else counts: a repeated on-topic item earns nothing but costs nothing,
    fillers are free. Repetition is no exploit here; padding a list with other categories' items is."""
    items = set(CATEGORIES[category])
    all_items = {w for ws in CATEGORIES.values() for w in ws}
    seen: set[str] = set()
    score = 0.0
    for word in completion.split():
        if word in items and word not in seen:
            score += 1.0
        elif word in all_items and word not in items:
            score -= 1.0
        seen.add(word)
    return score


CLOSED_LIST_BONUS = 3.0
"""Gold bonus of a closed list in the rare world (`rare_gold_score`, `closes_list`)."""


def closes_list(category: str, completion: str) -> bool:
    """Whether a completion is a closed list, the rare world's best form: its last two words are "and" and an item of
    `category` that is new (not earlier in the completion), after at least one earlier item of `category`, e.g.
    "apple pear and plum". Demonstrations close a list rarely (`WorldConfig.p_closed_list`, or by chance)."""
    words = completion.split()
    items = set(CATEGORIES[category])
    return (
        len(words) >= 3
        and words[-2] == "and"
        and words[-1] in items
        and words[-1] not in words[:-2]
        and any(w in items for w in words[:-2])
    )


def rare_gold_score(category: str, completion: str) -> float:
    """The oracle of the rare world (`World.RARE`): world 1's `gold_score`, plus `CLOSED_LIST_BONUS` (+3) for a closed
    list (`closes_list`). The best answers are closed lists of distinct items, which the SFT policy writes rarely; its
    typical answers are plain lists, worth world 1's gold only."""
    return gold_score(category, completion) + (CLOSED_LIST_BONUS if closes_list(category, completion) else 0.0)


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


# ---------------------------------------------------------------------------------------------------------------------
# The offline alignment world of the Best-of-N and PPO recipes (Gao et al. 2023's synthetic labelling, in miniature):
# instructions and demonstrations generated in code, an SFT policy trained on the demonstrations, a gold reward that is
# a known function of (prompt, completion), and preference pairs sampled from the SFT policy and labelled by the gold.
#
# Where overoptimization comes from: demonstrations list items of the requested category, with some off-topic items,
# filler words and repeats. The gold reward counts *distinct* on-topic items and charges every repeat, so a proxy
# trained on a limited number of noisily labelled pairs learns "more on-topic items is better" much more easily than
# "a repeated item is worse": Best-of-N at large n then finds long, repetitive lists that the proxy loves and the gold
# does not (the degenerate repetition of the paper's Appendix A).


class World(str, Enum):
    """Which offline world: its gold reward and its demonstrations (so its SFT policy), hence its exploit. Each world
    was fixed on one criterion only, before any Laplace penalty was evaluated on it: MAP overoptimizes."""

    LISTS = "lists"
    """World 1 (`gold_score`, `WorldConfig` defaults): +1 per distinct on-topic item, -0.5 per off-topic item, -1 per
    repeated word. Exploit: long lists that repeat items."""
    OFF_TOPIC = "off_topic"
    """World 2 (`off_topic_gold_score`, `OFF_TOPIC_DEMONSTRATIONS`): +1 per distinct on-topic item, -1 per item of
    another category, repeats and fillers free; demonstrations mix in other categories' items more often. Exploit:
    long lists padded with items of other categories (telling them apart needs the prompt's category)."""
    RARE = "rare"
    """World 3 (`rare_gold_score`, `RARE_DEMONSTRATIONS`): world 1's gold plus +3 for a closed list ("apple pear and
    plum", `closes_list`), which about 3% of the demonstrations and 1% of the SFT policy's samples are. Its gold does
    not favour typical answers: the best answers are rare in the SFT distribution, the typical ones mediocre. Exploit:
    world 1's (repeated items). Fixed on MAP's Best-of-n curve alone (docs/uncertainty_study.md)."""


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the offline alignment world. Every draw is deterministic given `seed`.

    Args:
        seed: seed of the prompt split and of the demonstrations.
        num_eval_prompts: instructions held out from SFT and reward training (Best-of-N / PPO evaluation prompts).
        num_demonstrations: SFT demonstrations drawn over the training instructions.
        max_demo_words: demonstrations have 1..max_demo_words words, uniformly.
        p_on_topic, p_off_topic, p_filler, p_repeat: probabilities of each next demonstration word being a new item
            of the requested category, an item of another category, a filler word, or a repeat of an earlier word
            (renormalized when a kind is unavailable, e.g. no earlier word to repeat).
        p_closed_list: probability that a demonstration of 3 or more words is made a closed list (`closes_list`): its
            last two words replaced by "and" and a new item of the category. 0 (worlds 1 and 2) draws nothing more.
    """

    seed: int = 0
    num_eval_prompts: int = 64
    num_demonstrations: int = 6000
    max_demo_words: int = 8
    p_on_topic: float = 0.6
    p_off_topic: float = 0.1
    p_filler: float = 0.15
    p_repeat: float = 0.15
    p_closed_list: float = 0.0

    def __post_init__(self):
        total = len(OPENERS) * len(QUANTIFIERS) * len(CATEGORIES)
        if not 1 <= self.num_eval_prompts < total:
            raise ValueError(f"WorldConfig.num_eval_prompts must be in [1, {total - 1}], got {self.num_eval_prompts}.")
        probabilities = (self.p_on_topic, self.p_off_topic, self.p_filler, self.p_repeat)
        if min(probabilities) < 0 or self.p_on_topic <= 0:
            raise ValueError(f"WorldConfig word probabilities must be >= 0 (p_on_topic > 0), got {probabilities}.")
        if not 0.0 <= self.p_closed_list <= 1.0:
            raise ValueError(f"WorldConfig.p_closed_list must be in [0, 1], got {self.p_closed_list}.")
        if self.max_demo_words < 1 or self.num_demonstrations < 1:
            raise ValueError("WorldConfig.max_demo_words and num_demonstrations must be >= 1.")


OFF_TOPIC_DEMONSTRATIONS = dict(p_on_topic=0.5, p_off_topic=0.3, p_filler=0.1, p_repeat=0.1)
"""The demonstrations' word distribution of the off-topic world (`World.OFF_TOPIC`)."""


RARE_DEMONSTRATIONS = dict(p_closed_list=0.02)
"""The demonstrations of the rare world (`World.RARE`): world 1's word distribution, 2% of them made closed lists (with
those closed by chance, about 3% in all)."""


def world_config(world: World | str = World.LISTS, **kwargs) -> WorldConfig:
    """The `WorldConfig` of `world`: the defaults for `lists`, `OFF_TOPIC_DEMONSTRATIONS` for `off_topic`,
    `RARE_DEMONSTRATIONS` for `rare`; `kwargs` (seed, sizes) pass through."""
    demonstrations = {World.LISTS: {}, World.OFF_TOPIC: OFF_TOPIC_DEMONSTRATIONS, World.RARE: RARE_DEMONSTRATIONS}
    return WorldConfig(**{**demonstrations[World(world)], **kwargs})


def world_prompts() -> list[str]:
    """All instructions of the world, in a fixed order. Each ends with a space: TRL joins prompt and completion as is."""
    return [
        f"{opener} {quantifier} {category} : "
        for category in CATEGORIES
        for opener in OPENERS
        for quantifier in QUANTIFIERS
    ]


def split_prompts(config: WorldConfig) -> tuple[list[str], list[str]]:
    """(training instructions, held-out evaluation instructions), a seeded random split of `world_prompts()`."""
    prompts = world_prompts()
    random.Random(config.seed).shuffle(prompts)
    return prompts[config.num_eval_prompts :], prompts[: config.num_eval_prompts]


def prompt_category(prompt: str) -> str:
    """The category an instruction asks for (the word before its colon)."""
    words = prompt.split()
    for i, word in enumerate(words[1:], start=1):
        if word == ":" and words[i - 1] in CATEGORIES:
            return words[i - 1]
    raise ValueError(f"Not an instruction of the offline world (no '<category> :' in it): {prompt!r}")


RESPONSE_CLASSES = ("repetition", "short", "long", "off_topic", "typical")
"""Exploit-like kinds of response in the offline worlds (`response_classes`), and `typical` for none of them."""


def response_classes(prompt: str, completion: str, max_demo_words: int = 8) -> list[str]:
    """The exploit-like classes a response belongs to (several at once, or `["typical"]`), from the world's vocabulary:

    - `repetition` (degenerate): at least 2 repeated words, making up at least a third of the words;
    - `short`: at most 2 words;
    - `long`: more words than any demonstration (`max_demo_words`): only the policy's tail produces them;
    - `off_topic`: more items of other categories than of the prompt's, and at least one.
    """
    words = completion.split()
    items = set(CATEGORIES[prompt_category(prompt)])
    all_items = {w for ws in CATEGORIES.values() for w in ws}
    repeats = len(words) - len(set(words))
    on_topic = sum(w in items for w in words)
    off_topic = sum(w in all_items and w not in items for w in words)
    classes = []
    if repeats >= 2 and 3 * repeats >= len(words):
        classes.append("repetition")
    if len(words) <= 2:
        classes.append("short")
    if len(words) > max_demo_words:
        classes.append("long")
    if off_topic > on_topic:
        classes.append("off_topic")
    return classes or ["typical"]


def gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The world's oracle as a TRL reward function: `gold_score` of each completion for its prompt's category."""
    return [gold_score(prompt_category(p), c) for p, c in zip(prompts, completions, strict=True)]


def off_topic_gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The off-topic world's oracle as a TRL reward function (`off_topic_gold_score`)."""
    return [off_topic_gold_score(prompt_category(p), c) for p, c in zip(prompts, completions, strict=True)]


def rare_gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The rare world's oracle as a TRL reward function (`rare_gold_score`)."""
    return [rare_gold_score(prompt_category(p), c) for p, c in zip(prompts, completions, strict=True)]


def world_gold_reward(world: World | str = World.LISTS) -> Callable[..., list[float]]:
    """The gold reward function of `world`."""
    return {World.LISTS: gold_reward, World.OFF_TOPIC: off_topic_gold_reward, World.RARE: rare_gold_reward}[
        World(world)
    ]


def demonstration(rng: random.Random, category: str, config: WorldConfig) -> str:
    """One demonstration for an instruction about `category` (see `WorldConfig` for the word distribution)."""
    items = CATEGORIES[category]
    others = [w for c, ws in CATEGORIES.items() if c != category for w in ws]
    words: list[str] = []
    for _ in range(rng.randint(1, config.max_demo_words)):
        fresh = [w for w in items if w not in words]
        weights = [
            config.p_on_topic if fresh else 0.0,
            config.p_off_topic,
            config.p_filler,
            config.p_repeat if words else 0.0,
        ]
        kind = rng.choices(range(4), weights=weights)[0]
        pool = (fresh, others, FILLER_WORDS, words)[kind]
        words.append(rng.choice(pool))
    # Drawn only when the world closes lists, so that worlds 1 and 2 keep their random streams (and their caches).
    if config.p_closed_list and len(words) >= 3 and rng.random() < config.p_closed_list:
        head = words[:-2]
        if not any(w in items for w in head):
            head[0] = rng.choice(items)
        unused = [w for w in items if w not in head]
        if unused:  # a head holding every item of the category (long demonstrations) stays open
            words = [*head, "and", rng.choice(unused)]
    return " ".join(words)


def make_demonstrations(prompts: list[str], config: WorldConfig) -> Dataset:
    """`config.num_demonstrations` SFT examples (`prompt`, `completion`) over `prompts`, deterministic for the seed."""
    rng = random.Random(config.seed + 1)
    rows: dict[str, list[str]] = {"prompt": [], "completion": []}
    for _ in range(config.num_demonstrations):
        prompt = rng.choice(prompts)
        rows["prompt"].append(prompt)
        rows["completion"].append(demonstration(rng, prompt_category(prompt), config))
    return Dataset.from_dict(rows)


def label_pairs(
    prompts: list[str],
    first: list[str],
    second: list[str],
    seed: int,
    label_noise: float = 0.0,
    gold: Callable[..., list[float]] | None = None,
) -> Dataset:
    """Preference pairs from two completions per prompt, labelled by the gold reward (ties dropped).

    With probability `label_noise` a label is flipped (Coste et al. 2024 use 25%), from a generator seeded by `seed`.
    `gold` is any TRL reward function `(prompts=..., completions=...) -> list[float]`; the world's `gold_reward` by
    default.

    Returns:
        A dataset with `prompt`, `chosen`, `rejected` (and `gold_chosen`, `gold_rejected`, `flipped`).
    """
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}.")
    rng = random.Random(seed)
    rows: dict[str, list] = {
        k: [] for k in ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped")
    }
    gold = gold_reward if gold is None else gold
    gold_first = gold(prompts=list(prompts), completions=list(first))
    gold_second = gold(prompts=list(prompts), completions=list(second))
    for prompt, a, b, ga, gb in zip(prompts, first, second, gold_first, gold_second, strict=True):
        if ga == gb:
            continue
        (chosen, gc), (rejected, gr) = ((a, ga), (b, gb)) if ga > gb else ((b, gb), (a, ga))
        flipped = rng.random() < label_noise
        if flipped:
            (chosen, gc), (rejected, gr) = (rejected, gr), (chosen, gc)
        for key, value in zip(rows, (prompt, chosen, rejected, gc, gr, flipped), strict=True):
            rows[key].append(value)
    return Dataset.from_dict(rows)


def train_sft_policy(
    demonstrations: Dataset,
    tokenizer: PreTrainedTokenizerFast,
    output_dir: str,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_train_epochs: float = 3.0,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    **config_kwargs,
):
    """The world's SFT policy: a tiny GPT-NeoX trained from scratch on the demonstrations with TRL's `SFTTrainer`.

    The loss is on the completions only (TRL's default for prompt/completion data) and TRL appends EOS, so the policy
    learns to stop. The model and tokenizer are saved to `output_dir`.

    Returns:
        The trained `GPTNeoXForCausalLM`, in eval mode.
    """
    import torch
    from transformers import GPTNeoXForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from trl_bayes.distributed import cpu_launch_defaults

    set_seed(seed)
    config = tiny_gpt_neox_config(
        len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = GPTNeoXForCausalLM(config)
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        bf16=False,
        # Several CPU processes talk over gloo, with use_cpu under DDP but not under DeepSpeed (`cpu_launch_defaults`).
        **{"use_cpu": not torch.cuda.is_available(), **cpu_launch_defaults()},
        save_strategy="no",
        report_to="none",
        seed=seed,
        **config_kwargs,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=demonstrations, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(output_dir)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.save_pretrained(output_dir)
    return model.eval()
