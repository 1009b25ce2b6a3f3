"""The per-sample gradient path (the default fit and predictive) against laplace-torch's own path, in float64.

References, each computed independently of `trl_bayes.per_sample`:
- the fit: laplace-torch's `la.fit` (curvlinops K-FAC for kron, its GGN for diag and full) on the same batches;
- the predictive: laplace-torch's stock `la(x, pred_type="glm")` (torch.func Jacobians of the padded batch) and the
  reference path of `predict` (one unpadded autograd call per response, then laplace-torch's `functional_variance`);
- kron: the dense precision kron(G, A) + delta I per block, assembled from the fitted factors, solved directly;
- the empirical Fisher: laplace-torch's `CurvlinopsEF` (kron, full; it has no diag EF for dict inputs, so diag is
  checked against the diagonal of its full EF) and a brute-force sum of (1 - p)^2 d d^T over per-pair autograd calls.
The same checks run on the score head alone (last-layer Laplace) and on a BERT reward model (bidirectional attention,
reward read at the first token through the pooler, right padding).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from trl_bayes.laplace_lora import (
    RewardPairModel,
    fit_laplace,
    make_laplace,
    pop_input_require_grads_hooks,
    reward_jacobians,
    select_laplace_parameters,
)
from trl_bayes.per_sample import batch_jacobians, laplace_layers
from trl_bayes.reward import BayesianRewardModel, pad_token_ids, tokenize_response
from trl_bayes.synthetic import make_preference_dataset

from .conftest import TINY_MODEL as TINY
from .conftest import lora_config, make_trainer

# Two layers, so that the LoRA factors of an inner layer are differentiated through a whole layer above them.
PROMPTS = ["please list fruits : ", "name a few tools : ", "give me some colors : ", "name a few animals : "]
COMPLETIONS = ["apple pear fig", "saw", "red blue green red red blue and also", "cat"]  # lengths differ: padding


def tiny_gpt_neox(tokenizer, path, subset_of_weights):
    trainer = make_trainer(
        tokenizer, path, num_pairs=10, dtype=torch.float64, model_kwargs=TINY, peft=lora_config(r=2)
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    select_laplace_parameters(model, subset_of_weights)
    pop_input_require_grads_hooks(model)
    pairs = list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True))
    return model, pairs


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """A float64 model with a rank-2 adapter + score head, its Laplace weights selected, and 10 training pairs."""
    return tiny_gpt_neox(tokenizer, tmp_path_factory.mktemp("tiny"), "all")


def tiny_bert(tokenizer, subset_of_weights):
    """A float64 BERT reward model built from a config (random weights): LoRA on query and value, PEFT's trainable
    `classifier` (with bias) on the tanh pooler of the first token; the pooler itself stays frozen."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=64, num_labels=1, pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    peft_config = LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False
    )
    model = get_peft_model(BertForSequenceClassification(config), peft_config).double()
    names = select_laplace_parameters(model, subset_of_weights)
    assert not any("pooler" in n for n in names) and any("classifier" in n and n.endswith("bias") for n in names)
    data = make_preference_dataset(10, seed=1)
    pairs = [
        (tokenize_response(tokenizer, p, c), tokenize_response(tokenizer, p, r))
        for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"], strict=True)
    ]
    return model, pairs


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """Laplace weights of other kinds: GPT-NeoX's score head alone, and a BERT reward model (all or head)."""
    return {
        "gpt_neox_head": tiny_gpt_neox(tokenizer, tmp_path_factory.mktemp("head"), "head"),
        "bert_all": tiny_bert(tokenizer, "all"),
        "bert_head": tiny_bert(tokenizer, "head"),
    }


def _fit(
    model,
    tokenizer,
    pairs,
    structure,
    kfac_approx="reduce",
    laplace_backend=False,
    prior_precision=0.5,
    curvature="ggn",
):
    la = make_laplace(RewardPairModel(model), structure, prior_precision, kfac_approx, curvature)
    # Batches of 4, 4 and 2 pairs: padding differs from batch to batch, and the last batch is smaller.
    return fit_laplace(la, pairs, tokenizer.pad_token_id, batch_size=4, laplace_backend=laplace_backend)


def _assert_predictive_is_laplace_torchs(posterior, la, model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`posterior.predict_ids` on PROMPTS x COMPLETIONS (batches of 3 and 1) equals laplace-torch's stock GLM
    predictive on the padded batch and its reference path (unpadded per-response Jacobians, laplace-torch's
    functional_variance); returns (mean, var)."""
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    mean, var = posterior.predict_ids(ids, batch_size=3)
    assert (var > 0).all()
    input_ids, attention_mask = pad_token_ids(ids, tokenizer.pad_token_id)
    model.eval()
    f_mu, f_var = la({"input_ids": input_ids, "attention_mask": attention_mask}, pred_type="glm")
    torch.testing.assert_close(mean, f_mu.reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, f_var.reshape(-1), rtol=1e-5, atol=0)
    ref_mean, ref_var = posterior.predict_ids(ids, batch_size=3, laplace_backend=True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)
    return mean, var


@pytest.mark.parametrize(
    ("structure", "kfac_approx"), [("kron", "reduce"), ("kron", "expand"), ("diag", "reduce"), ("full", "reduce")]
)
def test_fit_equals_laplace_torch_fit(tiny, tokenizer, structure, kfac_approx):
    model, pairs = tiny
    ours = _fit(model, tokenizer, pairs, structure, kfac_approx)
    reference = _fit(model, tokenizer, pairs, structure, kfac_approx, laplace_backend=True)
    assert ours.n_data == reference.n_data == len(pairs)
    if structure == "kron":
        assert len(ours.H_facs.kfacs) == len(reference.H_facs.kfacs) == len(ours.params)
        for block, expected_block in zip(ours.H_facs.kfacs, reference.H_facs.kfacs, strict=True):
            for factor, expected in zip(block, expected_block, strict=True):
                assert expected.abs().max() > 0  # every factor carries data: nothing is compared to zeros
                torch.testing.assert_close(factor, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        torch.testing.assert_close(ours.H, reference.H, rtol=1e-5, atol=1e-5 * reference.H.abs().max().item())
    torch.testing.assert_close(torch.as_tensor(ours.loss), torch.as_tensor(reference.loss), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_predictive_equals_laplace_torch_predictive(tiny, tokenizer, structure):
    model, pairs = tiny
    la = _fit(model, tokenizer, pairs, structure)
    posterior = BayesianRewardModel(model, tokenizer, la, {"hessian_structure": structure})
    mean, var = _assert_predictive_is_laplace_torchs(posterior, la, model, tokenizer)
    assert var.dtype == torch.float64

    # Pairs: the variance of the difference, covariance of chosen and rejected included.
    diff_mean, diff_var = posterior.predict_pairs(PROMPTS[:3], COMPLETIONS[:3], COMPLETIONS[1:], batch_size=2)
    ref_diff_mean, ref_diff_var = posterior.predict_pairs(
        PROMPTS[:3], COMPLETIONS[:3], COMPLETIONS[1:], batch_size=2, laplace_backend=True
    )
    torch.testing.assert_close(diff_mean, ref_diff_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diff_var, ref_diff_var, rtol=1e-5, atol=0)
    assert not torch.allclose(diff_var, var[:3] + var[1:], rtol=1e-3)  # the covariance term is not zero


@pytest.mark.parametrize("kfac_approx", ["reduce_masked", "reduce", "expand"])
def test_kron_variance_equals_dense_kronecker_precision(tiny, tokenizer, kfac_approx):
    """var = J P^-1 J^T with P = blockdiag(kron(G_l, A_l) + delta I), built densely from the fitted factors: the
    predictive reads the posterior only, whichever K-FAC approximation gave its factors."""
    model, pairs = tiny
    delta = 0.5
    la = _fit(model, tokenizer, pairs, "kron", kfac_approx)
    blocks = [torch.kron(*block) if len(block) == 2 else block[0] for block in la.H_facs.kfacs]
    precision = torch.block_diag(*blocks) + delta * torch.eye(la.n_params, dtype=torch.float64)
    posterior = BayesianRewardModel(model, tokenizer, la, {"hessian_structure": "kron"})
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    _, var = posterior.predict_ids(ids, batch_size=4)
    for i, response in enumerate(ids):
        reward = model(input_ids=torch.tensor([response])).logits.reshape(())
        jac = torch.cat([g.flatten() for g in torch.autograd.grad(reward, posterior.params)])
        torch.testing.assert_close(var[i], jac @ torch.linalg.solve(precision, jac), rtol=1e-8, atol=0)


def test_batch_jacobians_equal_per_response_autograd(tiny, tokenizer):
    """The whole Jacobians of a padded batch (used by the prior grid search) against one unpadded autograd call per
    response."""
    model, _ = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    ids = [tokenize_response(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    input_ids, attention_mask = pad_token_ids(ids, tokenizer.pad_token_id)
    model.eval()
    rewards, jacobians = batch_jacobians(model, params, laplace_layers(model, params), input_ids, attention_mask)
    ref_rewards, ref_jacobians = reward_jacobians(model, params, input_ids, attention_mask)
    assert jacobians.shape == (len(ids), sum(p.numel() for p in params))
    torch.testing.assert_close(rewards, ref_rewards, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacobians, ref_jacobians, rtol=1e-8, atol=1e-12)


def test_laplace_layers_refuses_weights_outside_linear_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1, bias=False))
    params = [model[0].weight, model[0].bias, model[2].weight]
    layers = laplace_layers(model, params)
    assert [(layer.weight_index, layer.bias_index) for layer in layers] == [(0, 1), (2, None)]
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        laplace_layers(model, [*params, model[1].weight])


@pytest.mark.parametrize(
    ("name", "structure", "curvature"),
    [
        ("gpt_neox", "kron", "ef"),
        ("gpt_neox", "full", "ef"),
        ("gpt_neox_head", "kron", "ggn"),
        ("gpt_neox_head", "diag", "ggn"),
        ("bert_all", "kron", "ggn"),
        ("bert_all", "full", "ggn"),
        ("bert_all", "kron", "ef"),
        ("bert_head", "kron", "ggn"),
        ("bert_head", "full", "ef"),
    ],
)
def test_other_weights_models_and_curvatures_equal_laplace_torch(tiny, models, tokenizer, name, structure, curvature):
    """Fit (factors or matrix, loss, log marglik) and predictive (stock GLM and the reference path) of the per-sample
    path against laplace-torch's own, for the score head alone, a BERT reward model, and the empirical Fisher."""
    model, pairs = tiny if name == "gpt_neox" else models[name]
    ours = _fit(model, tokenizer, pairs, structure, curvature=curvature)
    reference = _fit(model, tokenizer, pairs, structure, curvature=curvature, laplace_backend=True)
    if structure == "kron":
        for block, expected_block in zip(ours.H_facs.kfacs, reference.H_facs.kfacs, strict=True):
            for factor, expected in zip(block, expected_block, strict=True):
                assert expected.abs().max() > 0
                torch.testing.assert_close(factor, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        torch.testing.assert_close(ours.H, reference.H, rtol=1e-5, atol=1e-5 * reference.H.abs().max().item())
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood(), rtol=1e-5, atol=0)

    posterior = BayesianRewardModel(model, tokenizer, ours, {"hessian_structure": structure})
    _assert_predictive_is_laplace_torchs(posterior, ours, model, tokenizer)


def _brute_force_curvature(model, params, pairs, weight):
    """sum over pairs of weight(p) d d^T, d = grad (r_chosen - r_rejected), one unpadded autograd call per response."""

    def reward_and_grad(ids):
        reward = model(input_ids=torch.tensor([ids])).logits.reshape(())
        return reward.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(reward, params)])

    total = 0
    for chosen, rejected in pairs:
        (r_c, g_c), (r_r, g_r) = reward_and_grad(chosen), reward_and_grad(rejected)
        p = torch.sigmoid(r_c - r_r)
        total = total + weight(p) * torch.outer(g_c - g_r, g_c - g_r)
    return total


def test_empirical_fisher_is_the_sum_of_squared_pair_loss_gradients(tiny, tokenizer):
    """EF = sum (1 - p)^2 d d^T and GGN = sum p (1 - p) d d^T from plain autograd: the full and diag fits equal them
    (diag EF has no laplace-torch reference for dict inputs), and the two curvatures differ."""
    model, pairs = tiny
    model.eval()
    params = list(_fit(model, tokenizer, pairs, "diag").params)
    ef = _brute_force_curvature(model, params, pairs, lambda p: (1 - p) ** 2)
    ggn = _brute_force_curvature(model, params, pairs, lambda p: p * (1 - p))
    # Padded batches against unpadded single responses: GPT-NeoX's rotary tables round slightly differently.
    tolerance = dict(rtol=1e-5, atol=1e-7 * ef.abs().max().item())
    torch.testing.assert_close(_fit(model, tokenizer, pairs, "full", curvature="ef").H, ef, **tolerance)
    torch.testing.assert_close(_fit(model, tokenizer, pairs, "diag", curvature="ef").H, ef.diagonal(), **tolerance)
    torch.testing.assert_close(_fit(model, tokenizer, pairs, "full").H, ggn, **tolerance)
    assert not torch.allclose(ef, ggn, rtol=1e-2)
    # laplace-torch refuses a diag EF on dict inputs itself; ours is the only path there.
    with pytest.raises(ValueError, match="DiagEF"):
        _fit(model, tokenizer, pairs, "diag", curvature="ef", laplace_backend=True)
