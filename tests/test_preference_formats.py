"""TRL's four preference formats, table-driven: standard or conversational, explicit or implicit prompt, through
training, the posterior fit, scoring, pairs and the relative variance. The fixtures are shaped like hh-rlhf rows
(standard, implicit: "\\n\\nHuman: ... \\n\\nAssistant: ..." texts) and UltraFeedback rows (conversational, explicit:
prompt + chosen/rejected message lists, with the score columns; and the implicit form, whole conversations)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_bayes import BayesianRewardConfig, BayesianRewardTrainer, tokenize_response
from trl_bayes.experiments.world import build_tokenizer, vocabulary
from trl_bayes.preference_formats import check_preference_dataset, preference_format, preference_pairs

from .conftest import lora_config, make_reward_model

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"

# Six pairs over three prompts (two pairs each, so that each prompt groups four completions). The responses of a pair
# differ from their first word on, so that TRL's extracted prompt is the question whole.
PAIRS = [
    ("please list fruits", "apple pear fig", "saw saw"),
    ("please list fruits", "plum kiwi", "red dog"),
    ("name a few tools", "hammer saw drill", "tea"),
    ("name a few tools", "wrench", "cat cow"),
    ("give me some colors", "red blue", "onion"),
    ("give me some colors", "pink gold white", "horse"),
]


def hh_prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


FORMATS = {
    ("standard", "explicit"): [{"prompt": hh_prompt(q), "chosen": f" {c}", "rejected": f" {r}"} for q, c, r in PAIRS],
    # Anthropic/hh-rlhf: the whole dialogue in each of chosen and rejected.
    ("standard", "implicit"): [
        {"chosen": f"{hh_prompt(q)} {c}", "rejected": f"{hh_prompt(q)} {r}"} for q, c, r in PAIRS
    ],
    # trl-lib/ultrafeedback_binarized-like, with an explicit prompt and UltraFeedback's score columns.
    ("conversational", "explicit"): [
        {
            "prompt": user(q),
            "chosen": assistant(c),
            "rejected": assistant(r),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for q, c, r in PAIRS
    ],
    ("conversational", "implicit"): [
        {"chosen": user(q) + assistant(c), "rejected": user(q) + assistant(r)} for q, c, r in PAIRS
    ],
}
EXPLICIT_TWIN = {
    ("standard", "implicit"): ("standard", "explicit"),
    ("conversational", "implicit"): ("conversational", "explicit"),
}


def dataset(fmt) -> Dataset:
    return Dataset.from_list(FORMATS[fmt])


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_tokenizer(vocabulary() + ["Human", "Assistant", "user", "assistant"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train(tokenizer, tmp_path, rows: Dataset) -> BayesianRewardTrainer:
    args = BayesianRewardConfig(
        str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        posterior_batch_size=2,
        learning_rate=1e-2,
        num_train_epochs=1,
        seed=0,
    )
    trainer = BayesianRewardTrainer(
        make_reward_model(tokenizer),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(chat_tokenizer, tmp_path_factory):
    """One trainer per format, trained (MAP + posterior) on that format's rows."""
    return {fmt: train(chat_tokenizer, tmp_path_factory.mktemp("-".join(fmt)), dataset(fmt)) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", list(FORMATS), ids="-".join)
def test_format_is_recognised(fmt):
    assert all(preference_format(row) == fmt for row in FORMATS[fmt])


@pytest.mark.parametrize("fmt", list(FORMATS), ids="-".join)
def test_train_fit_and_score_every_format(trained, chat_tokenizer, fmt):
    trainer = trained[fmt]
    assert trainer.posterior is not None and trainer.posterior.laplace.n_data == len(PAIRS)
    prompts, chosen, rejected = preference_pairs(dataset(fmt))
    # Scoring tokenizes each (prompt, completion) exactly as the trainer tokenized the row.
    assert [tokenize_response(chat_tokenizer, p, c) for p, c in zip(prompts, chosen, strict=True)] == list(
        trainer.train_dataset["chosen_ids"]
    )
    assert [tokenize_response(chat_tokenizer, p, r) for p, r in zip(prompts, rejected, strict=True)] == list(
        trainer.train_dataset["rejected_ids"]
    )
    # fit_posterior on rows of the same format refits the same posterior.
    refit = trainer.fit_posterior(dataset(fmt))
    assert refit.laplace.n_data == len(PAIRS)
    posterior = trainer.posterior
    mean_c, var_c = posterior.predict(prompts, chosen)
    mean_r, _ = posterior.predict(prompts, rejected)
    assert (var_c > 0).all()
    diff_mean, diff_var = posterior.predict_pairs(prompts, chosen, rejected)
    torch.testing.assert_close(diff_mean, mean_c - mean_r, rtol=1e-5, atol=1e-6)
    assert (diff_var > 0).all()
    # Relative variance: groups keyed by the (extracted) prompt, four completions per question.
    mean, var, relative = posterior.predict_relative(prompts + prompts, chosen + rejected)
    torch.testing.assert_close(mean, torch.cat([mean_c, mean_r]), rtol=1e-5, atol=1e-6)
    assert (relative > 0).all() and not torch.allclose(relative, var)


@pytest.mark.parametrize("fmt", list(EXPLICIT_TWIN), ids="-".join)
def test_implicit_prompt_is_extracted_and_scores_like_its_explicit_twin(trained, fmt):
    posterior = trained[EXPLICIT_TWIN[fmt]].posterior
    implicit, explicit = preference_pairs(dataset(fmt)), preference_pairs(dataset(EXPLICIT_TWIN[fmt]))
    assert implicit == explicit  # TRL's extract_prompt recovers the question (and the space before the answer)
    for got, expected in zip(posterior.predict_pairs(*implicit), posterior.predict_pairs(*explicit), strict=True):
        torch.testing.assert_close(got, expected)
    prompts, chosen, rejected = implicit
    explicit_prompts = explicit[0]
    got = posterior.predict_relative(prompts + prompts, chosen + rejected)
    expected = posterior.predict_relative(explicit_prompts + explicit_prompts, explicit[1] + explicit[2])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    # Grouped by prompt, not all together: with one group the relative variances would differ.
    lumped = posterior.predict_relative([""] * (2 * len(PAIRS)), chosen + rejected)[2]
    assert not torch.allclose(lumped, got[2])


def test_texts_with_no_common_start_get_an_empty_prompt():
    # TRL's extract_prompt steps back to index -1 when the first characters differ and the chosen text ends in a space.
    rows = [{"chosen": "apple pear ", "rejected": "saw"}]
    assert preference_pairs(rows) == ([""], ["apple pear "], ["saw"])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "x", "completion": "y", "label": True}, r"has columns \['completion', 'label', 'prompt'\]"),
        ({"messages": user("hi") + assistant("ho")}, r"has columns \['messages'\]"),
        (
            {"chosen": "apple", "rejected": assistant("saw")},
            "must both be strings or both lists of messages, got str and list",
        ),
        (
            {"chosen": ["apple"], "rejected": ["saw"]},
            "must both be strings or both lists of messages, got list and list",
        ),
        (
            {"prompt": "hi", "chosen": user("hi") + assistant("a"), "rejected": user("hi") + assistant("b")},
            "`prompt` is a str but `chosen` and `rejected` are conversational",
        ),
    ],
)
def test_rows_in_no_preference_format_are_refused_naming_the_columns(chat_tokenizer, tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        preference_pairs([row])
    with pytest.raises(ValueError, match=f"`train_dataset`: .*{match}"):
        check_preference_dataset(Dataset.from_list([row]), "train_dataset")
    args = BayesianRewardConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match=match):
        BayesianRewardTrainer(
            make_reward_model(chat_tokenizer),
            args=args,
            train_dataset=Dataset.from_list([row]),
            processing_class=chat_tokenizer,
            peft_config=lora_config(),
        )
