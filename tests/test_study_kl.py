"""scripts/study_kl.py: the gold-vs-KL frontier on hand-made evaluations, and a tiny grid (2 β x 2 methods x 1 seed)
run end to end through recipes/ppo.py, its frontier recomputed by brute force from kl_results.csv."""

from __future__ import annotations

import csv
import math

import pytest

from trl_bayes.experiments.rl_report import KL_FRONTIER_COLUMNS, KL_RESULTS_COLUMNS, kl_frontier

from .recipe_runs import load_script

TINY = [
    "--num_eval_prompts", "4", "--num_validation_prompts", "0", "--num_train_pairs", "48", "--num_eval_pairs", "12",
    "--num_demonstrations", "400", "--sft_num_train_epochs", "1", "--num_train_epochs", "1", "--ppo_steps", "2",
    "--ppo_batch_size", "8", "--ppo_micro_batch_size", "4", "--ppo_mini_batches", "2", "--ppo_epochs", "1",
    "--ppo_eval_steps", "1", "--ppo_save_steps", "2", "--max_new_tokens", "8", "--num_workers", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def study():
    return load_script("study_kl")


def brute_force_frontier(rows: list[dict], budget: float) -> dict[str, list[float]]:
    """Per method, each seed's best gold over the evaluations (any β, any step) with KL <= budget."""
    best: dict[str, dict[str, float]] = {}
    for r in rows:
        if float(r["kl"]) <= budget:
            seeds = best.setdefault(r["method"], {})
            seeds[r["seed"]] = max(seeds.get(r["seed"], -math.inf), float(r["gold_reward"]))
    return {method: [seeds[s] for s in sorted(seeds)] for method, seeds in best.items()}


def test_frontier_takes_the_best_gold_within_each_budget_over_beta_and_steps():
    row = lambda beta, seed, step, kl, gold: {"kl_coef": beta, "method": "MAP", "seed": seed, "step": step,  # noqa: E731
                                              "kl": kl, "gold_reward": gold}  # fmt: skip
    rows = [
        row(0.0, 0, 0, 0.0, 1.0),
        row(0.0, 0, 4, 3.0, 2.0),
        row(0.0, 0, 8, 10.0, 5.0),  # β = 0: high gold, high KL
        row(0.2, 0, 0, 0.0, 1.0),
        row(0.2, 0, 4, 0.9, 1.5),
        row(0.2, 0, 8, 1.5, 2.5),  # β = 0.2: less KL
        row(0.0, 1, 0, 0.0, 0.0),
        row(0.0, 1, 4, 2.0, 3.0),
    ]
    frontier = {f["kl_budget"]: f for f in kl_frontier(rows, budgets=(0.5, 1.0, 2.0, 16.0))}
    # Seed 0: budget 1 -> β 0.2 step 4 (1.5); budget 2 -> β 0.2 step 8 (2.5); budget 16 -> β 0 step 8 (5.0).
    # Seed 1: 0.0 up to budget 1, then 3.0.
    assert frontier[0.5]["gold_per_seed"] == "1.0000 0.0000"
    assert (frontier[1.0]["gold_mean"], frontier[1.0]["gold_std"]) == pytest.approx((0.75, 0.75))
    assert frontier[1.0]["kl_coef_per_seed"] == "0.2 0" and frontier[1.0]["step_per_seed"] == "4 0"
    assert (frontier[2.0]["gold_mean"], frontier[2.0]["gold_std"]) == pytest.approx((2.75, 0.25))
    assert frontier[16.0]["gold_per_seed"] == "5.0000 3.0000" and frontier[16.0]["kl_coef_per_seed"] == "0 0"


def test_tiny_grid_writes_results_and_the_frontier_of_its_runs(study, tmp_path):
    out = tmp_path / "kl"
    study.main(["--kl_coefs", "0", "0.2", "--methods", "MAP", "LA", "--seeds", "0", "--output_dir", str(out), "--",
                *TINY])  # fmt: skip
    with (out / "kl_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == KL_RESULTS_COLUMNS
    assert {(r["kl_coef"], r["method"]) for r in rows} == {(b, m) for b in ("0.0", "0.2") for m in ("MAP", "LA")}
    assert {int(r["step"]) for r in rows} == {0, 1, 2}
    # Every run starts from the SFT policy, evaluated on the same draw: KL 0, one gold.
    assert {(r["kl"], r["gold_reward"]) for r in rows if r["step"] == "0"} == {("0.0", rows[0]["gold_reward"])}
    with (out / "kl_frontier.csv").open() as f:
        frontier = list(csv.DictReader(f))
    assert list(frontier[0]) == KL_FRONTIER_COLUMNS
    assert len(frontier) == 2 * len(study.KL_BUDGETS)
    for f in frontier:
        expected = brute_force_frontier(rows, float(f["kl_budget"]))[f["method"]]
        assert float(f["gold_mean"]) == pytest.approx(sum(expected) / len(expected))
        assert [float(g) for g in f["gold_per_seed"].split()] == pytest.approx(expected, abs=1e-4)
    assert (out / "kl_frontier.png").stat().st_size > 10_000
    summary = (out / "kl_summary.md").read_text()
    assert "| MAP |" in summary and "| 0.2 | LA |" in summary and "2 steps x 8 completions" in summary
    # The two β share the world, pairs and proxies; each β has its own PPO runs.
    runs = sorted(p.name for p in (out / "cache" / "ppo").iterdir())
    assert runs == ["LA-seed0", "LA-seed0-kl0.2", "MAP-seed0", "MAP-seed0-kl0.2"]
    assert len(list((out / "cache" / "proxies").iterdir())) == 1


def test_dry_run_prints_the_grid(study, capsys):
    study.main(["--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(study.KL_COEFS) == 4
    assert all("--methods MAP LA LA-rel Ens-UWO Hidden-Maha --seeds 0 1 2" in line for line in lines)
    assert [line.split("--kl_coef ")[1].split()[0] for line in lines] == ["0", "0.01", "0.05", "0.2"]
