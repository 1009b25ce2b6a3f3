"""Every recipe under every CPU launch config of `recipes/accelerate/` (two gloo processes: DDP, DeepSpeed ZeRO-2,
ZeRO-3), as a user launches them, with tiny budgets; and the equalities that make the configs interchangeable:

- reward training + posterior fit: the adapters of the three configs agree, and each posterior equals the one a single
  process fits on the same adapter (the curvature is summed over processes; under ZeRO-3 on gathered weights);
- Best-of-N: one process and two ZeRO-3 processes draw the same samples and select the same ones;
- PPO and GRPO: one step each on the cached world and proxies of the Best-of-N run.

One test per config; the three share nothing but the DeepSpeed op compiled by the first (`~/.cache/torch_extensions`).
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.recipe_runs import RECIPES, load_recipe, run_recipe

from .test_distributed import _launch, _run

# The same world, pairs and proxies for bon.py, ppo.py and grpo.py: the later recipes reuse the cached stages.
WORLD = [
    "--num_eval_prompts", "4", "--num_train_pairs", "48", "--num_eval_pairs", "12", "--num_demonstrations", "400",
    "--sft_num_train_epochs", "1", "--seeds", "0", "--num_train_epochs", "1", "--max_new_tokens", "8",
]  # fmt: skip
BON = [*WORLD, "--ensemble_size", "2", "--num_samples", "8", "--ks", "1.0", "--uwo_ks", "1.0",
       "--sample_block_prompts", "2", "--prompt_batch_size", "1"]  # fmt: skip
PPO = [*WORLD, "--methods", "LA", "--ppo_steps", "1", "--ppo_batch_size", "8", "--ppo_micro_batch_size", "4",
       "--ppo_mini_batches", "2", "--ppo_epochs", "1", "--ppo_eval_steps", "1", "--ppo_save_steps", "1"]  # fmt: skip
GRPO = [*WORLD, "--methods", "LA", "--grpo_steps", "1", "--grpo_prompts_per_step", "2", "--num_generations", "4",
        "--grpo_eval_steps", "1"]  # fmt: skip
# 100 pairs in batches of 8: 13 fitting batches, 7 on one process and 6 on the other (unequal work under ZeRO-3).
REWARD = ["--num_train_pairs", "100", "--num_eval_pairs", "24", "--num_train_epochs", "1"]


def refit_one_process(out) -> dict[str, torch.Tensor]:
    """The posterior a single process fits on the adapter that `recipes/reward.py` saved in `out`, with the recipe's
    own settings and pairs."""
    from trl_bayes import BayesianRewardModel, BayesianRewardTrainer
    from trl_bayes.experiments.preference_data import load_preference_splits
    from trl_bayes.laplace_lora import laplace_tensors

    argv = ["--output_dir", str(out / "refit"), *REWARD]
    script_args, training_args, _ = load_recipe("reward").make_parser().parse_args_and_config(argv)
    train, _, _ = load_preference_splits(script_args, training_args.seed)
    saved = BayesianRewardModel.from_pretrained(out)
    trainer = BayesianRewardTrainer(
        saved.model, args=training_args, train_dataset=train, processing_class=saved.tokenizer
    )
    return laplace_tensors(trainer.fit_posterior().laplace)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_every_recipe_runs_under_the_config(tmp_path, config):
    # 1. reward model + posterior, and the single-process refit of the same adapter
    rm = tmp_path / "rm"
    _run(_launch(config, RECIPES / "reward.py", "--output_dir", str(rm), *REWARD))
    summary = json.loads((rm / "eval_summary.json").read_text())
    assert summary["num_train_pairs"] == 100 and summary["prior_precision"] > 0
    posterior = load_file(str(rm / "laplace_posterior.safetensors"))
    refit = refit_one_process(rm)
    assert sorted(refit) == sorted(posterior)
    for name, value in posterior.items():
        # The curvature of 13 batches summed on one process vs 7 + 6 summed per process then all-reduced: equal up to
        # float32 summation order (relative 1e-5 on factors of size ~1e2, so the atol covers near-zero entries).
        torch.testing.assert_close(value, refit[name], rtol=1e-5, atol=1e-5, msg=f"{config}: {name}")

    # 2. Best-of-N: the world, the SFT policy and the proxies trained under the config, samples and scores sharded
    bon = tmp_path / "bon"
    _run(_launch(config, RECIPES / "bon.py", "--output_dir", str(bon), *BON))
    with (bon / "bon_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = {"MAP", "LA", "LA-rel", "Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel"}
    methods |= {"Prior-rel", "Hidden-Euc", "Hidden-Maha", "SFT-NLL"}  # the typicality baselines (issue 16)
    assert {r["method"] for r in rows} == methods  # the relative variance is scored by whole prompts per process

    # 3. PPO and GRPO, one step each, on the world and proxies cached by the Best-of-N run
    cache = ["--cache_dir", str(bon / "cache")]
    _run(_launch(config, RECIPES / "ppo.py", "--output_dir", str(tmp_path / "ppo"), *cache, *PPO))
    _run(_launch(config, RECIPES / "grpo.py", "--output_dir", str(tmp_path / "grpo"), *cache, *GRPO))
    for recipe in ("ppo", "grpo"):
        with (tmp_path / recipe / f"{recipe}_results.csv").open() as f:
            steps = {(r["method"], int(r["step"])) for r in csv.DictReader(f)}
        assert steps == {("LA", 0), ("LA", 1)}, recipe
    trained = sorted(p.name for p in (bon / "cache" / "proxies").iterdir())
    assert trained == ["seed0-member0", "seed0-member1"], "ppo.py and grpo.py must reuse the cached proxies"

    if config == "zero3":
        # 4. One process on the same world and proxies draws the same samples and makes the same selections.
        one = tmp_path / "bon-one"
        shutil.copytree(bon / "cache", one / "cache", ignore=shutil.ignore_patterns("samples", "scores"))
        run_recipe(RECIPES / "bon.py", "--output_dir", str(one), *BON, "--num_workers", "1")  # every job in-process
        blocks = sorted((bon / "cache" / "samples").glob("block*.json"))
        assert blocks and all((one / "cache" / "samples" / b.name).read_text() == b.read_text() for b in blocks)
        with (one / "bon_results.csv").open() as f:
            single = list(csv.DictReader(f))
        assert [r["method"] for r in single] == [r["method"] for r in rows]
        for a, b in zip(rows, single, strict=True):
            # Gold values of the selected samples: equal unless two proxy scores tie within float noise (~1e-6).
            assert float(a["gold_reward"]) == pytest.approx(float(b["gold_reward"]), abs=1e-9), (a, b)
            assert float(a["proxy_reward"]) == pytest.approx(float(b["proxy_reward"]), rel=1e-5, abs=1e-6), (a, b)
