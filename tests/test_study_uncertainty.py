"""scripts/study_uncertainty.py without running bon.py: the table from hand-made run outputs, and the shared caches."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .recipe_runs import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("study_uncertainty")


def write_run(run_dir: Path, gold: dict, chosen: dict) -> None:
    """bon.py's two result files: `gold[(method, penalty, k, seed)] = [gold at n = 1, 2, 4]`, `chosen[(seed, method,
    penalty)] = k`."""
    run_dir.mkdir(parents=True)
    with (run_dir / "bon_results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "penalty", "k", "seed", "n", "kl", "proxy_reward", "gold_reward"])
        for (method, penalty, k, seed), curve in gold.items():
            for n, g in zip((1, 2, 4), curve, strict=True):
                writer.writerow([method, penalty, k, seed, n, 0.0, 0.0, g])
    with (run_dir / "k_selection.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "method", "penalty", "k", "validation_gold_at_max_n", "chosen"])
        for (seed, method, penalty), k in chosen.items():
            for candidate in ("1.0", "2.0"):
                writer.writerow([seed, method, penalty, candidate, 0.0, candidate == k])


def test_table_uses_each_seeds_validation_k_and_pairs_differences_with_map(study, tmp_path):
    gold = {
        ("MAP", "none", "0.0", "0"): [1.0, 2.0, 0.5],
        ("MAP", "none", "0.0", "1"): [1.0, 1.5, 0.0],
        ("LA", "std", "1.0", "0"): [1.0, 2.5, 1.5],
        ("LA", "std", "2.0", "0"): [1.0, 9.0, 9.0],  # seed 0 chose k = 1: this curve must not count
        ("LA", "std", "1.0", "1"): [1.0, 1.0, 1.0],
        ("LA", "std", "2.0", "1"): [1.0, 1.2, 2.0],  # seed 1 chose k = 2
    }
    chosen = {("0", "LA", "std"): "1.0", ("1", "LA", "std"): "2.0"}
    write_run(tmp_path / "run", gold, chosen)
    results = {("lists", "sft", "default"): study.run_results(tmp_path / "run", [0, 1])}
    assert results["lists", "sft", "default"]["LA", "std"] == {
        "last": [1.5, 2.0],
        "best": [2.5, 2.0],
        "k": [1, 2],
        "n_max": 4,
        "validation": [0.0, 0.0],  # the validation gold at each seed's chosen k (write_run's: 0)
    }
    rows = {(r["method"], r["penalty"]): r for r in study.table_rows(results, [0, 1])}
    la = rows["LA", "std"]
    # Gold at n = 4: [1.5, 2.0] -> 1.75 ± 0.25; MAP [0.5, 0.0]; paired Δ [1.0, 2.0] -> 1.5 ± 0.5.
    assert (la["gold_last_mean"], la["gold_last_std"]) == pytest.approx((1.75, 0.25))
    assert (la["delta_last_mean"], la["delta_last_std"]) == pytest.approx((1.5, 0.5))
    # Best over n: LA [2.5, 2.0], MAP [2.0, 1.5]: Δ [0.5, 0.5].
    assert (la["delta_best_mean"], la["delta_best_std"]) == pytest.approx((0.5, 0.0))
    assert la["ks"] == "1 2" and la["option"] == "default"
    assert rows["MAP", "none"]["delta_last_mean"] == 0.0 and rows["MAP", "none"]["option"] == ""
    study.write_markdown(tmp_path / "study.md", list(rows.values()), "small", [0, 1])
    # Other options' runs fit on the same MAP: their MAP rows are left out, but for a grid search, which trains its own.
    results.update({("lists", "sft", o): results["lists", "sft", "default"] for o in ("diag", "gridsearch")})
    options = {(r["option"], r["method"]) for r in study.table_rows(results, [0, 1])}
    assert ("gridsearch", "MAP") in options and ("diag", "LA") in options and ("diag", "MAP") not in options
    markdown = (tmp_path / "study.md").read_text()
    assert "| default | LA | std | +1.750 ± 0.250 | +1.500 ± 0.500 |" in markdown
    assert "| default | LA | std | +1.500 ± 0.500 |" in markdown  # the overview: Δ at the largest n per panel
    assert "## world `lists`, proxy backbone `sft` (largest n = 4)" in markdown


def test_runs_of_a_world_share_its_cached_stages(study, tmp_path):
    """The first run's world, pairs, samples and gold scores move to the shared cache; later runs link them."""
    shared = tmp_path / "shared"
    first, second = tmp_path / "a" / "cache", tmp_path / "b" / "cache"
    for name in (*study.SHARED_STAGES, "proxies", "scores/seed0-member0"):
        (first / name).mkdir(parents=True)
        (first / name / "done.json").write_text(name)
    study.share_new_stages(first, shared)
    for name in study.SHARED_STAGES:
        assert (first / name).is_symlink() and (shared / name / "done.json").read_text() == name
    assert not (first / "proxies").is_symlink() and not (shared / "proxies").exists()
    assert not (first / "scores").is_symlink() and not (shared / "scores" / "seed0-member0").exists()
    study.link_shared_stages(second, shared)
    assert (second / "samples" / "done.json").read_text() == "samples"
    assert (second / "scores" / "gold").is_symlink() and not (second / "proxies").exists()


def test_diagnostics_name_the_most_overrated_class_and_average_over_seeds(study, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with (run / "bon_diagnostics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "uncertainty", "n", "corr_std_error_within"])
        for seed, marginal in ((0, [0.1, 0.3]), (1, [0.3, "nan"])):  # a NaN (too few samples) is left out
            for n, value in zip((1, 8), marginal, strict=True):
                writer.writerow([seed, "marginal", n, value])
                writer.writerow([seed, "relative", n, -0.5])
    with (run / "bon_classes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "uncertainty", "class", "mean_z_std", "mean_error"])
        for seed in (0, 1):
            for uncertainty, z in (("marginal", -0.2 - seed), ("relative", 0.4)):
                writer.writerow([seed, uncertainty, "repetition", z, 1.5])
                writer.writerow([seed, uncertainty, "short", 2.0, -0.1])
                writer.writerow([seed, uncertainty, "typical", 0.0, 9.0])  # typical never counts as an exploit
    rows = study.diagnostics_rows({("lists", "sft", "default"): run})
    marginal, relative = rows
    assert marginal["uncertainty"] == "marginal" and marginal["most_overrated"] == "repetition"
    assert (marginal["corr_all"], marginal["corr_top"]) == pytest.approx((0.2, 0.3))
    assert (marginal["its_error"], marginal["its_z_std"]) == pytest.approx((1.5, -0.7))
    assert (relative["corr_all"], relative["its_z_std"]) == pytest.approx((-0.5, 0.4))
    study.write_markdown(tmp_path / "study.md", [], "small", [0, 1], rows)
    assert (
        "| lists | sft | default | marginal | +0.200 | +0.300 | repetition | +1.500 | -0.700 |"
        in (tmp_path / "study.md").read_text()
    )


def test_best_baseline_is_chosen_on_validation_and_every_method_is_paired_with_it(study, tmp_path):
    """Hidden-Euc has the better reported gold but Hidden-Maha the better validation gold: Hidden-Maha is the best
    baseline. Each row gets paired Δ to MAP's best n, to Prior-rel (same penalty) and to that baseline."""
    gold = {
        ("MAP", "none", "0.0", "0"): [1.0, 2.0, 0.5],
        ("MAP", "none", "0.0", "1"): [1.0, 1.5, 0.0],
        ("LA-rel", "std", "1.0", "0"): [1.0, 2.5, 2.5],
        ("LA-rel", "std", "1.0", "1"): [1.0, 2.0, 1.5],
        ("Prior-rel", "std", "1.0", "0"): [1.0, 2.0, 2.0],
        ("Prior-rel", "std", "1.0", "1"): [1.0, 2.0, 2.0],
        ("Hidden-Euc", "std", "1.0", "0"): [1.0, 5.0, 5.0],  # the best reported gold, the worse validation gold
        ("Hidden-Euc", "std", "1.0", "1"): [1.0, 5.0, 5.0],
        ("Hidden-Maha", "std", "1.0", "0"): [1.0, 3.0, 3.0],
        ("Hidden-Maha", "std", "1.0", "1"): [1.0, 1.0, 1.0],
    }
    write_run(tmp_path / "run", gold, {})
    validation = {"LA-rel": 2.0, "Prior-rel": 2.0, "Hidden-Euc": 1.0, "Hidden-Maha": 3.0}
    with (tmp_path / "run" / "k_selection.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "method", "penalty", "k", "validation_gold_at_max_n", "chosen", "added"])
        for method, value in validation.items():
            for seed in ("0", "1"):
                writer.writerow([seed, method, "std", "1.0", value, True, False])
    results = {("rare", "sft", "default"): study.run_results(tmp_path / "run", [0, 1])}
    rows = {(r["method"], r["penalty"]): r for r in study.table_rows(results, [0, 1])}
    la_rel = rows["LA-rel", "std"]
    assert la_rel["best_baseline"] == "Hidden-Maha std"
    # LA-rel at n = 4: [2.5, 1.5]; MAP's best n: [2.0, 1.5] -> Δ [0.5, 0.0]; Prior-rel [2.0, 2.0] -> Δ [0.5, -0.5];
    # Hidden-Maha [3.0, 1.0] -> Δ [-0.5, 0.5]; at the best n: LA-rel [2.5, 2.0] - Hidden-Maha [3.0, 1.0] = [-0.5, 1.0].
    assert (la_rel["delta_map_best_n_mean"], la_rel["delta_map_best_n_std"]) == pytest.approx((0.25, 0.25))
    assert (la_rel["delta_prior_last_mean"], la_rel["delta_prior_last_std"]) == pytest.approx((0.0, 0.5))
    assert (la_rel["delta_baseline_last_mean"], la_rel["delta_baseline_last_std"]) == pytest.approx((0.0, 0.5))
    assert la_rel["delta_baseline_best_mean"] == pytest.approx(0.25)
    assert rows["Hidden-Maha", "std"]["delta_baseline_last_mean"] == 0.0
    study.write_markdown(tmp_path / "study.md", list(rows.values()), "small", [0, 1])
    markdown = (tmp_path / "study.md").read_text()
    assert "Best typicality baseline (on validation): Hidden-Maha std." in markdown
    assert "| default | LA-rel | std | +2.000 ± 0.500 | +1.750 ± 0.250 |" in markdown


def test_plan_covers_three_worlds_the_baselines_and_five_seeds(study, capsys, tmp_path):
    """`--options default`: 3 worlds x 2 backbones, one run each with every method and 5 seeds; bon.py accepts the rare
    world's run (its own dry run checks the flags)."""
    from tests.recipe_runs import RECIPES, run_recipe

    study.main(["--dry_run", "--options", "default", "--output_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert sorted(line.split("--world ")[1].split()[0] for line in lines) == sorted(study.WORLDS * 2)
    assert set(study.WORLDS) == {"lists", "off_topic", "rare"}
    for line in lines:
        assert "--methods MAP LA LA-rel Ens LA-Ens LA-Ens-rel Prior-rel Hidden-Euc Hidden-Maha SFT-NLL" in line
        assert "--seeds 0 1 2 3 4 " in line
    flags = next(line for line in lines if "--world rare" in line and "minilm" not in line).split()[2:]
    result = run_recipe(RECIPES / "bon.py", *flags, "--dry_run", "true", "--output_dir", str(tmp_path / "bon"))
    assert "Best-of-N plan:" in result.stdout


def test_a_k_the_grid_extension_added_is_read_from_the_extended_results(study, tmp_path):
    """bon.py writes the curves of ks its k-grid extension added to `bon_results_extended.csv`; a seed that chose such
    a k is read from there (the study crashed with a KeyError before it read that file)."""
    gold = {("MAP", "none", "0.0", "0"): [1.0, 2.0, 0.5], ("LA", "std", "1.0", "0"): [1.0, 2.5, 1.5]}
    write_run(tmp_path / "run", gold, {("0", "LA", "std"): "1.0"})
    with (tmp_path / "run" / "bon_results_extended.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "penalty", "k", "seed", "n", "kl", "proxy_reward", "gold_reward"])
        for n, g in zip((1, 2, 4), (1.0, 3.0, 2.5), strict=True):
            writer.writerow(["LA", "std", "4.0", "0", n, 0.0, 0.0, g])
    with (tmp_path / "run" / "k_selection.csv").open("w", newline="") as f:  # the added k = 4 is the pick
        writer = csv.writer(f)
        writer.writerow(["seed", "method", "penalty", "k", "validation_gold_at_max_n", "chosen"])
        writer.writerows([["0", "LA", "std", "1.0", 0.0, False], ["0", "LA", "std", "4.0", 0.0, True]])
    entry = study.run_results(tmp_path / "run", [0])["LA", "std"]
    assert entry["last"] == [2.5] and entry["best"] == [3.0] and entry["k"] == [4.0]


def test_defaults_rule_uses_validation_gold_of_single_model_options_only(study, tmp_path):
    """Issue 16's rule: the option with the best mean over panels of its per-panel mean validation gold (the seeds'
    validation picks, extensions included), among single-model options present in every panel; then k by the gold
    pooled over panels and seeds on the base grid only (rows the grid extension added are left out)."""
    # (method, penalty) -> per panel, rows (seed, k, validation gold, chosen, added).
    selection = {
        "w1": {
            ("Hidden-Maha", "var-prompt"): [(0, 1.0, 2.0, 0, 0), (0, 2.0, 3.0, 0, 0), (0, 4.0, 3.5, 1, 1),
                                            (1, 1.0, 4.0, 1, 0), (1, 2.0, 1.0, 0, 0)],
            ("LA-rel", "std"): [(0, 1.0, 3.0, 1, 0), (0, 2.0, 2.0, 0, 0), (1, 1.0, 3.0, 1, 0), (1, 2.0, 2.0, 0, 0)],
            ("LA-Ens-rel", "std"): [(0, 1.0, 9.0, 1, 0), (1, 1.0, 9.0, 1, 0)],  # an ensemble: not a candidate
            ("Prior-rel", "std"): [(0, 1.0, 9.0, 1, 0), (1, 1.0, 9.0, 1, 0)],  # missing from panel w2: left out
        },
        "w2": {
            ("Hidden-Maha", "var-prompt"): [(0, 1.0, 2.0, 1, 0), (0, 2.0, 1.0, 0, 0), (1, 1.0, 2.0, 0, 0),
                                            (1, 2.0, 2.5, 1, 0)],
            ("LA-rel", "std"): [(0, 1.0, 2.8, 1, 0), (0, 2.0, 0.0, 0, 0), (1, 1.0, 2.8, 1, 0), (1, 2.0, 0.0, 0, 0)],
        },
    }  # fmt: skip
    run_dirs = {}
    for world, options in selection.items():
        run_dir = tmp_path / world
        curves = {("MAP", "none", 0.0, s): [1.0, 2.0 + s, 1.5] for s in (0, 1)}
        curves |= {("Hidden-Maha", "var-prompt", k, s): [1.0, 2.0, 3.0 + k + s] for k in (1.0, 2.0) for s in (0, 1)}
        write_run(run_dir, curves, {})
        with (run_dir / "k_selection.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seed", "method", "penalty", "k", "validation_gold_at_max_n", "chosen", "added"])
            for (method, penalty), rows in options.items():
                for seed, k, gold, chosen, added in rows:
                    writer.writerow([seed, method, penalty, k, gold, bool(chosen), bool(added)])
        run_dirs[world, "sft"] = run_dir
    defaults = study.choose_defaults(run_dirs)
    # Hidden-Maha: w1 (3.5 + 4.0) / 2 = 3.75, w2 (2.0 + 2.5) / 2 = 2.25 -> 3.0; LA-rel (3.0 + 2.8) / 2 = 2.9.
    assert [(r["method"], r["penalty"], r["mean"]) for r in defaults["options"]] == [
        ("Hidden-Maha", "var-prompt", pytest.approx(3.0)),
        ("LA-rel", "std", pytest.approx(2.9)),
    ]
    assert defaults["pick"] == {"uncertainty": "hidden_mahalanobis", "penalty": "var", "scale": "prompt"}
    # Base grid pooled: k = 1: (2 + 4 + 2 + 2) / 4 = 2.5; k = 2: (3 + 1 + 1 + 2.5) / 4 = 1.875; the added k = 4 is out.
    assert defaults["ks"] == {1.0: pytest.approx(2.5), 2.0: pytest.approx(1.875)}
    assert defaults["k"] == 1.0
    # The record of reported gold at the largest n (n = 4): the pick at k = 1 and MAP, per seed; MAP's best n is 2.
    assert defaults["reported"]["w1/sft"] == {
        "default": [4.0, 5.0],
        "MAP": [1.5, 1.5],
        "MAP at its best n": [2.0, 3.0],
    }
    study.write_defaults(tmp_path / "defaults.md", defaults)
    text = (tmp_path / "defaults.md").read_text()
    assert "`uncertainty='hidden_mahalanobis'`, `penalty='var'`, `scale='prompt'`, `k=1.0`" in text
    assert "| w1/sft | 4.50 ± 0.50 | 1.50 ± 0.00 | 2.50 ± 0.50 | +3.00 | +2.00 |" in text
