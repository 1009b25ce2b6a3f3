"""Smoke runs of the recipes as a user launches them (subprocess, tiny budgets)."""

from __future__ import annotations

import json

import pytest

from tests.recipe_runs import RECIPES, run_recipe
from trl_bayes import BayesianRewardModel


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
    )
    summary = json.loads((out / "eval_summary.json").read_text())
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
