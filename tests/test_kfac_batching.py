"""K-FAC and the fit's batching: under `kfac_approx="reduce_masked"` (the default) the posterior does not depend on how
the pairs were batched and padded; under laplace-torch's "reduce" and "expand" it does, through the input factor.

Reference (float64, one unpadded autograd call per response, no `trl_bayes.per_sample`): per linear layer with
inputs a_t and reward gradients g_t = dr/dz_t at the layer's outputs, per sequence s of pair i with
p_i = sigmoid(r_chosen - r_rejected),
    G = sum_s p_i (1 - p_i) (sum_t g_st)(sum_t g_st)^T,   A = (1/N) sum_s m_s m_s^T,   m_s = mean_t a_st,
the mean over the sequence's own tokens (an unpadded sequence has no others), N the number of pairs; a bias gets G.
"""

from __future__ import annotations

import pytest
import torch

from trl_bayes.curvature import KronCurvature, bradley_terry_weights, low_rank_eigh
from trl_bayes.laplace_lora import (
    RewardPairModel,
    collate_pairs,
    fit_laplace,
    make_laplace,
)
from trl_bayes.per_sample import forward_backward, laplace_layers

from .conftest import lora_config, make_trainer
from .test_per_sample import COMPLETIONS, PROMPTS, TINY, tiny_bert, tiny_gpt_neox


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """A float64 GPT-NeoX (causal, reward at the last real token) and BERT (bidirectional, reward at the first token
    through the pooler) reward model, all trainable weights selected, with 10 pairs each."""
    return {
        "gpt_neox": tiny_gpt_neox(tokenizer, tmp_path_factory.mktemp("neox"), "all"),
        "bert": tiny_bert(tokenizer, "all"),
    }


def _max_relative_difference(kfacs, other_kfacs) -> float:
    """The largest |F - F'| / max |F'| over the factors of two `Kron.kfacs`."""
    return max(
        ((f - e).abs().max() / e.abs().max()).item()
        for block, other in zip(kfacs, other_kfacs, strict=True)
        for f, e in zip(block, other, strict=True)
    )


@pytest.mark.parametrize("kfac_approx", ["reduce_masked", "reduce", "expand"])
def test_posterior_and_batching(tokenizer, tmp_path, kfac_approx):
    """Fits with posterior_batch_size 1, 8 and 64 on the same 10 pairs (10 batches; 8 + 2; one batch of 10). The
    gradient factors G never see padding (its output gradients are zero). Under "reduce_masked" the input factors,
    the marglik prior precision and the predictive variances are equal too; under "reduce" and "expand" (laplace-
    torch's) the input factors, and with them the variances, move with the batching: why "reduce_masked" is the
    default."""
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        num_pairs=10,
        dtype=torch.float64,
        model_kwargs=TINY,
        peft=lora_config(r=2),
        kfac_approx=kfac_approx,
        prior_precision_steps=50,
    )
    fits = {}
    for batch_size in (1, 8, 64):
        trainer.args.posterior_batch_size = batch_size
        posterior = trainer.fit_posterior()
        _, var = posterior.predict(PROMPTS, COMPLETIONS, batch_size=4)
        fits[batch_size] = ([[f.clone() for f in block] for block in posterior.laplace.H_facs.kfacs],
                            posterior.prior_precision, var)  # fmt: skip
    kfacs, prior_precision, var = fits[64]
    assert all(f.abs().max() > 0 for block in kfacs for f in block)  # nothing is compared to zeros
    for batch_size in (1, 8):
        other_kfacs, other_prior_precision, other_var = fits[batch_size]
        gradient_factors = [(block[0], other[0]) for block, other in zip(kfacs, other_kfacs, strict=True)]
        for factor, other in gradient_factors:
            torch.testing.assert_close(other, factor, rtol=1e-8, atol=1e-10 * factor.abs().max().item())
        input_factors = [(block[1:], other[1:]) for block, other in zip(kfacs, other_kfacs, strict=True)]
        input_difference = _max_relative_difference(*zip(*input_factors, strict=True))
        if kfac_approx == "reduce_masked":
            assert input_difference < 1e-8
            assert other_prior_precision == pytest.approx(prior_precision, rel=1e-7)
            torch.testing.assert_close(other_var, var, rtol=1e-7, atol=0)
        else:
            assert input_difference > 1e-2
            assert (other_var - var).abs().max() / var.abs().max() > 1e-3


def _kron_curvature(model, layers, la, kfac_approx, pairs, pad_token_id, length=None, n_data=1):
    """The K-FAC factors of `pairs` fitted as one batch, right-padded to `length` (default: the longest sequence)."""
    batch = collate_pairs(pairs, pad_token_id)
    input_ids, attention_mask = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)
    if length is not None:
        extra = length - input_ids.shape[1]
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id)
        attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
    curvature = KronCurvature(la, kfac_approx, n_data)
    curvature.set_batch(attention_mask)
    forward_backward(model, layers, input_ids, attention_mask, curvature, bradley_terry_weights)
    return curvature.kfacs(la.params)


@pytest.mark.parametrize("name", ["gpt_neox", "bert"])
def test_a_pair_adds_the_same_factors_alone_and_padded_in_a_batch(models, tokenizer, name):
    """One pair fitted alone, with 9 extra pad tokens, and next to the longest pair (K(both) - K(longest alone)): the
    same factors under "reduce_masked"; under "reduce" the padding changes the pair's input factor."""
    model, pairs = models[name]
    model.eval()
    pad = tokenizer.pad_token_id
    short = min(pairs, key=lambda pair: max(map(len, pair)))
    longest = max(pairs, key=lambda pair: max(map(len, pair)))
    assert max(map(len, longest)) > max(map(len, short))  # the batch pads the short pair
    for kfac_approx in ("reduce_masked", "reduce"):
        la = make_laplace(RewardPairModel(model), "kron", kfac_approx=kfac_approx)
        layers = laplace_layers(model, la.params)
        alone = _kron_curvature(model, layers, la, kfac_approx, [short], pad)
        padded = _kron_curvature(model, layers, la, kfac_approx, [short], pad, length=max(map(len, short)) + 9)
        both = _kron_curvature(model, layers, la, kfac_approx, [short, longest], pad)
        longest_alone = _kron_curvature(model, layers, la, kfac_approx, [longest], pad)
        in_batch = [[f - g for f, g in zip(b, lb, strict=True)] for b, lb in zip(both, longest_alone, strict=True)]
        if kfac_approx == "reduce_masked":
            # GPT-NeoX takes its attention softmax in float32 (transformers), whose sums round with the row length.
            assert _max_relative_difference(padded, alone) < 1e-6
            assert _max_relative_difference(in_batch, alone) < 1e-6
        else:
            assert _max_relative_difference(padded, alone) > 0.1
            assert _max_relative_difference(in_batch, alone) > 0.1


def _brute_force_masked_reduce(model, params, pairs):
    """The reference factors of the module docstring, keyed by `id(param)`: [G, A] for a weight, [G] for a bias."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    ids = {id(p) for p in params}
    assert {id(m.weight) for m in linears} <= ids

    def inputs_and_output_grads(sequence):
        seen = {}
        handles = [m.register_forward_hook(lambda m, a, o: seen.__setitem__(m, (a[0], o))) for m in linears]
        try:
            reward = model(input_ids=torch.tensor([sequence])).logits.reshape(())
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.autograd.grad(reward, [seen[m][1] for m in linears])
        # Inputs (1, T, in), or (1, in) for a head on one pooled vector; the gradients summed over tokens.
        return reward.detach(), {m: (seen[m][0].detach()[0], g[0]) for m, g in zip(linears, grads, strict=True)}

    factors = {}
    for chosen, rejected in pairs:
        (r_c, chosen_terms), (r_r, rejected_terms) = inputs_and_output_grads(chosen), inputs_and_output_grads(rejected)
        p = torch.sigmoid(r_c - r_r)
        for terms in (chosen_terms, rejected_terms):
            for module, (inputs, output_grads) in terms.items():
                a = inputs.reshape(-1, inputs.shape[-1]).mean(0)  # every token of an unpadded sequence is real
                g = output_grads.reshape(-1, output_grads.shape[-1]).sum(0)
                gradient_factor = p * (1 - p) * torch.outer(g, g)
                weight = factors.setdefault(id(module.weight), [0, 0])
                weight[0], weight[1] = weight[0] + gradient_factor, weight[1] + torch.outer(a, a) / len(pairs)
                if module.bias is not None and id(module.bias) in ids:
                    bias = factors.setdefault(id(module.bias), [0])
                    bias[0] = bias[0] + gradient_factor
    return factors


@pytest.mark.parametrize("name", ["gpt_neox", "bert"])
def test_reduce_masked_factors_equal_brute_force(models, tokenizer, name):
    """The fitted "reduce_masked" factors (batches of 4, 4 and 2 pairs, padded) against the per-response reference."""
    model, pairs = models[name]
    model.eval()
    la = make_laplace(RewardPairModel(model), "kron", kfac_approx="reduce_masked")
    fit_laplace(la, pairs, tokenizer.pad_token_id, batch_size=4)
    reference = _brute_force_masked_reduce(model, la.params, pairs)
    assert len(reference) == len(la.params)
    for param, block in zip(la.params, la.H_facs.kfacs, strict=True):
        expected_block = reference[id(param)]
        for factor, expected in zip(block, expected_block, strict=True):
            assert expected.abs().max() > 0
            # Padded batches against unpadded single responses: GPT-NeoX's float32 attention softmax rounds differently.
            torch.testing.assert_close(factor, expected, rtol=1e-6, atol=1e-8 * expected.abs().max().item())


def test_laplace_backend_has_no_reduce_masked(models, tokenizer):
    model, pairs = models["gpt_neox"]
    la = make_laplace(RewardPairModel(model), "kron", kfac_approx="reduce_masked")
    with pytest.raises(ValueError, match="reduce_masked"):
        fit_laplace(la, pairs, tokenizer.pad_token_id, batch_size=4, laplace_backend=True)


def test_low_rank_eigh_equals_dense_eigh():
    """F = X^T X from n < d rows (one of them zero, as a pair with p(1-p) = 0 gives): the same eigenvalues as
    `torch.linalg.eigh(F)`, orthonormal eigenvectors, and Q diag(l) Q^T = F."""
    torch.manual_seed(0)
    rows = torch.randn(7, 20, dtype=torch.float64)
    rows[2] = 0
    values, vectors = low_rank_eigh(rows)
    factor = rows.T @ rows
    torch.testing.assert_close(values.sort().values, torch.linalg.eigvalsh(factor), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(20, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, factor, rtol=0, atol=1e-12)


def test_fit_decomposition_equals_laplace_torch_decompose(tokenizer, tmp_path):
    """The fit eigendecomposes factors with fewer rows than dimensions from their rows (`low_rank_eigh`); the posterior
    precision is laplace-torch's `Kron.decompose` of the same factors (float64, 10 pairs: 20 rows per factor)."""
    trainer = make_trainer(
        tokenizer, tmp_path, num_pairs=10, dtype=torch.float64, model_kwargs=TINY, peft=lora_config(r=2)
    )
    la = trainer.fit_posterior().laplace
    dense = la.H_facs.decompose(damping=la.damping)
    assert any(len(block[0]) > 20 for block in la.H_facs.kfacs)  # some factor does take the low-rank path
    for ours, theirs in zip(la.H.eigenvalues, dense.eigenvalues, strict=True):
        for values, reference in zip(ours, theirs, strict=True):
            torch.testing.assert_close(
                values.sort().values, reference.sort().values, rtol=0, atol=1e-10 * reference.abs().max()
            )
    prior = la.prior_precision
    torch.testing.assert_close((la.H + prior).to_matrix(), (dense + prior).to_matrix(), rtol=1e-10, atol=1e-12)
