"""Diagnostics against brute-force computations."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from trl_bayes.diagnostics import (
    expected_calibration_error,
    pair_metrics,
    standardize_within,
    uncertainty_along_n,
    uncertainty_by_class,
    within_prompt_correlation,
)


def test_expected_calibration_error_on_constructed_cases():
    # Confidence 0.8 everywhere, 8 of 10 right: perfectly calibrated.
    p = torch.tensor([0.8] * 8 + [0.2] * 2, dtype=torch.float64)
    assert expected_calibration_error(p) == pytest.approx(0.0, abs=1e-12)
    # Confidence 0.9, all right: under-confident by 0.1.
    assert expected_calibration_error(torch.full((5,), 0.9)) == pytest.approx(0.1, abs=1e-6)
    # Two bins: {0.55 x2, one right} -> |0.5 - 0.55|; {0.95 x2, both right} -> |1 - 0.95|; weights 1/2 each.
    p = torch.tensor([0.55, 0.45, 0.95, 0.95], dtype=torch.float64)
    assert expected_calibration_error(p) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)


def test_pair_metrics_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(200, generator=g, dtype=torch.float64)
    var = torch.rand(200, generator=g, dtype=torch.float64) * 3
    m = pair_metrics(mean, var)
    assert m["map_accuracy"] == pytest.approx((mean > 0).double().mean().item())
    assert m["map_nll"] == pytest.approx(np.mean([-math.log(1 / (1 + math.exp(-x))) for x in mean.tolist()]))
    probit = [x / math.sqrt(1 + math.pi / 8 * v) for x, v in zip(mean.tolist(), var.tolist(), strict=True)]
    assert m["laplace_probit_nll"] == pytest.approx(np.mean([math.log1p(math.exp(-z)) for z in probit]))
    assert m["laplace_probit_nll"] != pytest.approx(m["map_nll"])
    no_var = pair_metrics(mean, torch.zeros_like(mean))
    assert no_var["laplace_probit_nll"] == pytest.approx(no_var["map_nll"])
    assert "laplace_ece" not in pair_metrics(mean)


def test_uncertainty_along_n_against_a_loop():
    rng = np.random.default_rng(0)
    proxy, std, gold = rng.normal(size=(5, 16)), rng.random((5, 16)), rng.normal(size=(5, 16))
    lengths = rng.integers(1, 20, size=(5, 16))
    rows = uncertainty_along_n(proxy, std, gold, [1, 4, 16], lengths=lengths)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    error = z(proxy) - z(gold)
    for row, n in zip(rows, [1, 4, 16], strict=True):
        keep = math.ceil(16 / n)
        picked_std, picked_err = [], []
        for p in range(5):
            top = sorted(range(16), key=lambda j: -proxy[p, j])[:keep]
            picked_std += [std[p, j] for j in top]
            picked_err += [error[p, j] for j in top]
        assert row["num_responses"] == 5 * keep
        assert row["corr_std_error"] == pytest.approx(np.corrcoef(picked_std, picked_err)[0, 1])
        assert row["mean_error"] == pytest.approx(np.mean(picked_err))
        per_prompt = [
            np.corrcoef(picked_std[p * keep : (p + 1) * keep], picked_err[p * keep : (p + 1) * keep])[0, 1]
            for p in range(5)
        ]
        if keep >= 3:
            assert row["corr_std_error_within"] == pytest.approx(np.mean(per_prompt))
        else:
            assert math.isnan(row["corr_std_error_within"])
        # Against the proxy score and the length, among the same responses.
        picked = [sorted(range(16), key=lambda j: -proxy[p, j])[:keep] for p in range(5)]
        picked_proxy = [proxy[p, j] for p in range(5) for j in picked[p]]
        picked_length = [lengths[p, j] for p in range(5) for j in picked[p]]
        assert row["corr_std_proxy"] == pytest.approx(np.corrcoef(picked_std, picked_proxy)[0, 1])
        assert row["corr_std_length"] == pytest.approx(np.corrcoef(picked_std, picked_length)[0, 1])
        if keep >= 3:
            per_prompt = [
                np.corrcoef([std[p, j] for j in picked[p]], [lengths[p, j] for j in picked[p]])[0, 1] for p in range(5)
            ]
            assert row["corr_std_length_within"] == pytest.approx(np.mean(per_prompt))
    assert "corr_std_length" not in uncertainty_along_n(proxy, std, gold, [1])[0]


def test_uncertainty_by_class_on_a_hand_made_array():
    """Prompt 0: std [1, 2, 3] -> z [-1.2247, 0, 1.2247]; prompt 1: std [5, 5, 8] -> z [-0.7071, -0.7071, 1.4142]."""
    std = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    a, b = math.sqrt(1.5), math.sqrt(0.5)
    np.testing.assert_allclose(standardize_within(std), [[-a, 0, a], [-b, -b, 2 * b]])
    short = np.array([[True, False, False], [True, True, False]])
    long = np.array([[False, False, True], [False, False, True]])
    nothing = np.zeros((2, 3), dtype=bool)
    error = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    rows = {r["class"]: r for r in uncertainty_by_class(std, {"short": short, "long": long, "x": nothing}, error)}
    assert rows["short"]["num_responses"] == 3 and rows["short"]["fraction"] == pytest.approx(0.5)
    assert rows["short"]["mean_z_std"] == pytest.approx((-a - b - b) / 3)
    assert rows["long"]["mean_z_std"] == pytest.approx((a + 2 * b) / 2) and rows["long"]["mean_error"] == 3.5
    assert math.isnan(rows["x"]["mean_z_std"]) and rows["x"]["num_responses"] == 0
    # A constant row standardizes to zeros, not NaN.
    assert (standardize_within(np.ones((1, 4))) == 0).all()


def test_within_prompt_correlation_ignores_offsets_between_prompts():
    # Within each prompt x and y are perfectly anti-correlated; across prompts, offsets make the pooled one positive.
    x = np.array([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])
    y = np.array([[2.0, 1.0, 0.0], [12.0, 11.0, 10.0]])
    assert within_prompt_correlation(x, y) == pytest.approx(-1.0)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.9
    assert math.isnan(within_prompt_correlation(np.ones((2, 3)), y))


def test_bon_diagnostics_report_every_scored_uncertainty_under_its_option_name(tmp_path):
    """recipes/bon.py's diagnostics cover each uncertainty member 0 was scored with (`UNCERTAINTY_COLUMNS`), named as
    `PenalizedReward(uncertainty=...)`'s options, on the reported prompts only; an unscored one has no rows."""
    from types import SimpleNamespace

    from trl_bayes.experiments.best_of_n_report import write_diagnostics
    from trl_bayes.experiments.best_of_n_study import UNCERTAINTY_COLUMNS
    from trl_bayes.experiments.world import RESPONSE_CLASSES, response_classes, world_prompts
    from trl_bayes.penalties import UNCERTAINTIES

    assert list(UNCERTAINTY_COLUMNS) == [*UNCERTAINTIES, "sft_nll"]
    # 3 reported prompts and 1 validation prompt (row 3) of 6 samples each: every class of response is there.
    prompts = world_prompts()[:4]
    kinds = ["apple pear plum", "apple apple apple apple", "apple", "apple pear plum fig kiwi lime lemon grape mango",
             "carrot leek bean", "pear fig kiwi"]  # fmt: skip
    completions = [kinds[i:] + kinds[:i] for i in range(4)]
    rng = np.random.default_rng(0)
    gold, mean = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    # Member 0 holds three of the uncertainties; the validation row's values would show if it were not cut off.
    scored = {
        "var": rng.random((4, 6)),
        "hidden_mahalanobis": rng.random((4, 6)),
        "sft_nll_squared": rng.random((4, 6)),
    }
    for column in scored.values():
        column[3] = 1e6
    member = {"mean": mean, **scored, "pair_mean": rng.normal(size=8), "pair_var": rng.random(8)}
    args = SimpleNamespace(seeds=[0], ns=[1, 2, 6], offline=True, gold_reward="world")
    _, along_n, length_rows, class_rows = write_diagnostics(
        tmp_path, args, prompts[:3], gold, {(0, 0): member}, None, completions, slice(0, 3)
    )
    named = ["marginal", "hidden_mahalanobis", "sft_nll"]
    for rows in (along_n, length_rows, class_rows):
        assert list(dict.fromkeys(r["uncertainty"] for r in rows)) == named
    classes = [[response_classes(p, c) for c in row] for p, row in zip(prompts[:3], completions[:3], strict=True)]
    masks = {name: np.array([[name in c for c in row] for row in classes]) for name in RESPONSE_CLASSES}
    error = (mean[:3] - mean[:3].mean()) / mean[:3].std() - (gold[:3] - gold[:3].mean()) / gold[:3].std()
    for uncertainty in named:
        expected = uncertainty_by_class(np.sqrt(scored[UNCERTAINTY_COLUMNS[uncertainty]][:3]), masks, error)
        got = [r for r in class_rows if r["uncertainty"] == uncertainty]
        assert [r["class"] for r in got] == [r["class"] for r in expected] == list(RESPONSE_CLASSES)
        for row, want in zip(got, expected, strict=True):
            numbers = {k: v for k, v in want.items() if k != "class"}
            assert {k: row[k] for k in numbers} == pytest.approx(numbers, nan_ok=True)
    assert {r["n"] for r in along_n} == {1, 2, 6} and (tmp_path / "bon_diagnostics.png").stat().st_size > 10_000
    with (tmp_path / "bon_classes.csv").open() as f:
        assert [r["uncertainty"] for r in csv.DictReader(f)] == [u for u in named for _ in RESPONSE_CLASSES]
