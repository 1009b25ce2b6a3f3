"""Preference data in TRL's four formats (standard or conversational, explicit or implicit prompt): `preference_format`
names a row's, `preference_pairs` gives any of them as explicit (prompt, chosen, rejected), `check_preference_dataset`
rejects early a dataset `RewardTrainer` would reject late or obscurely, and `pair_ids` reads the `(chosen, rejected)`
token ids of a dataset `RewardTrainer` tokenized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from trl.data_utils import get_dataset_column_names, maybe_extract_prompt

PREFERENCE_FORMATS = (
    "TRL's preference formats are `chosen` and `rejected` as strings (standard) or as lists of messages with a "
    "`role` (conversational), with a `prompt` of the same kind (explicit prompt) or without one (implicit prompt: the "
    "prompt is the shared start of `chosen` and `rejected`)"
)


def _row_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m for m in value):
        return "conversational"
    return None


def preference_format(example: Mapping[str, Any]) -> tuple[str, str]:
    """The TRL preference format of one row: `("standard" | "conversational", "explicit" | "implicit")`.

    Raises:
        ValueError: when the row is none of the four formats; the message names the columns found.
    """
    columns = sorted(example)
    if "chosen" not in example or "rejected" not in example:
        raise ValueError(
            f"A preference row needs `chosen` and `rejected`; this one has columns {columns}. {PREFERENCE_FORMATS}."
        )
    chosen, rejected = example["chosen"], example["rejected"]
    kind = _row_kind(chosen)
    if kind is None or _row_kind(rejected) != kind:
        raise ValueError(
            f"`chosen` and `rejected` must both be strings or both lists of messages, got {type(chosen).__name__} and "
            f"{type(rejected).__name__} (columns {columns}). {PREFERENCE_FORMATS}."
        )
    if "prompt" not in example:
        return kind, "implicit"
    if _row_kind(example["prompt"]) != kind:
        raise ValueError(
            f"`prompt` is a {type(example['prompt']).__name__} but `chosen` and `rejected` are {kind} (columns "
            f"{columns}): give a prompt of the same kind, or drop the `prompt` column if `chosen` and `rejected` "
            f"already contain it. {PREFERENCE_FORMATS}."
        )
    return kind, "explicit"


def preference_pairs(rows: Iterable[Mapping[str, Any]]) -> tuple[list, list, list]:
    """Prompts, chosen and rejected completions of preference rows in any of TRL's four formats, with the prompt
    explicit: an implicit one is extracted as TRL extracts it (`trl.data_utils.maybe_extract_prompt`: the longest
    common start of `chosen` and `rejected`, whole messages for conversations).

    `prompt + chosen` is the row's chosen text (or conversation) unchanged, and so for `rejected`: scores do not depend
    on where the prompt ends. The extracted prompt keys the groups of `predict_relative`; for text it may end inside
    the response when both responses start alike (TRL's rule), which splits such pairs from their prompt's group.

    Args:
        rows: a `datasets.Dataset` or any iterable of row mappings (`chosen`, `rejected`, optional `prompt`).

    Returns:
        `prompts`, `chosen`, `rejected`: lists of equal length, ready for `predict_pairs` or `predict_relative`.
    """
    prompts, chosen, rejected = [], [], []
    for i, row in enumerate(rows):
        try:
            kind, _ = preference_format(row)
        except ValueError as error:
            raise ValueError(f"Row {i}: {error}") from None
        split = maybe_extract_prompt({key: row[key] for key in ("prompt", "chosen", "rejected") if key in row})
        if kind == "standard" and split["prompt"] + split["rejected"] != row.get("prompt", "") + row["rejected"]:
            # Texts with no common start: TRL's space rule steps back to index -1 and cuts at the end. Nothing shared.
            split = {"prompt": "", "chosen": row["chosen"], "rejected": row["rejected"]}
        prompts.append(split["prompt"])
        chosen.append(split["chosen"])
        rejected.append(split["rejected"])
    return prompts, chosen, rejected


def check_preference_dataset(dataset: Any, name: str) -> None:
    """Fail fast, naming the problem, on datasets `RewardTrainer` would reject late or obscurely: none, empty, or rows
    in none of TRL's four preference formats (`preference_format`, checked on the first row)."""
    if dataset is None:
        raise ValueError(
            f"`{name}` is required: a dataset of preference pairs (`chosen`/`rejected`, optional `prompt`)."
        )
    if {"chosen_ids", "rejected_ids"} <= set(get_dataset_column_names(dataset)):
        return
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"`{name}` is empty: it needs at least one preference pair.")
    try:
        preference_format(first)
    except ValueError as error:
        raise ValueError(f"`{name}`: {error} Tokenized `chosen_ids` and `rejected_ids` are accepted too.") from None


def pair_ids(dataset) -> list[tuple[list[int], list[int]]]:
    """The `(chosen, rejected)` token ids of a dataset tokenized by `RewardTrainer` (`chosen_ids`, `rejected_ids`)."""
    return list(zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
