"""The GRPO drop-in recipe: TRL's GRPOTrainer with `reward_funcs=[PenalizedReward(...)]` on the offline world, a smoke
run with a tiny budget."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.recipe_runs import run_recipe
from tests.test_trackers import read_scalars

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo.py"
TINY = [
    "--num_eval_prompts", "4", "--num_train_pairs", "48", "--num_eval_pairs", "12", "--num_demonstrations", "400",
    "--sft_num_train_epochs", "1", "--seeds", "0", "--num_train_epochs", "1", "--grpo_steps", "2",
    "--grpo_prompts_per_step", "2", "--num_generations", "4", "--grpo_eval_steps", "1", "--max_new_tokens", "8",
]  # fmt: skip


@pytest.mark.parametrize(("trainer", "uncertainty"), [("grpo", "marginal"), ("rloo", "relative")])
def test_grpo_smoke_run_writes_results(tmp_path, trainer, uncertainty):
    out = tmp_path / "grpo"
    run_recipe(RECIPE, "--output_dir", str(out), "--trainer", trainer, "--uncertainty", uncertainty, *TINY)
    with (out / f"{trainer}_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]
    assert {(r["method"], r["penalty"]) for r in rows} == {("MAP", "none"), ("LA", "std")}
    assert {int(r["step"]) for r in rows} == {0, 1, 2}
    assert all(float(r["kl"]) == 0.0 for r in rows if r["step"] == "0")
    assert (out / f"{trainer}_curves.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "| MAP |" in summary
    assert ("| LA (std, k=1, relative) |" in summary) == (uncertainty == "relative")


def test_grpo_recipe_logs_laplace_proxy_gold_and_kl_to_the_tracker(tmp_path):
    out = tmp_path / "grpo"
    run_recipe(RECIPE, "--output_dir", str(out), "--methods", "LA", "--report_to", "tensorboard", *TINY)
    scalars = read_scalars(out / "grpo_runs")
    for tag in ("train/laplace/reward", "train/laplace/map_reward", "train/eval/gold_reward", "train/eval/kl",
                "train/eval/proxy_reward"):  # fmt: skip
        assert tag in scalars, sorted(scalars)
    assert [step for step, _ in scalars["train/eval/gold_reward"]] == [0, 1, 2]
