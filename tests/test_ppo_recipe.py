"""The PPO recipe as a user launches it: offline smoke run with a tiny budget, rerun from cache, fail-fast checks, and
the paper-scale config parsed into a plan."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.recipe_runs import assert_fails_before_any_work, run_recipe
from tests.test_trackers import read_scalars

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ppo.py"
PAPER_CONFIG = RECIPE.parent / "configs" / "ppo_pythia_alpacafarm.yaml"
TINY = [
    "--num_eval_prompts", "4", "--num_train_pairs", "48", "--num_eval_pairs", "12", "--num_demonstrations", "400",
    "--sft_num_train_epochs", "1", "--seeds", "0", "--ensemble_size", "2", "--num_train_epochs", "1",
    "--methods", "MAP", "LA", "LA-Ens", "--ppo_steps", "2", "--ppo_batch_size", "8", "--ppo_micro_batch_size", "4",
    "--ppo_mini_batches", "2", "--ppo_epochs", "1", "--ppo_eval_steps", "1", "--ppo_save_steps", "1",
    "--max_new_tokens", "8",
]  # fmt: skip


def test_offline_smoke_run_writes_results_and_reruns_from_cache(tmp_path):
    out = tmp_path / "ppo"
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    with (out / "ppo_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]
    assert {(r["method"], r["penalty"]) for r in rows} == {("MAP", "none"), ("LA", "std"), ("LA-Ens", "std")}
    assert {int(r["step"]) for r in rows} == {0, 1, 2}
    step0 = {r["gold_reward"] for r in rows if r["step"] == "0"}
    assert len(step0) == 1, "every method starts from the same SFT policy, evaluated on the same draw"
    assert (out / "ppo_curves.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| MAP |" in summary and "| LA (std, k=1) |" in summary and "Time per PPO step" in summary
    assert (out / "cache" / "ppo" / "MAP-seed0" / "run" / "checkpoint-2").is_dir()

    # A second run reuses every cached stage, the PPO runs included: nothing is trained again.
    markers = sorted((out / "cache").rglob("done.json"))
    stamps = {m: m.stat().st_mtime_ns for m in markers}
    before = (out / "ppo_results.csv").read_text()
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps
    assert (out / "ppo_results.csv").read_text() == before

    # The relative variance: each completion centered on K reference-policy samples of its prompt, drawn once; LA-rel
    # always uses it; Ens-UWO penalizes the variance of the 2 MAP members. Only the LA, LA-rel and Ens-UWO runs are
    # new; world, pairs, proxies and the MAP run come from the cache. A KL penalty runs in folders of its own.
    methods = TINY.index("LA-Ens")
    flags = [*TINY[:methods], "LA-rel", "Ens-UWO", *TINY[methods + 1 :], "--uncertainty", "relative",
             "--num_reference_samples", "3", "--kl_coef", "0"]  # fmt: skip
    run_recipe(RECIPE, "--output_dir", str(out), *flags)
    summary = (out / "summary.md").read_text()
    assert "| LA (std, k=1, relative) |" in summary
    assert "| LA-rel (std, k=1) |" in summary and "| Ens-UWO (uwo, k=1) |" in summary
    with (out / "ppo_results.csv").open() as f:
        penalties = {r["method"]: r["penalty"] for r in csv.DictReader(f)}
    assert penalties == {"MAP": "none", "LA": "std", "LA-rel": "std", "Ens-UWO": "uwo"}
    reference = json.loads((out / "cache" / "reference_samples" / "reference.json").read_text())
    prompts = json.loads((out / "cache" / "world" / "prompts.json").read_text())
    assert set(reference) == set(prompts["train"]) | set(prompts["eval"])
    assert all(len(completions) == 3 for completions in reference.values())
    assert (out / "cache" / "ppo" / "MAP-seed0" / "done.json").stat().st_mtime_ns == stamps[
        out / "cache" / "ppo" / "MAP-seed0" / "done.json"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "MAP", "DPO"], "unknown ['DPO']"),
        (["--penalty", "cube"], "--penalty 'cube'"),
        (["--uncertainty", "absolute"], "--uncertainty 'absolute'"),
        (["--methods", "LA-Ens", "--ensemble_size", "1"], "LA-Ens needs >= 2 members"),
        (["--methods", "MAP", "Ens-UWO", "--ensemble_size", "1"], "Ens-UWO needs >= 2 members"),
        (["--methods", "LA-rel", "--num_reference_samples", "0"], "--num_reference_samples must be >= 1"),
        (["--ppo_batch_size", "48"], "--ppo_batch_size 48 must be a multiple"),
        (["--gold_reward", "/no/such/gold-rm"], "--gold_reward /no/such/gold-rm"),
        (["--output_dir", "/proc/no-write/ppo"], "Cannot write to output_dir"),
    ],
)
def test_bad_configuration_fails_before_any_work(tmp_path, flags, message):
    assert_fails_before_any_work(RECIPE, tmp_path, flags, message)


def test_baseline_methods_need_their_penalized_reward_option(monkeypatch):
    """A typicality baseline runs through `PenalizedReward(uncertainty=...)`: without that option (before issue 16's
    baselines land) the recipe stops with the option's name and the fix; with it, the check passes."""
    import trl_bayes.penalties
    from trl_bayes.experiments.ppo_study import BASELINE_UNCERTAINTIES, check_baselines_available

    monkeypatch.setattr(trl_bayes.penalties, "UNCERTAINTIES", ("marginal", "relative"))
    with pytest.raises(
        ValueError, match=r"--methods Hidden-Maha needs PenalizedReward\(uncertainty='hidden_mahalanobis'\)"
    ):
        check_baselines_available(["MAP", "LA-rel", "Hidden-Maha"])
    check_baselines_available(["MAP", "LA", "LA-rel", "LA-Ens", "Ens-UWO"])  # no baseline: nothing to check
    monkeypatch.setattr(
        trl_bayes.penalties, "UNCERTAINTIES", ("marginal", "relative", *BASELINE_UNCERTAINTIES.values())
    )
    check_baselines_available(["Prior-rel", "Hidden-Euc", "Hidden-Maha"])


def test_paper_config_parses_into_the_paper_plan(tmp_path):
    result = run_recipe(
        RECIPE, "--config", str(PAPER_CONFIG), "--dry_run", "true", "--bf16", "false", "--output_dir", str(tmp_path)
    )
    plan = result.stdout
    assert "policy: EleutherAI/pythia-1.4b" in plan and "tatsu-lab/alpaca_farm" in plan
    assert "EleutherAI/pythia-70m + LoRA r=8 alpha=16, kron Laplace, 3 seeds x 1 members" in plan
    assert "methods ['MAP', 'LA (std, k=1)']" in plan and "max_new_tokens=300" in plan
    assert not (tmp_path / "cache").exists()


def test_ppo_recipe_logs_laplace_proxy_gold_and_kl_to_the_tracker(tmp_path):
    out = tmp_path / "ppo"
    flags = [f for f in TINY if f not in ("MAP", "LA-Ens")] + ["--report_to", "tensorboard"]
    run_recipe(RECIPE, "--output_dir", str(out), *flags)
    scalars = read_scalars(out / "cache" / "ppo" / "LA-seed0" / "run")
    for tag in ("eval/gold_reward", "eval/reward", "eval/kl", "eval/laplace/reward"):
        assert tag in scalars, sorted(scalars)
    assert [step for step, _ in scalars["eval/gold_reward"]] == [0, 1, 2]
