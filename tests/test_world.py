"""The offline alignment world (`trl_bayes.experiments.world`): deterministic for a seed, a gold reward that is the documented function, labels that
follow it (up to the requested noise)."""

from __future__ import annotations

import math
import random

import pytest

from trl_bayes.experiments.world import (
    CATEGORIES,
    CLOSED_LIST_BONUS,
    World,
    WorldConfig,
    build_tokenizer,
    closes_list,
    gold_reward,
    gold_score,
    label_pairs,
    make_demonstrations,
    off_topic_gold_reward,
    off_topic_gold_score,
    prompt_category,
    rare_gold_reward,
    rare_gold_score,
    response_classes,
    split_prompts,
    world_config,
    world_gold_reward,
    world_prompts,
)


def test_world_is_deterministic_for_a_seed_and_changes_with_it():
    a, b, c = (
        WorldConfig(seed=0, num_demonstrations=50),
        WorldConfig(seed=0, num_demonstrations=50),
        WorldConfig(seed=1, num_demonstrations=50),
    )
    assert split_prompts(a) == split_prompts(b) and split_prompts(a) != split_prompts(c)
    train, held_out = split_prompts(a)
    assert len(held_out) == a.num_eval_prompts and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(world_prompts())
    demos_a, demos_b = make_demonstrations(train, a), make_demonstrations(train, b)
    assert demos_a.to_dict() == demos_b.to_dict()
    assert demos_a.to_dict() != make_demonstrations(split_prompts(c)[0], c).to_dict()
    assert set(demos_a["prompt"]) <= set(train)


def test_every_world_word_is_in_the_tokenizer_vocabulary():
    tokenizer = build_tokenizer()
    demos = make_demonstrations(split_prompts(WorldConfig())[0], WorldConfig(num_demonstrations=300))
    for text in [*world_prompts(), *demos["completion"]]:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_gold_is_the_documented_function():
    # +1 per distinct on-topic item, -0.5 per off-topic item, -1 per repeated word, 0 for fillers.
    assert gold_score("fruits", "apple pear plum") == 3.0
    assert gold_score("fruits", "apple apple apple") == 1.0 - 2.0
    assert gold_score("fruits", "apple hammer the the") == 1.0 - 0.5 + 0.0 - 1.0
    assert gold_reward(["name some tools : ", "tell me good fruits : "], ["saw saw", "kiwi"]) == [0.0, 1.0]
    assert prompt_category("please list a few instruments : ") == "instruments"
    with pytest.raises(ValueError, match="Not an instruction"):
        prompt_category("what is the capital of France?")


def test_off_topic_world_gold_and_demonstrations():
    # +1 per distinct on-topic item, -1 per item of another category (each time), repeats and fillers free.
    assert off_topic_gold_score("fruits", "apple pear plum") == 3.0
    assert off_topic_gold_score("fruits", "apple apple apple") == 1.0
    assert off_topic_gold_score("fruits", "apple hammer hammer the so") == 1.0 - 2.0
    assert off_topic_gold_reward(["name some tools : "], ["saw red"]) == [0.0]
    assert world_gold_reward("lists") is gold_reward and world_gold_reward("off_topic") is off_topic_gold_reward
    # World 1 keeps its defaults (its caches stay valid); world 2 mixes in other categories' items more often.
    assert world_config("lists", seed=3) == WorldConfig(seed=3)
    config = world_config("off_topic", seed=3, num_demonstrations=2000)
    assert config.seed == 3 and config.p_off_topic > WorldConfig().p_off_topic
    train = split_prompts(config)[0]
    off = [off_topic_gold_score(prompt_category(p), c) < gold_score(prompt_category(p), c) for p, c in
           zip(*make_demonstrations(train, config)[:].values(), strict=True)]  # fmt: skip
    assert 0.2 < sum(off) / len(off) < 0.8  # other categories' items are common in the demonstrations


def test_response_classes_from_the_world_vocabulary():
    prompt = "name some fruits : "
    assert response_classes(prompt, "apple pear plum fig") == ["typical"]
    assert response_classes(prompt, "apple apple apple pear") == ["repetition"]
    assert response_classes(prompt, "kiwi") == ["short"]
    assert response_classes(prompt, "apple pear plum fig grape lemon mango kiwi the") == ["long"]
    assert response_classes(prompt, "saw red apple") == ["off_topic"]
    assert response_classes(prompt, "saw saw saw saw saw saw saw saw saw") == ["repetition", "long", "off_topic"]


def test_label_pairs_follow_the_gold_and_flip_at_the_requested_rate():
    items = CATEGORIES["fruits"]
    prompts = ["name some fruits : "] * 4000
    first = [" ".join(items[: 1 + i % 5]) for i in range(4000)]
    second = [" ".join(items[: 1 + (i * 7) % 6]) for i in range(4000)]
    clean = label_pairs(prompts, first, second, seed=0)
    ties = sum(len(a.split()) == len(b.split()) for a, b in zip(first, second, strict=True))
    assert len(clean) == 4000 - ties
    assert all(gc > gr for gc, gr in zip(clean["gold_chosen"], clean["gold_rejected"], strict=True))
    noisy = label_pairs(prompts, first, second, seed=0, label_noise=0.25)
    flipped = sum(noisy["flipped"])
    assert flipped == sum(gc < gr for gc, gr in zip(noisy["gold_chosen"], noisy["gold_rejected"], strict=True))
    # Binomial(n, 0.25): within 5 standard deviations.
    n = len(noisy)
    assert abs(flipped - 0.25 * n) < 5 * math.sqrt(n * 0.25 * 0.75)
    with pytest.raises(ValueError, match="label_noise"):
        label_pairs(prompts[:2], first[:2], second[:2], seed=0, label_noise=0.5)


def test_world_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_eval_prompts"):
        WorldConfig(num_eval_prompts=0)
    with pytest.raises(ValueError, match="probabilities"):
        WorldConfig(p_repeat=-0.1)


def test_the_old_import_path_names_the_same_objects():
    """`trl_bayes.synthetic`, the world's old home, re-exports every public name of `trl_bayes.experiments.world`."""
    import inspect

    import trl_bayes.experiments.world as world
    import trl_bayes.synthetic as old

    public = {
        name
        for name, value in vars(world).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", world.__name__) == world.__name__
    }
    assert set(old.__all__) == public
    assert all(getattr(old, name) is getattr(world, name) for name in public)


def test_rare_world_gold_of_each_class():
    """World 3: world 1's gold plus +3 for a closed list ("... and <new item>") after at least one earlier item."""
    assert rare_gold_score("fruits", "apple pear plum") == 3.0  # a typical plain list: world 1's gold
    assert rare_gold_score("fruits", "apple pear and plum") == 3.0 + CLOSED_LIST_BONUS  # the rare best form
    assert rare_gold_score("fruits", "apple pear plum fig grape lemon and mango") == 7.0 + 3.0
    assert rare_gold_score("fruits", "apple apple and pear") == 1.0 - 1.0 + 1.0 + 3.0  # closed, with a repeat
    # Not closed: no item after "and", none before it, an item of another category, or an earlier item again.
    assert not closes_list("fruits", "apple pear and")
    assert rare_gold_score("fruits", "the and apple") == 1.0
    assert rare_gold_score("fruits", "apple and hammer") == 1.0 - 0.5
    assert rare_gold_score("fruits", "apple pear and apple") == 2.0 - 1.0
    # The exploits of world 1 score as there: repetition, off-topic padding, short answers.
    assert rare_gold_score("fruits", "apple apple apple apple") == gold_score("fruits", "apple apple apple apple")
    assert rare_gold_score("fruits", "saw red apple") == gold_score("fruits", "saw red apple") == 0.0
    assert rare_gold_reward(["name some tools : "], ["saw drill and clamp"]) == [6.0]
    assert world_gold_reward("rare") is rare_gold_reward and World("rare") is World.RARE
    # Worlds 1 and 2 close no list on purpose (their demonstrations, and caches, stay as they were).
    assert world_config("lists").p_closed_list == world_config("off_topic").p_closed_list == 0.0
    with pytest.raises(ValueError, match="p_closed_list"):
        WorldConfig(p_closed_list=1.5)


def test_rare_world_demonstrations_make_the_best_answers_rare():
    """The SFT policy's demonstrations close a list rarely (about 3%: 2% on purpose, the rest by chance), and those are
    worth about 3.5 gold more than the typical demonstration, which is a mediocre plain list."""
    config = world_config("rare", num_demonstrations=6000)
    demos = make_demonstrations(split_prompts(config)[0], config)
    categories = [prompt_category(p) for p in demos["prompt"]]
    closed = [closes_list(c, d) for c, d in zip(categories, demos["completion"], strict=True)]
    gold = rare_gold_reward(demos["prompt"], demos["completion"])
    frequency = sum(closed) / len(closed)
    assert 0.015 < frequency < 0.05, frequency
    mean_closed = sum(g for g, c in zip(gold, closed, strict=True) if c) / sum(closed)
    mean_other = sum(g for g, c in zip(gold, closed, strict=True) if not c) / (len(closed) - sum(closed))
    assert mean_closed > mean_other + 2.5 and mean_other < 2.5, (mean_closed, mean_other)
    # World 1's demonstrations, from the same word distribution, close a list only by chance.
    lists = world_config("lists", num_demonstrations=6000)
    plain = make_demonstrations(split_prompts(lists)[0], lists)
    by_chance = sum(closes_list(prompt_category(p), d) for p, d in zip(*plain[:].values(), strict=True)) / len(plain)
    assert by_chance < frequency - 0.01, (by_chance, frequency)


def test_closing_a_list_never_fails_when_the_head_holds_every_item():
    """With long demonstrations a head can hold all of a category's items: there is no new item to close the list
    with, so it stays open rather than raising."""
    from trl_bayes.experiments.world import CATEGORIES, WorldConfig, demonstration

    config = WorldConfig(max_demo_words=40, p_closed_list=1.0)
    rng = random.Random(0)
    demos = [(c, demonstration(rng, c, config)) for c in CATEGORIES for _ in range(200)]  # raised IndexError before
    full = [d for c, d in demos if set(CATEGORIES[c]) <= set(d.split()[:-2])]
    assert full, "no demonstration held every item: the case is not exercised"
    assert any(closes_list(c, d) for c, d in demos)  # the others still close
