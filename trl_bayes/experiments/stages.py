"""The offline alignment world as cached stages, shared by the Best-of-N, PPO and GRPO studies (recipes/bon.py,
ppo.py, grpo.py): one world, one set of caches.

Stages (each a folder under `<output_dir>/cache/`, done when its `done.json` holds the settings it was made with, so
a rerun or a killed run resumes): the world (instructions + SFT policy) and preference pairs sampled from the policy and
labelled by the gold reward (here), then the proxies (`trl_bayes.experiments.proxies`). With a Hub policy
(`policy_name_or_path`) the same stages load instructions from a dataset and the gold from a reward model instead.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_bayes.experiments.gold import ShardedReward


@dataclass
class WorldArguments:
    """The world, its preference data and its proxies: the arguments every recipe on the offline world shares. Their
    defaults are the default runs' (recipes/bon.py, ppo.py, grpo.py); a recipe's own dataclass may override one.

    Parameters that control the world:
        policy_name_or_path (`str` or `None`): the SFT policy (Hub id or folder); unset = the offline world's tiny
            GPT-NeoX, trained here on generated demonstrations.
        prompts_dataset_name, prompts_dataset_config, prompts_split: where the instructions come from with a Hub
            policy; unset = the offline world's instructions.
        prompt_template (`str`): a Python format string over the dataset's columns that makes one prompt, e.g. the
            Alpaca template "...### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n".
        gold_reward (`str`): `world` (the offline world's known function) or a sequence-classification reward model
            (Hub id or folder), the oracle.
        world (`str`): which offline world, `lists` (world 1, the default; exploit: repeated items), `off_topic`
            (world 2; exploit: other categories' items) or `rare` (world 3; the best answers, closed lists, are rare
            in the SFT distribution): its gold and demonstrations (`trl_bayes.experiments.world.World`).
        world_seed, num_demonstrations, sft_*: the offline world (see `trl_bayes.experiments.world.WorldConfig`).

    Parameters that control the preference data and proxies:
        num_train_pairs, label_noise, num_eval_pairs: pairs sampled from the policy on training (held-out) prompts.
        seeds (`list[int]`): independent repetitions; each trains `ensemble_size` proxies.
        ensemble_size (`int`): members per ensemble (Ens, LA-Ens); member 0 is the seed's MAP / LA model.

    Parameters that control the held-out prompts and the policy's sampling:
        num_eval_prompts, num_train_prompts, max_new_tokens, temperature, top_k, top_p.
        num_validation_prompts (`int`): prompts held out beside the reported ones, for choosing settings such as the
            penalty strength k (Best-of-N) without looking at the reported prompts; 0 = none.

    Parameters that control the processes:
        num_workers (`int` or `None`): worker processes for the stages' independent jobs (each proxy, each block of
            samples, each proxy's scores) under a one-process launch; unset = the usable CPU cores on a machine
            without CUDA, else 1 (`trl_bayes.experiments.workers`). The results do not depend on it.
    """

    # world
    policy_name_or_path: str | None = field(default=None, metadata={"help": "SFT policy; unset = offline world."})
    prompts_dataset_name: str | None = field(default=None, metadata={"help": "Instructions dataset (Hub policy)."})
    prompts_dataset_config: str | None = field(default=None, metadata={"help": "Its config name."})
    prompts_split: str = field(default="train", metadata={"help": "Its split."})
    prompt_template: str = field(default="{instruction}", metadata={"help": "Format string over its columns."})
    gold_reward: str = field(default="world", metadata={"help": "'world' or a reward model (Hub id or folder)."})
    world: str = field(default="lists", metadata={"help": "Offline world: 'lists' (world 1), 'off_topic' or 'rare'."})
    world_seed: int = field(default=0, metadata={"help": "Offline world: seed of prompts and demonstrations."})
    num_demonstrations: int = field(default=6000, metadata={"help": "Offline world: SFT demonstrations."})
    sft_hidden_size: int = field(default=64, metadata={"help": "Offline world: SFT policy width."})
    sft_num_hidden_layers: int = field(default=2, metadata={"help": "Offline world: SFT policy depth."})
    # 3, not 3.0: the value enters the cache keys as written, and the caches of every run so far say 3.
    sft_num_train_epochs: float = field(default=3, metadata={"help": "Offline world: SFT epochs."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Offline world: SFT learning rate."})
    # preference data and proxies
    num_train_pairs: int = field(default=1000, metadata={"help": "Preference pairs to train each proxy on."})
    label_noise: float = field(default=0.25, metadata={"help": "Fraction of training labels flipped."})
    num_eval_pairs: int = field(default=512, metadata={"help": "Noiseless held-out pairs for the diagnostics."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Independent repetitions."})
    ensemble_size: int = field(default=4, metadata={"help": "Members per ensemble (>= 2)."})
    # held-out prompts and sampling
    num_eval_prompts: int = field(default=64, metadata={"help": "P: held-out prompts."})
    num_validation_prompts: int = field(
        default=16, metadata={"help": "Held-out prompts for choosing k, never reported (0 = none)."}
    )
    num_train_prompts: int | None = field(default=None, metadata={"help": "Hub prompts for pairs (None = rest)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Completion length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1 = off)."})
    # processes (in no cache key: the results do not depend on it)
    num_workers: int | None = field(
        default=None, metadata={"help": "Worker processes for independent jobs; unset = usable CPU cores (no CUDA)."}
    )

    def __post_init__(self):
        if self.num_eval_prompts < 1:
            raise ValueError("--num_eval_prompts must be >= 1.")
        if self.num_validation_prompts < 0:
            raise ValueError("--num_validation_prompts must be >= 0.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {self.seeds}: give one or more distinct seeds.")
        if not self.gold_reward:
            raise ValueError("--gold_reward is empty: pass 'world' (offline world) or a reward model id/folder.")
        if self.gold_reward == "world" and self.policy_name_or_path is not None:
            raise ValueError(
                "--gold_reward world scores the offline world's instructions only, but --policy_name_or_path is set: "
                "pass a gold reward model (e.g. --gold_reward path/to/gold-rm) or unset the policy."
            )
        if self.policy_name_or_path is not None and self.prompts_dataset_name is None:
            raise ValueError("--policy_name_or_path is set: also pass --prompts_dataset_name (the instructions).")
        if self.world not in ("lists", "off_topic", "rare"):
            raise ValueError(
                f"--world {self.world!r}: choose 'lists', 'off_topic' or 'rare' (trl_bayes.experiments.world.World)."
            )
        if self.world != "lists" and not (self.offline and self.gold_reward == "world"):
            raise ValueError(
                f"--world {self.world} is an offline world: unset --policy_name_or_path, --gold_reward world."
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"--label_noise {self.label_noise}: must be in [0, 0.5).")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num_workers {self.num_workers}: must be >= 1 (unset = the usable CPU cores).")

    def missing_local_paths(self) -> list[str]:
        """The model/data arguments that name a local path (not a Hub id) that does not exist."""
        missing = []
        for name in ("gold_reward", "policy_name_or_path", "prompts_dataset_name"):
            value = getattr(self, name)
            # Hub ids are `name` or `org/name`: anything else is a local path, and a mistyped one would otherwise get
            # a confusing network error from the Hub, after the world was built.
            if value and value != "world" and (value.startswith((".", "/", "~")) or value.count("/") > 1):
                if not Path(value).expanduser().exists():
                    missing.append(f"--{name} {value}")
        return missing

    @property
    def offline(self) -> bool:
        return self.policy_name_or_path is None


# ---------------------------------------------------------------------------------------------------------------------
# Caching: one folder per stage; a stage is done when its `done.json` holds the stage's key (the settings it used).


class Stage:
    """A cached stage under `<cache>/<name>`: `done` when finished with the same `key`; `finish()` marks it."""

    def __init__(self, cache: Path, name: str, key: dict[str, Any]):
        self.path = cache / name
        self.key = json.loads(json.dumps(key, default=str))
        self.created = time.perf_counter()  # the work of a stage follows its creation

    @property
    def done(self) -> bool:
        marker = self.path / "done.json"
        return marker.is_file() and json.loads(marker.read_text()) == self.key

    @property
    def partial(self) -> bool:
        """Started with the same key but not finished (its finished parts can be kept)."""
        marker = self.path / "started.json"
        return marker.is_file() and json.loads(marker.read_text()) == self.key

    def start(self) -> Path:
        """An empty folder for the stage (a stale or half-written one is removed)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        (self.path / "started.json").write_text(json.dumps(self.key, indent=2) + "\n")
        return self.path

    def finish(self) -> None:
        # Beside done.json, not in it: the key must compare equal across runs, the time never does.
        (self.path / "seconds.json").write_text(json.dumps(time.perf_counter() - self.created) + "\n")
        (self.path / "done.json").write_text(json.dumps(self.key, indent=2) + "\n")


class StageClock:
    """Wall time per named stage of a recipe; a stage named twice adds up. `seconds` ends with the `total`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.clock
        self.clock = now

    def finish(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self.start
        return self.seconds


# ---------------------------------------------------------------------------------------------------------------------
# The world and the preference pairs


def world_settings(args: WorldArguments) -> dict[str, Any]:
    settings = _world_settings(args)
    if args.num_validation_prompts:  # absent when 0, so that worlds cached before the field existed stay valid
        settings["num_validation_prompts"] = args.num_validation_prompts
    if args.world != "lists":  # the same for world 1's caches
        settings["world"] = args.world
    return settings


def _world_settings(args: WorldArguments) -> dict[str, Any]:
    if args.offline:
        return {
            "world_seed": args.world_seed,
            "num_eval_prompts": args.num_eval_prompts,
            "num_demonstrations": args.num_demonstrations,
            "sft": [
                args.sft_hidden_size,
                args.sft_num_hidden_layers,
                args.sft_num_train_epochs,
                args.sft_learning_rate,
            ],
        }
    return {
        "policy": args.policy_name_or_path,
        "prompts": [args.prompts_dataset_name, args.prompts_dataset_config, args.prompts_split, args.prompt_template],
        "num_eval_prompts": args.num_eval_prompts,
        "num_train_prompts": args.num_train_prompts,
        "seed": args.world_seed,
    }


def build_world(args: WorldArguments, cache: Path, state) -> tuple[list[str], list[str], str]:
    """(training prompts, held-out prompts, policy path); trains and caches the offline SFT policy. The validation
    prompts (`num_validation_prompts`, held out too, never reported) are read with `validation_prompts`.

    Every process takes part: the SFT policy trains data-parallel (a trainer on the main process alone would meet the
    other processes' barriers with its own collectives), and the prompts are derived identically everywhere.
    """
    stage = Stage(cache, "world", world_settings(args))
    if not stage.done:
        if state.is_main_process:
            stage.start()
        state.wait_for_everyone()
        path = stage.path
        if args.offline:
            train_prompts, held_out = train_offline_world(args, path, state)
        else:
            train_prompts, held_out = load_instructions(args)
        eval_prompts, validation = held_out[: args.num_eval_prompts], held_out[args.num_eval_prompts :]
        if state.is_main_process:
            record = {"train": train_prompts, "eval": eval_prompts, "validation": validation}
            (path / "prompts.json").write_text(json.dumps(record, indent=1))
            stage.finish()
        state.wait_for_everyone()
    prompts = json.loads((stage.path / "prompts.json").read_text())
    policy = str(stage.path / "sft_policy") if args.offline else args.policy_name_or_path
    return prompts["train"], prompts["eval"], policy


def validation_prompts(args: WorldArguments, cache: Path) -> list[str]:
    """The world's validation prompts (after `build_world`): held out from SFT and reward training like the reported
    ones, used only to choose settings."""
    return json.loads((Stage(cache, "world", world_settings(args)).path / "prompts.json").read_text()).get(
        "validation", []
    )


def train_offline_world(args: WorldArguments, path: Path, state) -> tuple[list[str], list[str]]:
    """The offline world's prompt split (training, held out = reported + validation), and its SFT policy trained on
    generated demonstrations into `path`."""
    from trl_bayes.experiments.world import (
        build_tokenizer,
        make_demonstrations,
        split_prompts,
        train_sft_policy,
        world_config,
    )

    world = world_config(
        args.world,
        seed=args.world_seed,
        num_eval_prompts=args.num_eval_prompts + args.num_validation_prompts,
        num_demonstrations=args.num_demonstrations,
    )
    train_prompts, eval_prompts = split_prompts(world)
    tokenizer = build_tokenizer()
    demonstrations = make_demonstrations(train_prompts, world)
    if state.is_main_process:
        demonstrations.to_json(path / "demonstrations.jsonl")
    state.print(f"[world] training the SFT policy on {len(demonstrations)} demonstrations")
    train_sft_policy(
        demonstrations,
        tokenizer,
        str(path / "sft_policy"),
        hidden_size=args.sft_hidden_size,
        num_hidden_layers=args.sft_num_hidden_layers,
        num_train_epochs=args.sft_num_train_epochs,
        learning_rate=args.sft_learning_rate,
        seed=args.world_seed,
        disable_tqdm=True,
        logging_strategy="no",
    )
    if state.is_main_process:
        tokenizer.save_pretrained(path / "sft_policy")
    return train_prompts, eval_prompts


def load_instructions(args: WorldArguments) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts from `prompts_dataset_name` (Hub id or local file) through `prompt_template`; the
    held-out ones are the `num_eval_prompts` reported, then the `num_validation_prompts`."""
    from datasets import load_dataset

    source = Path(args.prompts_dataset_name).expanduser()
    if source.is_file():  # a local json/jsonl/csv/parquet file of instructions
        loader = {".jsonl": "json"}.get(source.suffix, source.suffix.lstrip("."))
        data = load_dataset(loader, data_files=str(source), split="train")
    else:
        data = load_dataset(args.prompts_dataset_name, args.prompts_dataset_config, split=args.prompts_split)
    try:
        formatted = [args.prompt_template.format(**row) for row in data.shuffle(seed=args.world_seed)]
    except KeyError as error:
        raise ValueError(
            f"--prompt_template names the column {error} that {args.prompts_dataset_name} lacks (it has "
            f"{data.column_names})."
        ) from error
    prompts = list(dict.fromkeys(formatted))
    held = args.num_eval_prompts + args.num_validation_prompts
    if len(prompts) <= held:
        raise ValueError(
            f"{len(prompts)} distinct prompts: fewer than --num_eval_prompts + --num_validation_prompts + 1."
        )
    eval_prompts, train_prompts = prompts[:held], prompts[held:]
    if args.num_train_prompts is not None:
        train_prompts = train_prompts[: args.num_train_prompts]
    return train_prompts, eval_prompts


def load_policy(policy_path: str, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_bayes.distributed import whole_weights

    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with whole_weights():  # each process samples its own prompts
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # generation masks padding: any token works
    return policy, tokenizer


def generation_config(args: WorldArguments):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator):
    """Preference pairs sampled from the policy and labelled by the gold: (train, held-out) datasets."""
    import random

    from datasets import Dataset, load_dataset

    from trl_bayes import BestOfNSampler
    from trl_bayes.experiments.world import label_pairs

    key = {"world": world_settings(args), "pairs": [args.num_train_pairs, args.label_noise, args.num_eval_pairs]}
    key["generation"] = [args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.gold_reward]
    stage = Stage(cache, "pairs", key)
    if not stage.done:
        policy, tokenizer = load_policy(policy_path, accelerator.device)
        sampler = BestOfNSampler(
            policy, tokenizer, n=2, generation_config=generation_config(args), prompt_batch_size=256,
            seed=args.world_seed + 17, accelerator=accelerator,
        )  # fmt: skip
        rng = random.Random(args.world_seed + 5)
        datasets = {}
        for split, prompts, num, noise in (
            ("train", train_prompts, args.num_train_pairs, args.label_noise),
            ("eval", eval_prompts, args.num_eval_pairs, 0.0),
        ):
            # Ties (equal gold) carry no label: draw 50% more than needed and keep the first `num` untied pairs.
            drawn = [rng.choice(prompts) for _ in range(math.ceil(1.5 * num) + 8)]
            completions = sampler.generate(drawn)
            # Every process holds every pair; the gold labelling is split over processes and gathered.
            pairs = label_pairs(drawn, [c[0] for c in completions], [c[1] for c in completions],
                                seed=args.world_seed + 7, label_noise=noise, gold=ShardedReward(gold, accelerator))  # fmt: skip
            if len(pairs) < num:
                raise RuntimeError(f"Only {len(pairs)} untied {split} pairs out of {len(drawn)} draws (wanted {num}).")
            datasets[split] = pairs.select(range(num))
        if accelerator.is_main_process:
            path = stage.start()
            for split, data in datasets.items():
                data.to_json(path / f"{split}.jsonl")
            stage.finish()
        accelerator.wait_for_everyone()
        del policy
    load = lambda split: load_dataset("json", data_files=str(stage.path / f"{split}.jsonl"), split="train")  # noqa: E731
    train, held_out = load("train"), load("eval")
    return Dataset.from_dict(train.to_dict()), Dataset.from_dict(held_out.to_dict())


# ---------------------------------------------------------------------------------------------------------------------
# The plan a recipe prints with --dry_run


def world_plan(
    args: WorldArguments,
    training_args,
    model_args,
    *,
    validation_for: str | None = None,
    policy_note: str | None = None,
    proxies: bool = True,
    members: int | None = None,
) -> list[str]:
    """What the shared stages will load or build, from the config alone (no download): one line each for the world
    (its held-out and validation prompts), the policy, the gold reward, the preference pairs and the proxies. A
    recipe's own lines follow.

    Args:
        validation_for: what the validation prompts choose (e.g. "k"), said on the world line; unset = not said.
        policy_note: how the recipe trains the policy (e.g. "full fine-tuning"), in parentheses on its line.
        proxies: whether the recipe trains the proxies stage (the active-learning recipe trains its own models).
        members: proxies per seed the recipe trains; unset = `args.ensemble_size`.
    """
    source = f"offline world '{args.world}', seed {args.world_seed}" if args.offline else args.prompts_dataset_name
    use = f" for {validation_for}" if validation_for else ""
    policy = args.policy_name_or_path or "offline tiny GPT-NeoX SFT policy (trained here)"
    lines = [
        f"world: {source} -> {args.num_eval_prompts} held-out prompts "
        f"(+ {args.num_validation_prompts} validation prompts{use})",
        f"policy: {policy}" + (f" ({policy_note})" if policy_note else ""),
        f"gold reward: {args.gold_reward}",
        f"pairs: {args.num_train_pairs} sampled + gold-labelled ({args.label_noise:.0%} flipped), "
        f"{args.num_eval_pairs} held out",
    ]
    if proxies:
        lines.append(
            f"proxies: {model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r} "
            f"alpha={model_args.lora_alpha}, {training_args.hessian_structure} Laplace, "
            f"{len(args.seeds)} seeds x {args.ensemble_size if members is None else members} members"
        )
    return lines
