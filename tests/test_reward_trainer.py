from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from laplace.utils import Kron
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from trl_bayes import BayesianRewardConfig, BayesianRewardModel, BayesianRewardTrainer
from trl_bayes.diagnostics import pair_metrics
from trl_bayes.laplace_lora import eigendecomposition_errors_raise
from trl_bayes.reward import POSTERIOR_CONFIG_NAME, POSTERIOR_WEIGHTS_NAME, tokenize_response
from trl_bayes.synthetic import build_tokenizer, make_preference_dataset

from .conftest import lora_config, make_reward_model, make_trainer


@pytest.mark.parametrize("hessian_structure", ["kron", "diag"])
def test_train_then_fit_posterior(tokenizer, tmp_path, hessian_structure):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=32, num_train_epochs=2, hessian_structure=hessian_structure)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} did not change in MAP training"
    posterior = trainer.posterior
    assert posterior is not None and posterior.hessian_structure == hessian_structure
    assert posterior.prior_precision > 0 and posterior.prior_precision != 1.0  # marglik moved it
    assert posterior.n_params == sum(v.numel() for v in before.values())  # LoRA + score head
    mean, var = posterior.predict(["please list fruits : "] * 2, ["apple pear", "saw saw saw"])
    assert mean.shape == var.shape == (2,)
    assert (var > 0).all()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"laplace/prior_precision", "laplace/log_marglik"} <= logged


def test_mean_equals_reward_scored_as_in_training(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8)
    trainer.train()
    dataset = make_preference_dataset(8, seed=0)
    # Tokenization: ours equals TRL's for every training pair.
    for row, tokenized in zip(dataset, trainer.train_dataset, strict=True):
        assert tokenize_response(tokenizer, row["prompt"], row["chosen"]) == tokenized["chosen_ids"]
        assert tokenize_response(tokenizer, row["prompt"], row["rejected"]) == tokenized["rejected_ids"]
    # Scores: the training forward (TRL's collator, padded batch, chosen first) against `predict`.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.reshape(-1)
    mean, _ = trainer.posterior.predict(dataset["prompt"], dataset["chosen"], return_var=False)
    torch.testing.assert_close(mean, trained[:8], rtol=1e-5, atol=1e-6)
    mean, _ = trainer.posterior.predict(dataset["prompt"], dataset["rejected"])
    torch.testing.assert_close(mean, trained[8:], rtol=1e-5, atol=1e-6)


def test_conversational_tokenization_matches_trl(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=4)
    rows = {
        "prompt": [[{"role": "user", "content": "please list fruits :"}]],
        "chosen": [[{"role": "assistant", "content": "apple pear"}]],
        "rejected": [[{"role": "assistant", "content": "saw saw"}]],
    }
    prepared = trainer._prepare_dataset(Dataset.from_dict(rows), tokenizer, trainer.args, "conv")
    assert tokenize_response(tokenizer, rows["prompt"][0], rows["chosen"][0]) == prepared[0]["chosen_ids"]
    assert tokenize_response(tokenizer, rows["prompt"][0], rows["rejected"][0]) == prepared[0]["rejected_ids"]


@pytest.mark.parametrize("hessian_structure", ["kron", "diag"])
def test_save_load_round_trip(tokenizer, tmp_path, hessian_structure):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=16, hessian_structure=hessian_structure)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / POSTERIOR_WEIGHTS_NAME).is_file() and (out / "adapter_model.safetensors").is_file()
    metadata = json.loads((out / POSTERIOR_CONFIG_NAME).read_text())
    assert metadata["hessian_structure"] == hessian_structure
    assert metadata["n_data"] == 16 and metadata["base_model"] is None
    assert [p["name"] for p in metadata["parameters"]] and all(p["shape"] for p in metadata["parameters"])
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))

    loaded = BayesianRewardModel.from_pretrained(out)
    assert loaded.prior_precision == pytest.approx(trainer.posterior.prior_precision, rel=1e-6)
    saved_tensors = load_file(str(out / POSTERIOR_WEIGHTS_NAME))
    loaded.save_posterior(tmp_path / "again")
    for name, tensor in load_file(str(tmp_path / "again" / POSTERIOR_WEIGHTS_NAME)).items():
        assert torch.equal(tensor, saved_tensors[name]), name
    prompts, completions = ["name a few tools : "] * 3, ["hammer saw", "red", "dog dog dog"]
    expected_mean, expected_var = trainer.posterior.predict(prompts, completions)
    mean, var = loaded.predict(prompts, completions)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-7)


def test_mismatched_adapter_and_posterior_are_refused(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8)
    trainer.train()
    trainer.save_model(str(tmp_path / "a"))
    # Same shapes, other values: the adapter changed after the fit.
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "a", changed)
    weights = load_file(str(changed / "adapter_model.safetensors"))
    name = next(n for n in weights if "lora_B" in n)
    weights[name] = weights[name] + 0.5
    save_file(weights, str(changed / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="other adapter weights"):
        BayesianRewardModel.from_pretrained(changed)
    # Other shapes: a posterior of a rank-2 adapter next to a rank-3 adapter.
    other = make_trainer(tokenizer, tmp_path / "b", num_pairs=8, peft=lora_config(r=3))
    other.train()
    other.save_model(str(tmp_path / "b"))
    for name in (POSTERIOR_WEIGHTS_NAME, POSTERIOR_CONFIG_NAME):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    with pytest.raises(ValueError, match="does not match the adapter"):
        BayesianRewardModel.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="No posterior"):
        BayesianRewardModel.from_pretrained(tmp_path)


def test_fit_posterior_on_trained_peft_model_without_train(tokenizer, tmp_path):
    model = get_peft_model(make_reward_model(tokenizer), lora_config())
    args = BayesianRewardConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", posterior_batch_size=4)
    trainer = BayesianRewardTrainer(
        model, args=args, train_dataset=make_preference_dataset(8), processing_class=tokenizer
    )
    posterior = trainer.fit_posterior(make_preference_dataset(12, seed=3))
    assert posterior.laplace.n_data == 12
    assert posterior.predict(["please list fruits : "], ["fig"])[1].item() > 0


def test_subset_of_weights_lora_excludes_the_score_head(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8, subset_of_weights="lora")
    posterior = trainer.fit_posterior()
    assert all("lora_" in p["name"] for p in posterior.metadata["parameters"])
    assert posterior.n_params == sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    # The trainer's trainable weights are restored after the fit.
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "score" in n)


def test_subset_head_and_empirical_fisher_round_trip(tokenizer, tmp_path):
    """Last-layer Laplace (the score head alone) with the empirical Fisher: the options reach the fit, are saved in
    laplace_config.json and come back with `from_pretrained`, which predicts what the trainer's posterior did."""
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=12, subset_of_weights="head", curvature="ef")
    trainer.train()
    posterior = trainer.posterior
    head = [n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert [p["name"] for p in posterior.metadata["parameters"]] == head and all("score" in n for n in head)
    assert posterior.n_params == trainer.model.config.hidden_size  # GPT-NeoX's score head: one row, no bias
    assert posterior.laplace._backend_cls.__name__ == "CurvlinopsEF"
    trainer.save_model(str(tmp_path / "saved"))
    metadata = json.loads((tmp_path / "saved" / POSTERIOR_CONFIG_NAME).read_text())
    assert (metadata["subset_of_weights"], metadata["curvature"]) == ("head", "ef")
    loaded = BayesianRewardModel.from_pretrained(tmp_path / "saved")
    assert loaded.laplace._backend_cls.__name__ == "CurvlinopsEF" and loaded.n_params == posterior.n_params
    prompts, completions = ["name a few tools : "] * 3, ["hammer saw", "red", "dog dog dog"]
    expected_mean, expected_var = posterior.predict(prompts, completions)
    mean, var = loaded.predict(prompts, completions)
    assert (expected_var > 0).all()
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-7)
    # A posterior saved before `curvature` existed loads as GGN.
    del metadata["curvature"]
    (tmp_path / "saved" / POSTERIOR_CONFIG_NAME).write_text(json.dumps(metadata))
    assert BayesianRewardModel.from_pretrained(tmp_path / "saved").laplace._backend_cls.__name__ == "CurvlinopsGGN"


def test_gridsearch_picks_the_grid_value_with_lowest_heldout_nll(tokenizer, tmp_path):
    grid = [0.01, 1.0, 100.0]
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        num_pairs=20,
        optimize_prior_precision="gridsearch",
        prior_precision_grid=grid,
        posterior_val_fraction=0.25,
    )
    # The 5 held-out pairs leave training too, not only the fit: the MAP never sees the pairs that pick its prior.
    assert len(trainer.train_dataset) == 15 and len(trainer.eval_dataset) == 5
    train_pairs = {
        (tuple(c), tuple(r))
        for c, r in zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True)
    }
    held_out = {
        (tuple(c), tuple(r))
        for c, r in zip(trainer.eval_dataset["chosen_ids"], trainer.eval_dataset["rejected_ids"], strict=True)
    }
    assert not train_pairs & held_out
    posterior = trainer.fit_posterior()
    assert posterior.laplace.n_data == 15
    assert any(posterior.prior_precision == pytest.approx(g, rel=1e-6) for g in grid)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("hessian_structure", "banana", "hessian_structure"),
        ("optimize_prior_precision", "magic", "optimize_prior_precision"),
        ("subset_of_weights", "last_layer", "subset_of_weights"),
        ("curvature", "hessian", "curvature"),
        ("prior_precision", -1.0, "prior_precision"),
        ("posterior_batch_size", 0, "posterior_batch_size"),
        ("kfac_approx", "reduce_padded", "kfac_approx"),
    ],
)
def test_bad_config_values_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        BayesianRewardConfig("out", use_cpu=True, **{field: value})


def test_kfac_approx_defaults_to_reduce_masked_which_laplace_torch_lacks():
    """The default K-FAC is the padding-aware reduce (see tests/test_kfac_batching.py for why); laplace-torch's own fit
    (`laplace_backend=True`) has no mask, so the combination is refused before any training."""
    assert BayesianRewardConfig("out", use_cpu=True).kfac_approx == "reduce_masked"
    with pytest.raises(ValueError, match="kfac_approx"):
        BayesianRewardConfig("out", use_cpu=True, laplace_backend=True)
    for kfac_approx in ("reduce", "expand"):
        assert BayesianRewardConfig("out", use_cpu=True, laplace_backend=True, kfac_approx=kfac_approx).laplace_backend
    assert BayesianRewardConfig("out", use_cpu=True, laplace_backend=True, hessian_structure="diag").laplace_backend


def test_bad_inputs_fail_fast_with_clear_errors(tokenizer, tmp_path):
    args = BayesianRewardConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    model = make_reward_model(tokenizer)
    pairs = make_preference_dataset(4)
    with pytest.raises(
        ValueError, match=r"needs `chosen` and `rejected`; this one has columns \[.chosen., .prompt.\]"
    ):
        BayesianRewardTrainer(
            model,
            args=args,
            train_dataset=pairs.remove_columns("rejected"),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
    with pytest.raises(ValueError, match="is empty"):
        BayesianRewardTrainer(
            model, args=args, train_dataset=pairs.select([]), processing_class=tokenizer, peft_config=lora_config()
        )
    with pytest.raises(ValueError, match="no adapter"):
        BayesianRewardTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
    no_pad = build_tokenizer()
    no_pad.pad_token, no_pad.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        BayesianRewardTrainer(
            model, args=args, train_dataset=pairs, processing_class=no_pad, peft_config=lora_config()
        )
    trainer = BayesianRewardTrainer(
        model, args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora_config()
    )
    with pytest.raises(ValueError, match=r"`dataset`: A preference row needs `chosen`"):
        trainer.fit_posterior(pairs.remove_columns("chosen"))
    with pytest.raises(ValueError, match="one prompt per completion"):
        trainer.fit_posterior().predict(["a"], ["b", "c"])


def test_model_given_by_path_is_recorded_as_base_model(tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    make_reward_model(tokenizer).save_pretrained(base_dir)
    args = BayesianRewardConfig(
        str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", posterior_batch_size=4, disable_tqdm=True
    )
    trainer = BayesianRewardTrainer(
        str(base_dir),
        args=args,
        train_dataset=make_preference_dataset(8),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.fit_posterior()
    trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "base_model").exists()  # reloadable from its path: not copied
    loaded = BayesianRewardModel.from_pretrained(tmp_path / "out")
    assert loaded.metadata["base_model"] == str(base_dir)
    expected = trainer.posterior.predict(["name a few tools : "], ["saw"])
    # 8 pairs: the fit eigendecomposes each Kronecker factor from its 16 rows (low rank); the reload decomposes the
    # same saved factors densely. Two float32 eigendecompositions of one matrix: variances equal to float32 round-off.
    torch.testing.assert_close(loaded.predict(["name a few tools : "], ["saw"]), expected, rtol=2e-5, atol=1e-6)


def test_half_precision_model_is_refused_before_the_fit(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a float32"):
        trainer.fit_posterior()


def test_failed_eigendecomposition_raises_instead_of_exiting():
    # laplace-torch's symeig calls exit() when eigh fails; a run must not end silently with status 0.
    bad = Kron([[torch.full((3, 3), float("nan")), torch.eye(2)]])
    with pytest.raises(RuntimeError, match="eigendecompose"), eigendecomposition_errors_raise():
        bad.decompose()


def test_fit_and_load_print_nothing_by_default(tokenizer, tmp_path, capfd):
    # disable_tqdm=True (as make_trainer sets) installs transformers' PrinterCallback, which prints every log.
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    capfd.readouterr()
    trainer.fit_posterior()
    trainer.fit_posterior(make_preference_dataset(8, seed=1))  # tokenizing a new dataset shows no bars either
    BayesianRewardModel.from_pretrained(tmp_path / "saved")
    assert capfd.readouterr() == ("", "")
    assert sum("laplace/prior_precision" in entry for entry in trainer.state.log_history) == 3  # logged, not printed

    # Asked for: a progress bar argument, or transformers' own verbosity. The settings come back afterwards.
    bars, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    BayesianRewardModel.from_pretrained(tmp_path / "saved", progress_bar=True)
    assert "Loading weights" in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled() == bars
    transformers_logging.set_verbosity_info()
    try:
        trainer.fit_posterior()
        BayesianRewardModel.from_pretrained(tmp_path / "saved")
        out, err = capfd.readouterr()
    finally:
        transformers_logging.set_verbosity(verbosity)
    assert "laplace/prior_precision" in out and "Loading weights" in err


def test_evaluate_posterior_reports_pair_metrics_to_the_config_and_the_card(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=16)
    trainer.train()
    with pytest.raises(ValueError, match="no `eval_dataset`"):
        trainer.evaluate_posterior()
    held_out = make_preference_dataset(8, seed=7)
    metrics = trainer.evaluate_posterior(held_out)
    # The tokenized path equals scoring the texts: the pair metrics of `predict_pairs`.
    diff_mean, diff_var = trainer.posterior.predict_pairs(held_out["prompt"], held_out["chosen"], held_out["rejected"])
    assert metrics == pytest.approx({**pair_metrics(diff_mean, diff_var), "num_pairs": 8})
    # The model's own evaluate on the texts: the same metrics by the token budget (the default) or pairs of 3.
    texts = (held_out["prompt"], held_out["chosen"], held_out["rejected"])
    for batching in ({}, {"batch_size": 3}, {"max_tokens": 16}):
        assert trainer.posterior.evaluate(*texts, **batching) == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    assert trainer.state.log_history[-1]["laplace/eval_laplace_probit_nll"] == pytest.approx(
        metrics["laplace_probit_nll"]
    )
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / POSTERIOR_CONFIG_NAME).read_text())
    assert saved["eval_metrics"] == pytest.approx(metrics)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert f"| Accuracy | {metrics['map_accuracy']:.4f} | {metrics['map_accuracy']:.4f} |" in card
    assert "## Laplace posterior" in card and "library_name: peft" in card
