"""Smoke runs of the recipes as a user launches them (subprocess, tiny budgets), and their defaults: one source each,
the same run from Python and from the command line, and config files that name only known fields."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import yaml

from tests.recipe_runs import RECIPES, load_recipe, restored_logging, run_recipe
from tests.test_trackers import read_scalars
from trl_bayes import BayesianRewardModel

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
SCRIPT_ARGUMENTS = {"bon": "BoNScriptArguments", "ppo": "PPOScriptArguments", "grpo": "GRPOScriptArguments"}


@pytest.fixture(autouse=True)
def transformers_verbosity():
    """A recipe's `main` quiets transformers' logging for the process, and TrainingArguments reads that level (its
    `disable_tqdm` default): put it back after each test, as a fresh process would have it."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    yield
    transformers.logging.set_verbosity(verbosity)


def test_reward_recipe_offline_default_writes_adapter_posterior_and_summary(tmp_path):
    out = tmp_path / "rm"
    run_recipe(
        RECIPES / "reward.py",
        "--output_dir",
        str(out),
        "--num_train_pairs",
        "96",
        "--num_eval_pairs",
        "24",
        "--num_train_epochs",
        "1",
        "--hessian_structure",
        "diag",
        "--report_to",
        "tensorboard",
    )
    summary = json.loads((out / "eval_summary.json").read_text())
    # The tracker gets the training loss and the posterior's metrics; the held-out ones also reach the model card.
    scalars = read_scalars(out)
    assert "train/accuracy" in scalars and "train/laplace/eval_laplace_probit_nll" in scalars, sorted(scalars)
    assert 0.0 <= scalars["train/laplace/eval_map_accuracy"][-1][1] <= 1.0, sorted(scalars)
    card = (out / "README.md").read_text()
    assert "laplace" in card and "Laplace" in card and "accuracy" in card.lower()
    assert summary["num_train_pairs"] == 96 and summary["num_eval_pairs"] == 24
    assert summary["hessian_structure"] == "diag" and summary["prior_precision"] > 0
    assert 0.0 <= summary["metrics"]["map_accuracy"] <= 1.0
    assert (out / "summary.md").read_text().startswith("# Bayesian")
    model = BayesianRewardModel.from_pretrained(out)
    assert model.predict(["please list fruits : "], ["apple"])[1].item() > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "no/such/file.jsonl"], "no such file or folder"),
        (["--use_peft", "false"], "use_peft"),
        (["--hessian_structure", "banana"], "hessian_structure"),
    ],
)
def test_reward_recipe_fails_fast_on_bad_configuration(tmp_path, flags, message):
    result = run_recipe(RECIPES / "reward.py", "--output_dir", str(tmp_path / "x"), *flags, check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("recipe", sorted(SCRIPT_ARGUMENTS))
def test_main_from_python_runs_the_bare_command_lines_run(tmp_path, monkeypatch, recipe):
    """`main()` from Python with only `dry_run` set, and the bare command line with `--dry_run true`, record the same
    run (`config.json`: every script, training and model argument): no default lives in a file that one of them reads
    and the other does not. Compared as text, so that 3 and 3.0 differ as they do in a cache key."""
    module = load_recipe(recipe)
    python, command_line = tmp_path / "python", tmp_path / "command_line"
    python.mkdir(), command_line.mkdir()
    monkeypatch.chdir(python)  # the default output_dir is relative: outputs/<recipe>
    with restored_logging():
        module.main(getattr(module, SCRIPT_ARGUMENTS[recipe])(dry_run=True))
    run_recipe(RECIPES / f"{recipe}.py", "--dry_run", "true", cwd=command_line)
    record = (python / "outputs" / recipe / "config.json").read_text()
    assert record == (command_line / "outputs" / recipe / "config.json").read_text()
    assert json.loads(record)["script"]["dry_run"] is True and not (python / "outputs" / recipe / "cache").exists()


def test_dry_runs_describe_the_shared_stages_in_the_same_lines(tmp_path, monkeypatch, capsys):
    """bon, ppo and active build the same world and pairs stages (bon and ppo the proxies too): their `--dry_run` plans
    say so in the same lines (`world_plan`), naming the offline world, with each recipe's note where it differs."""
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative: outputs/<recipe>
    plans = {}
    for recipe, arguments in [("bon", "BoNScriptArguments"), ("ppo", "PPOScriptArguments"),
                              ("active", "ActiveScriptArguments")]:  # fmt: skip
        module = load_recipe(recipe)
        with restored_logging():
            module.main(getattr(module, arguments)(dry_run=True, world="rare", world_seed=3))
        plans[recipe] = capsys.readouterr().out.splitlines()
    world = "world: offline world 'rare', seed 3 -> 64 held-out prompts (+ 16 validation prompts"
    policy = "policy: offline tiny GPT-NeoX SFT policy (trained here)"
    gold_and_pairs = ["gold reward: world", "pairs: 1000 sampled + gold-labelled (25% flipped), 512 held out"]
    proxies = "proxies: SFT backbone + LoRA r=8 alpha=16, kron Laplace, 3 seeds x 4 members"
    assert plans["bon"][1:6] == [world + " for k)", policy, *gold_and_pairs, proxies]
    assert plans["ppo"][1:6] == [world + ")", policy + " (full fine-tuning)", *gold_and_pairs, proxies]
    assert plans["active"][1:5] == [world + ")", policy, *gold_and_pairs] and plans["active"][5].startswith("pool:")


@pytest.mark.slow
def test_reward_main_from_python_runs_the_bare_command_lines_run(tmp_path, monkeypatch):
    """The same for the reward recipe (no dry run: a small run each way), through its `run_config.json`."""
    module = load_recipe("reward")
    python, command_line = tmp_path / "python", tmp_path / "command_line"
    python.mkdir(), command_line.mkdir()
    monkeypatch.chdir(python)
    with restored_logging():
        module.main(module.RewardScriptArguments(num_train_pairs=32, num_eval_pairs=8))
    run_recipe(RECIPES / "reward.py", "--num_train_pairs", "32", "--num_eval_pairs", "8", cwd=command_line)
    record = (python / "outputs" / "reward" / "run_config.json").read_text()
    assert record == (command_line / "outputs" / "reward" / "run_config.json").read_text()
    assert json.loads(record)["training"]["learning_rate"] == 5e-3  # the recipe's default, not RewardConfig's


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_parses_and_sets_what_it_names(tmp_path, config):
    """Each config of recipes/configs parses with its recipe's parser (an unknown key is an error) and each of its keys
    reaches the parsed arguments."""
    recipe = load_recipe(config.stem.split("_")[0])
    flags = ["--config", str(config), "--bf16", "false", "--output_dir", str(tmp_path)]
    parsed = recipe.make_parser().parse_args_and_config(flags)
    values = {name: value for arguments in parsed for name, value in asdict(arguments).items()}
    for key, value in yaml.safe_load(config.read_text()).items():
        if key not in ("bf16", "output_dir", "lora_target_modules"):  # ModelConfig turns a one-item list into a str
            assert values[key] == value, (config.name, key)


def test_a_config_with_an_unknown_key_is_an_error(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("num_samplez: 8\n")
    with pytest.raises(ValueError, match="num_samplez"):
        load_recipe("bon").make_parser().parse_args_and_config(["--config", str(config)])
