"""The offline alignment world (`trl_bayes.experiments.world`): deterministic for a seed, a gold reward that is the documented function, labels that
follow it (up to the requested noise)."""

from __future__ import annotations

import math

import pytest

from trl_bayes.experiments.world import (
    CATEGORIES,
    WorldConfig,
    build_tokenizer,
    gold_reward,
    gold_score,
    label_pairs,
    make_demonstrations,
    off_topic_gold_reward,
    off_topic_gold_score,
    prompt_category,
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
