"""Preference pairs for the reward recipe (recipes/reward.py): generated offline (the offline world's shopping lists),
a Hub dataset, a local file (json/jsonl/csv/parquet/arrow) or a local folder, split into training and held-out pairs."""

from __future__ import annotations

from pathlib import Path

# datasets' packaged loaders, by file suffix: a `--dataset_name` ending in one of these is a local file, never a Hub id.
LOCAL_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_preference_splits(script_args, seed: int):
    """Training and held-out preference pairs, plus a one-line description of where they came from. `script_args`:
    the reward recipe's `RewardScriptArguments` (`dataset_*`, `eval_fraction`, `max_*_pairs`; offline: `num_*_pairs`,
    `synthetic_*`); `seed` splits off the held-out pairs of a dataset without a test split."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    from trl_bayes.experiments.world import make_preference_dataset

    if script_args.dataset_name is None:
        # Offline default: two seeds give two samples of the same world; pairs that the (small) world happens to draw
        # twice are dropped from the held-out set so that its accuracy is on pairs never trained on.
        args = script_args
        train = make_preference_dataset(args.num_train_pairs, args.synthetic_seed, args.synthetic_label_noise)
        seen = set(zip(train["prompt"], train["chosen"], train["rejected"], strict=True))
        candidates = make_preference_dataset(
            2 * args.num_eval_pairs, args.synthetic_seed + 1, args.synthetic_label_noise
        )
        keep = [
            i
            for i, row in enumerate(
                zip(candidates["prompt"], candidates["chosen"], candidates["rejected"], strict=True)
            )
            if row not in seen
        ][: args.num_eval_pairs]
        source = f"offline synthetic pairs (trl_bayes.experiments.world, seeds {args.synthetic_seed}/{args.synthetic_seed + 1})"
        return train, candidates.select(keep), source

    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file():
        loader = LOCAL_FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ValueError(f"Cannot read {path}: supported files are {sorted(LOCAL_FILE_LOADERS)} (or a folder).")
        data = load_dataset(loader, data_files=str(path))
    elif path.is_dir():
        # `save_to_disk` folders have their own format; any other folder goes through datasets' folder loaders.
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = load_from_disk(str(path))
        else:
            data = load_dataset(str(path), name=script_args.dataset_config)
    elif name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FILE_LOADERS or name.count("/") > 1:
        # Hub ids are `name` or `org/name`: anything else that does not exist is a mistyped local path, and sending it
        # to the Hub would only produce a confusing network error.
        raise FileNotFoundError(f"--dataset_name {name!r}: no such file or folder (cwd: {Path.cwd()}).")
    else:
        data = load_dataset(name, name=script_args.dataset_config)

    if isinstance(data, Dataset):
        data = DatasetDict({script_args.dataset_train_split: data})
    if script_args.dataset_train_split not in data:
        raise ValueError(
            f"{name} has no split {script_args.dataset_train_split!r} (it has {list(data)}): pass "
            "--dataset_train_split."
        )
    train = data[script_args.dataset_train_split]
    if script_args.dataset_test_split in data:
        held_out = data[script_args.dataset_test_split]
        source = f"{name} [{script_args.dataset_train_split} / {script_args.dataset_test_split}]"
    else:
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=seed)
        train, held_out = split["train"], split["test"]
        source = (
            f"{name} [{script_args.dataset_train_split}, no {script_args.dataset_test_split!r} split: "
            f"{script_args.eval_fraction:.0%} held out]"
        )
    if script_args.max_train_pairs is not None:
        train = train.select(range(min(script_args.max_train_pairs, len(train))))
    if script_args.max_eval_pairs is not None:
        held_out = held_out.select(range(min(script_args.max_eval_pairs, len(held_out))))
    return train, held_out, source
