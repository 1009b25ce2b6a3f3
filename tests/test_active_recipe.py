"""The active-learning recipe as a user launches it: a tiny offline run that writes its results and resumes from its
cache, fail-fast checks, and the GPU config parsed through the same code path."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import pytest

from tests.recipe_runs import assert_fails_before_any_work, load_recipe, run_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "active.py"
GPU_CONFIG = RECIPE.parent / "configs" / "active_pythia_alpacafarm.yaml"
TINY = [
    "--num_eval_prompts", "3", "--num_validation_prompts", "0", "--num_samples", "8", "--ns", "2", "8",
    "--num_train_pairs", "24", "--num_eval_pairs", "8", "--num_demonstrations", "200", "--sft_num_train_epochs", "1",
    "--seeds", "0", "--num_train_epochs", "1", "--sample_block_prompts", "3", "--initial_pairs", "8",
    "--pairs_per_round", "4", "--num_rounds", "2", "--pool_candidates", "3", "--num_bon_prompts", "2",
    "--num_workers", "1",
]  # fmt: skip


def test_tiny_run_writes_every_round_and_resumes_from_cache(tmp_path):
    out = tmp_path / "active"
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    with (out / "active_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"] for r in rows} == {"random", "variance", "bald", "thompson"}
    assert [int(r["num_labels"]) for r in rows if r["strategy"] == "bald"] == [8, 12, 16]
    # Round 0 is the seed's first model, shared by the strategies: the same metrics under each.
    assert len({r["map_nll"] for r in rows if r["round"] == "0"}) == 1
    assert {"bon_map_8", "bon_la_rel_2", "distinct_prompts", "near_duplicates"} <= set(rows[0])
    for row in rows:
        if row["round"] != "0":
            assert 1 <= int(row["distinct_prompts"]) <= 4 and 0 <= float(row["near_duplicates"]) <= 1
    # Each round labels new pool pairs: a strategy's labels grow by 4 distinct pairs per round.
    cache = out / "cache"
    for strategy in ("random", "thompson"):
        labelled = json.loads((cache / "active" / f"{strategy}-seed0-round2" / "record.json").read_text())["labelled"]
        assert len(labelled) == len(set(labelled)) == 8
    summary = (out / "summary.md").read_text()
    assert "Labels to reach random's final accuracy" in summary and "| thompson |" in summary
    assert "What was selected" in summary and "| round (select + train + evaluate) |" in summary
    assert (out / "active_curves.png").stat().st_size > 10_000

    markers = sorted(cache.rglob("done.json"))
    assert len(markers) == 4 + 1 + 1 + 4 * 2  # world, pairs, samples, gold; pool; round 0; 4 strategies x 2 rounds
    stamps = {m: m.stat().st_mtime_ns for m in markers}
    before = (out / "active_results.csv").read_text()
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps, "a cached round was computed again"
    assert (out / "active_results.csv").read_text() == before

    # Warm-started rounds live beside the others (a shared cache never overwrites them) and reuse round 0.
    warm = tmp_path / "warm"
    run_recipe(RECIPE, "--output_dir", str(warm), "--cache_dir", str(cache), "--warm_start", "true",
               "--strategies", "random", *TINY)  # fmt: skip
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps, "the warm-started run touched the cold run's stages"
    assert len(list((cache / "active-warm-start-1").glob("random-seed0-round*/done.json"))) == 2
    with (warm / "active_results.csv").open() as f:
        warm_rows = list(csv.DictReader(f))
    assert warm_rows[0]["map_nll"] == next(r["map_nll"] for r in rows if r["round"] == "0")
    assert "warm start from the last round's adapter, 1 epoch(s)" in (warm / "summary.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategies", "random", "entropy"], "unknown ['entropy']"),
        (["--initial_pairs", "2000"], "--initial_pairs 2000 > --num_train_pairs 1000"),
        (["--pool_candidates", "1"], "--pool_candidates 1"),
        (["--ns", "64", "1024"], "n = [1024] outside [1, num_samples=512]"),
        (["--num_bon_prompts", "65"], "--num_bon_prompts 65 > --num_eval_prompts 64"),
        (["--num_rounds", "0"], "--num_rounds 0"),
        (["--gold_reward", "/no/such/gold-rm"], "--gold_reward /no/such/gold-rm"),
    ],
)
def test_bad_configuration_fails_before_any_work(tmp_path, flags, message):
    assert_fails_before_any_work(RECIPE, tmp_path, flags, message)


def test_sampling_defaults_are_the_best_of_n_recipes():
    """The Best-of-N samples are one stage for both recipes: the fields its key reads must default alike."""
    bon = {f.name: f.default for f in fields(load_recipe("bon").BoNScriptArguments)}
    active = {f.name: f.default for f in fields(load_recipe("active").ActiveScriptArguments)}
    for name in ("num_samples", "prompt_batch_size", "generation_batch_size", "sample_block_prompts", "sampling_seed",
                 "score_batch_size"):  # fmt: skip
        assert active[name] == bon[name], name


def test_gpu_config_parses_and_names_its_setup(tmp_path):
    result = run_recipe(
        RECIPE, "--config", str(GPU_CONFIG), "--dry_run", "true", "--bf16", "false", "--output_dir", str(tmp_path)
    )
    plan = result.stdout
    assert "policy: EleutherAI/pythia-1.4b" in plan and "tatsu-lab/alpaca_farm" in plan
    assert (
        "labels: 1000 + 8 x 1000 pairs; strategies ['random', 'variance', 'bald', 'thompson']; seeds [0, 1, 2]" in plan
    )
    assert "EleutherAI/pythia-70m + LoRA r=8, kron Laplace, from scratch per round" in plan
    assert "Best-of-n [64, 512] on 50 prompts x 12500 samples" in plan
    assert "not found here: --gold_reward path/to/alpaca-farm-reward-model-human" in plan
    assert not (tmp_path / "cache").exists()
