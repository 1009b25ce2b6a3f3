"""The Best-of-N recipe as a user launches it: offline smoke run, resume from cache, fail-fast checks, and the
paper-scale config driven through the same code path with local stand-ins for its Hub models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.recipe_runs import assert_fails_before_any_work, load_recipe, run_recipe
from trl_bayes.experiments.best_of_n_study import UNCERTAINTY_COLUMNS

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bon.py"
PAPER_CONFIG = RECIPE.parent / "configs" / "bon_pythia_alpacafarm.yaml"
TINY = [
    "--num_eval_prompts", "4", "--num_samples", "16", "--num_train_pairs", "48", "--num_eval_pairs", "12",
    "--num_demonstrations", "400", "--sft_num_train_epochs", "1", "--seeds", "0", "1", "--ensemble_size", "2",
    "--num_train_epochs", "1", "--ks", "1.0", "2.0", "--uwo_ks", "1.0", "--sample_block_prompts", "2",
    "--num_validation_prompts", "2", "--num_workers", "1",
]  # fmt: skip
# One worker: jobs this small take less time than a worker's start-up (tests/test_parallel_stages.py runs two).


@pytest.mark.slow
def test_offline_default_writes_results_and_resumes_from_cache(tmp_path):
    out = tmp_path / "bon"
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    with (out / "bon_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "penalty", "k", "seed", "n", "kl", "proxy_reward", "gold_reward"]
    curves = {(r["method"], r["penalty"]) for r in rows}
    typicality = ("Prior-rel", "Hidden-Euc", "Hidden-Maha", "SFT-NLL")  # issue 16's baselines, in the defaults
    assert curves == {
        ("MAP", "none"), ("LA", "std"), ("LA", "var"), ("LA-rel", "std"), ("LA-rel", "var"), ("Ens", "mean"),
        ("Ens-WCO", "wco"), ("Ens-UWO", "uwo"), ("LA-Ens", "std"), ("LA-Ens", "var"), ("LA-Ens-rel", "std"),
        ("LA-Ens-rel", "var"), *((m, p) for m in typicality for p in ("std", "var")),
    }  # fmt: skip
    assert {r["seed"] for r in rows} == {"0", "1"} and {int(r["n"]) for r in rows} == {1, 2, 4, 8, 16}
    n1 = [float(r["gold_reward"]) for r in rows if r["n"] == "1"]
    assert max(n1) - min(n1) < 1e-9, "at n = 1 every method picks a uniformly random sample: the same expected gold"
    assert (out / "bon_curves.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| MAP |" in summary and "Time per stage" in summary and "Held-out pairs" in summary
    assert (out / "bon_diagnostics.png").is_file() and (out / "pair_metrics.csv").is_file()
    assert "Exploit-like responses" in summary and "std~length" in summary
    with (out / "bon_classes.csv").open() as f:
        classes = list(csv.DictReader(f))
    assert {r["class"] for r in classes} == {"repetition", "short", "long", "off_topic", "typical"}
    # Every uncertainty of member 0 the default methods score, named as `PenalizedReward(uncertainty=...)`'s options.
    assert {r["uncertainty"] for r in classes} == set(UNCERTAINTY_COLUMNS)
    with (out / "bon_diagnostics.csv").open() as f:
        assert {r["uncertainty"] for r in csv.DictReader(f)} == set(UNCERTAINTY_COLUMNS)
    # k is chosen per seed on the 2 validation prompts, never on the 4 reported ones: one pick per (seed, method,
    # penalty), the best validation gold at the largest n, over the grid and the ks its extension added.
    with (out / "k_selection.csv").open() as f:
        selection = list(csv.DictReader(f))
    picks = [r for r in selection if r["chosen"] == "True"]
    assert len(picks) == 2 * 8 * 2
    with (out / "bon_results_extended.csv").open() as f:
        extended = list(csv.DictReader(f))
    for pick in picks:
        mine = (pick["seed"], pick["method"], pick["penalty"])
        rivals = [r for r in selection if (r["seed"], r["method"], r["penalty"]) == mine]
        assert float(pick["validation_gold_at_max_n"]) == max(float(r["validation_gold_at_max_n"]) for r in rivals)
        assert sorted(float(r["k"]) for r in rivals if r["added"] == "False") == [1.0, 2.0]
        added = {float(r["k"]) for r in rivals if r["added"] == "True"}
        assert len(added) <= 4 and added <= {4.0, 8.0, 16.0, 32.0, 0.5, 0.25, 0.125, 0.0625}
        # every added k has its reported curve, beside the grid's
        assert {float(r["k"]) for r in extended if (r["seed"], r["method"], r["penalty"]) == mine} == added
        if added:
            ks = ", ".join(f"{k:g}" for k in sorted(added))
            assert f"grid extended for {pick['method']}/{pick['penalty']}/seed {pick['seed']} to k={ks}" in summary
    assert "LA-rel (std, k chosen on validation)" in summary and "relative within" in summary
    assert "Hidden-Maha (std, k chosen on validation)" in summary and "Spearman with proxy" in summary
    with (out / "ranking_correlations.csv").open() as f:
        correlations = list(csv.DictReader(f))
    assert len(correlations) == len(picks) and all(-1 <= float(r["spearman_with_penalty"]) <= 1 for r in correlations)
    prompts = json.loads(next((out / "cache").glob("world/prompts.json")).read_text())
    assert len(prompts["eval"]) == 4 and len(prompts["validation"]) == 2
    assert not set(prompts["validation"]) & (set(prompts["eval"]) | set(prompts["train"]))

    # A second run reuses every cached stage: nothing is trained or sampled again, the results are the same.
    markers = sorted((out / "cache").rglob("done.json"))
    # world, pairs, 2 seeds x 2 proxies, samples, gold, 4 proxy scores, 2 seeds x 2 typicality scores, the SFT NLL
    assert len(markers) >= 2 + 4 + 1 + 1 + 4 + 4 + 1
    stamps = {m: m.stat().st_mtime_ns for m in markers}
    before = (out / "bon_results.csv").read_text()
    run_recipe(RECIPE, "--output_dir", str(out), *TINY)
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps
    assert (out / "bon_results.csv").read_text() == before
    # Without the baselines, the other methods' curves are the same numbers: their scores live in stages of their own.
    old = ["MAP", "LA", "LA-rel", "Ens", "Ens-WCO", "Ens-UWO", "LA-Ens", "LA-Ens-rel"]
    run_recipe(RECIPE, "--output_dir", str(out), *TINY, "--methods", *old)
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps
    lines = before.splitlines(keepends=True)
    assert (out / "bon_results.csv").read_text() == "".join(
        [lines[0], *(line for line in lines[1:] if line.split(",")[0] in old)]
    )
    # ... and the diagnostics cover the Laplace variances only: the typicality columns were not scored.
    with (out / "bon_classes.csv").open() as f:
        assert {r["uncertainty"] for r in csv.DictReader(f)} == {"marginal", "relative"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_samples", "8", "--ns", "1", "16"], "n = [16] outside [1, num_samples=8]"),
        (["--methods", "MAP", "Banana"], "unknown ['Banana']"),
        (["--penalties", "cube"], "--penalties"),
        (["--gold_reward", ""], "--gold_reward is empty"),
        (["--gold_reward", "/no/such/gold-rm"], "--gold_reward /no/such/gold-rm"),
        (["--ensemble_size", "1"], "--ensemble_size 1"),
        (["--plot_k", "3"], "--plot_k 3.0 is not one of --ks"),
        (["--penalty_scales", "global"], "--penalty_scales ['global']"),
        (["--world", "banana"], "--world 'banana'"),
        (["--num_workers", "0"], "--num_workers 0"),
        (["--score_batch_size", "0"], "--score_batch_size 0"),
        (["--output_dir", "/proc/no-write/bon"], "Cannot write to output_dir"),
    ],
)
def test_bad_configuration_fails_before_any_work(tmp_path, flags, message):
    assert_fails_before_any_work(RECIPE, tmp_path, flags, message)


def test_bad_configuration_fails_fast_from_the_command_line(tmp_path):
    result = run_recipe(RECIPE, "--output_dir", str(tmp_path / "x"), "--methods", "MAP", "PPO", check=False)
    assert result.returncode != 0 and "unknown ['PPO']" in result.stderr


def test_paper_config_parses_and_names_the_paper_setup(tmp_path):
    result = run_recipe(
        RECIPE, "--config", str(PAPER_CONFIG), "--dry_run", "true", "--bf16", "false", "--output_dir", str(tmp_path)
    )
    plan = result.stdout
    assert "policy: EleutherAI/pythia-1.4b" in plan
    assert "EleutherAI/pythia-70m + LoRA r=8 alpha=16, kron Laplace, 3 seeds x 5 members" in plan
    assert "1000 x 12500" in plan and "tatsu-lab/alpaca_farm" in plan
    assert "not found here: --gold_reward path/to/alpaca-farm-reward-model-human" in plan
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_paper_config_runs_on_local_stand_ins_through_the_hub_code_path(tmp_path):
    """Every stage of the paper config is driven by config alone: swap its Hub names for local tiny models and files."""
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    from trl_bayes.experiments.world import CATEGORIES, build_tokenizer, tiny_gpt_neox_config

    tokenizer = build_tokenizer()
    config = tiny_gpt_neox_config(len(tokenizer), pad_token_id=0, eos_token_id=1, max_position_embeddings=256)
    policy_dir, gold_dir = tmp_path / "policy", tmp_path / "gold"
    GPTNeoXForCausalLM(config).save_pretrained(policy_dir)
    config.num_labels = 1
    GPTNeoXForSequenceClassification(config).save_pretrained(gold_dir)
    for d in (policy_dir, gold_dir):
        tokenizer.save_pretrained(d)
    prompts = tmp_path / "instructions.jsonl"
    rows = [{"instruction": f"name {q} {c}", "input": ""} for c in CATEGORIES for q in ("some", "a few", "many")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    run_recipe(RECIPE,
        "--config", str(PAPER_CONFIG), "--output_dir", str(out), "--bf16", "false",
        "--policy_name_or_path", str(policy_dir), "--model_name_or_path", str(policy_dir),
        "--gold_reward", str(gold_dir), "--prompts_dataset_name", str(prompts),
        "--num_eval_prompts", "3", "--num_validation_prompts", "2", "--num_train_prompts", "16", "--num_train_pairs", "16", "--num_eval_pairs", "6",
        "--num_samples", "8", "--ns", "1", "2", "8", "--max_new_tokens", "4", "--generation_batch_size", "4",
        "--seeds", "0", "--ensemble_size", "2", "--per_device_train_batch_size", "8", "--max_length", "200",
        "--num_workers", "1",
    )  # fmt: skip
    with (out / "bon_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["n"]) for r in rows} == {1, 2, 8} and {r["method"] for r in rows} >= {"MAP", "LA-Ens", "LA-rel"}
    assert (out / "k_selection.csv").is_file()  # k chosen on the 2 validation prompts of the instructions file
    config = json.loads((out / "config.json").read_text())["script"]
    assert config["gold_reward"] == str(gold_dir) and config["num_samples"] == 8
    assert "gold-rm" not in (out / "summary.md").read_text() and str(gold_dir) in (out / "summary.md").read_text()


def test_prompt_scaled_penalties_are_curves_of_their_own():
    """`--penalty_scales absolute prompt` adds `std-prompt` / `var-prompt` curves to the LA methods, scaled within each
    prompt (row of the (P, N) arrays) by `prompt_scale`; the absolute ones are unchanged."""
    import numpy as np
    import torch

    from trl_bayes import penalized_reward
    from trl_bayes.experiments.best_of_n_study import method_scores, method_specs, penalty_labels

    args = (
        load_recipe("bon")
        .make_parser()
        .parse_args_and_config(["--penalty_scales", "absolute", "prompt", "--ks", "1", "2"])[0]
    )
    assert penalty_labels(args) == ["std", "var", "std-prompt", "var-prompt"]
    assert ("LA", "var-prompt", 2.0) in method_specs(args) and ("LA-Ens", "std-prompt", 1.0) in method_specs(args)
    rng = np.random.default_rng(0)
    members = [{"mean": rng.normal(size=(3, 5)), "var": rng.random((3, 5))} for _ in range(2)]
    rank, proxy = method_scores("LA", "std-prompt", 2.0, members)
    means, variances = (
        torch.from_numpy(members[0]["mean"].reshape(1, -1)),
        torch.from_numpy(members[0]["var"].reshape(1, -1)),
    )
    groups = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    expected = penalized_reward(means, variances, "std", 2.0, "prompt", groups).numpy().reshape(3, 5)
    np.testing.assert_allclose(rank, expected)
    np.testing.assert_allclose(proxy, members[0]["mean"])
    # Within a prompt, the scale is sd(r) / mean(std): rescaling one prompt's variances changes no ranking.
    scaled = [{"mean": m["mean"], "var": m["var"] * np.array([[1.0], [100.0], [0.01]])} for m in members]
    np.testing.assert_allclose(method_scores("LA-Ens", "var-prompt", 1.0, scaled)[0],
                               method_scores("LA-Ens", "var-prompt", 1.0, members)[0])  # fmt: skip
    absolute, _ = method_scores("LA", "std", 2.0, members)
    np.testing.assert_allclose(absolute, members[0]["mean"] - 2.0 * np.sqrt(members[0]["var"]))


def test_a_run_with_other_posterior_options_fits_on_the_cached_map(tmp_path, monkeypatch):
    """Proxies that differ only in their posterior options share one trained MAP adapter (`cache/maps`): a second run
    with a diagonal posterior trains nothing, fits on the same adapter; a grid search, whose pairs leave training,
    trains its own MAP."""
    from tests.recipe_runs import main_in_process
    from trl_bayes import BayesianRewardTrainer

    calls = []
    train = BayesianRewardTrainer.train
    monkeypatch.setattr(BayesianRewardTrainer, "train", lambda self, *a, **k: calls.append(1) or train(self, *a, **k))
    flags = [*TINY, "--seeds", "0", "--ensemble_size", "1", "--methods", "MAP", "LA", "--disable_tqdm", "true"]
    member = Path("cache") / "proxies" / "seed0-member0"
    adapter = lambda run: (tmp_path / run / member / "adapter_model.safetensors").read_bytes()  # noqa: E731
    structure = lambda run: json.loads((tmp_path / run / member / "laplace_config.json").read_text())  # noqa: E731
    main_in_process(RECIPE, *flags, "--output_dir", str(tmp_path / "kron"))
    assert len(calls) == 1 and structure("kron")["hessian_structure"] == "kron"
    # The study's runs share one `maps` folder (scripts/study_uncertainty.py links it); so do these two.
    (tmp_path / "diag" / "cache").mkdir(parents=True)
    (tmp_path / "diag" / "cache" / "maps").symlink_to(tmp_path / "kron" / "cache" / "maps")
    main_in_process(RECIPE, *flags, "--output_dir", str(tmp_path / "diag"), "--hessian_structure", "diag")
    assert len(calls) == 1, "the diagonal posterior's run trained the MAP again"
    assert structure("diag")["hessian_structure"] == "diag" and adapter("diag") == adapter("kron")
    main_in_process(RECIPE, *flags, "--output_dir", str(tmp_path / "kron"), "--optimize_prior_precision", "gridsearch")
    assert len(calls) == 2 and adapter("kron") != adapter("diag")
    assert len(list((tmp_path / "kron" / "cache" / "maps").iterdir())) == 2


def test_proxy_cache_keys_at_default_settings_keep_their_format():
    """Fields added to the proxies' cache key later enter it only when set away from their default, so that proxies
    cached before stay valid; set, they change the key (a grid search's also changes its MAP's key)."""
    from trl_bayes.experiments.proxies import map_key, proxy_key

    parser = load_recipe("bon").make_parser

    def keys(*flags):
        args, training_args, model_args = parser().parse_args_and_config(list(flags))
        return proxy_key(args, training_args, model_args), map_key(args, training_args, model_args)

    proxy, trained = keys()
    assert set(proxy) == {"world", "pairs", "model", "lora", "learning_rate", "num_train_epochs",
                          "per_device_train_batch_size", "hessian_structure", "subset_of_weights", "kfac_approx",
                          "prior_precision", "optimize_prior_precision", "max_length"}  # fmt: skip
    for flags, field in ((["--curvature", "ef"], "curvature"), (["--prior_precision_steps", "7"], "prior_precision_steps"),
                         (["--posterior_val_fraction", "0.2"], "posterior_val_fraction")):  # fmt: skip
        changed, same_map = keys(*flags)
        assert field in changed and same_map == trained
    changed, other_map = keys("--optimize_prior_precision", "gridsearch")
    assert changed["gridsearch_pairs"] and other_map != trained


def test_default_run_keeps_the_cache_keys_of_every_run_so_far():
    """The default run's proxy key (since `kfac_approx` became "reduce_masked", issue 20) is the one in its cached
    `proxies/*/done.json` (as the command line parses
    it, before `normalize_lora_targets` settles the LoRA targets), and its MAP adapters keep their folder names (a
    digest of the MAP key): a default that moved (a value, or 3 turned 3.0) would retrain every cached proxy."""
    from trl_bayes.experiments.proxies import key_digest, map_key, member_seed, normalize_lora_targets, proxy_key

    args, training_args, model_args = load_recipe("bon").make_parser().parse_args_and_config([])
    normalize_lora_targets(model_args)
    world = {"world_seed": 0, "num_eval_prompts": 64, "num_demonstrations": 6000, "sft": [64, 2, 3, 0.003],
             "num_validation_prompts": 16}  # fmt: skip
    # Compared as JSON text: 3 and 3.0 are equal in Python but not in a key's digest.
    assert json.dumps(proxy_key(args, training_args, model_args)) == json.dumps({
        "world": world, "pairs": [1000, 0.25], "model": None, "lora": [8, 16, ["query_key_value"]],
        "learning_rate": "0.003", "num_train_epochs": "3", "per_device_train_batch_size": "16",
        "hessian_structure": "kron", "subset_of_weights": "all", "kfac_approx": "reduce_masked", "prior_precision": "1.0",
        "optimize_prior_precision": "marglik", "max_length": "1024",
    })  # fmt: skip
    key = {**map_key(args, training_args, model_args), "seed": member_seed(training_args.seed, 0, 0)}
    assert key_digest(key) == "f18ae078a3"  # cache/maps/seed0-member0-f18ae078a3 of the default run


def _synthetic_study(gold_of):
    """Recipe args (LA only, k grid 1, 2; one seed), and a proxy whose (P, N) scores are random, with the gold a
    function of them: what `extend_grids` and `ranking_correlations` see in a run."""
    import numpy as np

    args = (
        load_recipe("bon")
        .make_parser()
        .parse_args_and_config(
            ["--methods", "MAP", "LA", "--ks", "1", "2", "--seeds", "0", "--num_samples", "64", "--ensemble_size", "1"]
        )[0]
    )
    rng = np.random.default_rng(0)
    member = {"mean": rng.normal(size=(6, 64)), "var": rng.random((6, 64))}
    return args, {(0, 0): member}, gold_of(member)


def test_a_grid_edge_chosen_on_validation_extends_the_grid_boundedly():
    from trl_bayes.experiments.best_of_n_study import MAX_GRID_STEPS, compute_curves, extend_grids, grid_step

    assert grid_step([0.5, 1.0, 2.0], 2.0) == 4.0 and grid_step([0.5, 1.0, 2.0], 0.5) == 0.25
    assert grid_step([0.5, 1.0, 2.0], 1.0) is None and grid_step([0.0, 1.0, 2.0], 0.0) is None
    assert grid_step([0.0, 1.0, 2.0], 1.0) == 0.5  # the smallest nonzero k: the grid goes on between 0 and it
    validation = slice(3, 6)
    # The gold is the proxy: any penalty costs, so validation picks the smallest k, and ever smaller ones tie with it
    # (the same ranking): the grid is halved MAX_GRID_STEPS times, then stops.
    args, proxies, gold = _synthetic_study(lambda m: m["mean"])
    selection, added = extend_grids(args, gold, proxies, validation, compute_curves(args, gold, proxies, validation))
    std = [r for r in selection if r["penalty"] == "std"]
    assert [r["k"] for r in std if r["added"]] == [0.0625, 0.125, 0.25, 0.5] and len(added[0]) == 2 * MAX_GRID_STEPS
    assert next(r["k"] for r in std if r["chosen"]) == 0.0625
    # The proxy is mostly noise beside a gold that penalizes the std: validation picks the top k, and the grid doubles
    # (at most MAX_GRID_STEPS times) while the pick stays on top.
    args, proxies, gold = _synthetic_study(lambda m: -np.sqrt(m["var"]))
    proxies[0, 0]["mean"] = 0.3 * proxies[0, 0]["mean"]  # validation gold at n = 64 rises up to k = 8, then is flat
    selection, added = extend_grids(args, gold, proxies, validation, compute_curves(args, gold, proxies, validation))
    std = [r for r in selection if r["penalty"] == "std"]
    assert [r["k"] for r in std if r["added"]] == [4.0, 8.0, 16.0]  # 16 ties with 8: the smaller is kept, and inside
    chosen = next(r for r in std if r["chosen"])
    assert chosen["k"] == 8.0 and chosen["validation_gold_at_max_n"] == max(r["validation_gold_at_max_n"] for r in std)
    # An added k's validation gold is what a grid holding it from the start gives.
    alone = compute_curves(args, gold, proxies, validation, {0: [("LA", "std", chosen["k"])]})
    assert alone[-1]["gold_reward"] == chosen["validation_gold_at_max_n"]
    assert ("LA", "std", chosen["k"]) in added[0]


def test_ranking_correlations_are_mean_within_prompt_spearman():
    from scipy.stats import spearmanr

    from trl_bayes.experiments.best_of_n_study import ranking_correlations

    args, proxies, _ = _synthetic_study(lambda m: m["mean"])
    member = proxies[0, 0]
    selection = [{"seed": 0, "method": "LA", "penalty": "std", "k": 2.0, "chosen": True},
                 {"seed": 0, "method": "LA", "penalty": "var", "k": 0.0, "chosen": True},
                 {"seed": 0, "method": "LA", "penalty": "var", "k": 1.0, "chosen": False}]  # fmt: skip
    rows = ranking_correlations(args, proxies, selection, slice(0, 4))
    assert [(r["penalty"], r["k"]) for r in rows] == [("std", 2.0), ("var", 0.0)]
    final = member["mean"][:4] - 2.0 * np.sqrt(member["var"][:4])
    with_proxy = np.mean([spearmanr(final[p], member["mean"][p]).statistic for p in range(4)])
    with_penalty = np.mean([spearmanr(final[p], -np.sqrt(member["var"][p])).statistic for p in range(4)])
    np.testing.assert_allclose([rows[0]["spearman_with_proxy"], rows[0]["spearman_with_penalty"]],
                               [with_proxy, with_penalty])  # fmt: skip
    # k = 0: the ranking is the proxy's, and the penalty is constant (no correlation to speak of).
    assert rows[1]["spearman_with_proxy"] == pytest.approx(1.0) and np.isnan(rows[1]["spearman_with_penalty"])
