"""The private (or undocumented) internals of other packages that trl_bayes relies on, one test each.

A new release of laplace-torch, TRL, transformers, DeepSpeed or PyTorch may rename or change any of these without
notice; pyproject.toml caps the first four below their next release for that reason. When one of these tests fails,
its message names the package, the installed version, where trl_bayes uses the internal and what to do: install a
version inside the pinned range, or port that use (and move the pin) after reading the new release's code.

Each test checks the shape we rely on (attribute present, signature) and, where cheap, the behaviour.
"""

from __future__ import annotations

import copy
import inspect
from importlib.metadata import version

import pytest
import torch
from torch import nn

# The packages pyproject.toml caps for these internals; torch and curvlinops (laplace-torch's backend) are not capped.
CAPPED = {"laplace-torch", "trl", "transformers", "deepspeed"}


def require(condition: bool, package: str, internal: str, used_by: str) -> None:
    """Fail with the package, its installed version, the internal, its user in trl_bayes and what to do."""
    if not condition:
        known_good = "inside the range pinned in pyproject.toml" if package in CAPPED else "this test last passed on"
        pytest.fail(
            f"{package} {version(package)}: {internal} is not what trl_bayes expects; it is used by {used_by}. "
            f"Install a {package} version {known_good}, or port that code to this {package} release (then update "
            "pyproject.toml's pin and this test).",
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------------------------------
# laplace-torch: trl_bayes.laplace_lora.fit_per_sample and trl_bayes.per_sample fill a posterior's curvature
# themselves (one forward and one backward per batch), then hand it back to laplace-torch's algebra.


def tiny_laplace(hessian_structure: str, dtype: torch.dtype = torch.float32, **kwargs):
    from laplace import Laplace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    return Laplace(model, "classification", subset_of_weights="all", hessian_structure=hessian_structure, **kwargs)


def tiny_loader(dtype: torch.dtype = torch.float32) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=generator, dtype=dtype)
    y = torch.randint(0, 2, (16,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("hessian_structure", ["kron", "diag", "full"])
def test_laplace_init_H(hessian_structure):
    """`la._init_H()` resets `la.H` to an empty curvature we can add to (`la.H += ...` for diag and full)."""
    from laplace.utils import Kron

    la = tiny_laplace(hessian_structure)
    used_by = "trl_bayes.laplace_lora.fit_per_sample (resets the curvature before its own fit)"
    require(callable(getattr(la, "_init_H", None)), "laplace-torch", f"{type(la).__name__}._init_H()", used_by)
    la.H = None
    la._init_H()
    n = la.n_params
    if hessian_structure == "kron":
        factors = la.H.kfacs if isinstance(la.H, Kron) else []
        shapes = [[tuple(f.shape) for f in block] for block in factors]
        expected = [[(4, 4), (3, 3)], [(4, 4)], [(2, 2), (4, 4)], [(2, 2)]]  # weight (out, in): two factors; bias: one
        ok = shapes == expected and not any(f.any() for block in factors for f in block)
        require(ok, "laplace-torch", "KronLaplace._init_H() (zero Kronecker factors)", used_by)
    else:
        shape = (n,) if hessian_structure == "diag" else (n, n)
        ok = isinstance(la.H, torch.Tensor) and la.H.shape == shape and not la.H.any()
        require(ok, "laplace-torch", f"{type(la).__name__}._init_H() (zeros of shape {shape})", used_by)


def test_laplace_asdl_fisher_kwargs():
    """`la._asdl_fisher_kwargs` holds the K-FAC options given to `Laplace(asdl_fisher_kwargs=...)`; without one,
    curvlinops' `KFACLinearOperator` uses `kfac_approx="expand"`, which `fit_per_sample` assumes."""
    from curvlinops import KFACLinearOperator

    used_by = "trl_bayes.laplace_lora.fit_per_sample (reads kfac_approx: reduce or expand)"
    la = tiny_laplace("kron", asdl_fisher_kwargs={"kfac_approx": "reduce"})
    stored = getattr(la, "_asdl_fisher_kwargs", None)
    require(stored == {"kfac_approx": "reduce"}, "laplace-torch", "KronLaplace._asdl_fisher_kwargs", used_by)
    default = inspect.signature(KFACLinearOperator.__init__).parameters.get("kfac_approx")
    ok = default is not None and str(getattr(default.default, "value", default.default)) == "expand"
    require(ok, "curvlinops-for-pytorch", "KFACLinearOperator(kfac_approx=...) default 'expand'", used_by)
    require(
        "kfac_approx" not in tiny_laplace("kron")._asdl_fisher_kwargs,
        "laplace-torch",
        "KronLaplace._asdl_fisher_kwargs without asdl_fisher_kwargs (no kfac_approx: curvlinops' default)",
        used_by,
    )


def test_laplace_posterior_scale_cache():
    """A full posterior caches `posterior_scale` in `la._posterior_scale`; setting it to None after replacing `la.H`
    (our fit, the all-reduce over processes) makes laplace-torch recompute it from the new curvature."""
    used_by = "trl_bayes.laplace_lora (fit_per_sample, the all-reduce of the curvature)"
    la = tiny_laplace("full", dtype=torch.float64)
    la.fit(tiny_loader(torch.float64))
    require(hasattr(la, "_posterior_scale"), "laplace-torch", "FullLaplace._posterior_scale", used_by)
    first = la.posterior_scale.clone()
    la.H = 2 * la.H
    la._posterior_scale = None
    second = la.posterior_scale
    expected = torch.linalg.cholesky(torch.linalg.inv(la.posterior_precision))  # posterior_scale = Sigma^(1/2)
    ok = not torch.allclose(first, second) and torch.allclose(second @ second.T, expected @ expected.T, atol=1e-10)
    require(ok, "laplace-torch", "FullLaplace._posterior_scale = None (recompute from la.H)", used_by)


def test_laplace_backend_cls_dtype_device():
    """`la._backend_cls` is the curvature backend class given to `Laplace(backend=...)` (EF or GGN), and `la._dtype`
    / `la._device` are the model's parameters' dtype and device."""
    from laplace.curvature import CurvlinopsEF, EFInterface

    la = tiny_laplace("diag", dtype=torch.float64, backend=CurvlinopsEF)
    backend = getattr(la, "_backend_cls", None)
    ok = backend is CurvlinopsEF and issubclass(backend, EFInterface)
    require(ok, "laplace-torch", "BaseLaplace._backend_cls", "trl_bayes.laplace_lora.uses_empirical_fisher")
    ok = getattr(la, "_dtype", None) == torch.float64 and getattr(la, "_device", None) == torch.device("cpu")
    used_by = "trl_bayes.laplace_lora and trl_bayes.per_sample (dtype and device of the curvature)"
    require(ok, "laplace-torch", "BaseLaplace._dtype / ._device", used_by)


def test_laplace_fit_fills_the_fields_we_fill():
    """`fit_per_sample` fills what laplace-torch's own `fit` fills (`H`, `H_facs`, `loss`, `n_data`, `mean`), and the
    kron predictive reads a `KronDecomposed`'s `eigenvectors`, `eigenvalues` and `deltas`."""
    from laplace.utils import Kron, KronDecomposed

    la = tiny_laplace("kron")
    la.fit(tiny_loader())
    used_by = "trl_bayes.laplace_lora.fit_per_sample and trl_bayes.per_sample (the kron predictive)"
    ok = isinstance(la.H_facs, Kron) and isinstance(la.H, KronDecomposed) and la.n_data == 16
    ok = ok and torch.is_tensor(la.mean) and la.mean.shape == (la.n_params,) and torch.as_tensor(la.loss).numel() == 1
    require(ok, "laplace-torch", "KronLaplace.fit's fields (H, H_facs, loss, n_data, mean)", used_by)
    vectors, values, deltas = (getattr(la.H, name, None) for name in ("eigenvectors", "eigenvalues", "deltas"))
    # One entry per parameter block (weight, bias, weight, bias), zipped together by the kron predictive.
    ok = isinstance(vectors, list) and isinstance(values, list) and len(vectors) == len(values) == len(deltas) == 4
    require(ok, "laplace-torch", "KronDecomposed.eigenvectors / .eigenvalues / .deltas", used_by)


# ---------------------------------------------------------------------------------------------------------------------
# TRL


def test_trl_tokenize(tokenizer):
    """`trl.data_utils._tokenize` is what `RewardTrainer` tokenizes pairs with; scoring calls it for conversations
    and, for plain text, calls the tokenizer on a whole list at once, which holds only while `_tokenize` on plain text
    is the tokenizer's own call: a reward is read from exactly the training tokens."""
    import trl.data_utils

    used_by = "trl_bayes.generation.tokenize_responses (scoring tokenizes as RewardTrainer does)"
    tokenize = getattr(trl.data_utils, "_tokenize", None)
    require(callable(tokenize), "trl", "trl.data_utils._tokenize", used_by)
    params = list(inspect.signature(tokenize).parameters)
    require(params[:2] == ["processing_class", "input"], "trl", "_tokenize(processing_class, input, ...)", used_by)
    vocab = tokenizer.get_vocab()
    text = "name a few fruits : apple pear" + tokenizer.eos_token
    expected = [vocab[w] for w in ["name", "a", "few", "fruits", ":", "apple", "pear"]] + [tokenizer.eos_token_id]
    require(list(tokenize(tokenizer, text)["input_ids"]) == expected, "trl", "_tokenize on plain text", used_by)
    texts = [text, "apple" + tokenizer.eos_token, tokenizer.eos_token]
    batch = [list(ids) for ids in tokenizer(text=texts)["input_ids"]]
    per_text = [list(tokenize(tokenizer, t)["input_ids"]) for t in texts]
    require(batch == per_text, "trl", "_tokenize on plain text = the tokenizer's call on a list", used_by)
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{{ eos_token }}"
    messages = [{"role": "user", "content": "name a few fruits :"}, {"role": "assistant", "content": "apple pear"}]
    require(list(tokenize(chat, messages)["input_ids"]) == expected, "trl", "_tokenize on messages", used_by)


def test_trl_reward_trainer_prepare_dataset(tokenizer, tmp_path):
    """`RewardTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)` tokenizes prompt / chosen /
    rejected into `chosen_ids` / `rejected_ids` (EOS appended); `fit_posterior(dataset)` reuses it."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    used_by = "trl_bayes.reward_trainer.BayesianRewardTrainer.fit_posterior"
    method = getattr(RewardTrainer, "_prepare_dataset", None)
    require(callable(method), "trl", "RewardTrainer._prepare_dataset", used_by)
    params = list(inspect.signature(method).parameters)
    expected_params = ["self", "dataset", "processing_class", "args", "dataset_name"]
    require(params == expected_params, "trl", f"RewardTrainer._prepare_dataset({', '.join(params)})", used_by)
    pairs = Dataset.from_dict({"prompt": ["name a few fruits :"], "chosen": [" apple"], "rejected": [" hammer"]})
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None)
    # The method uses nothing of the trainer's state; an uninitialized instance keeps the check cheap.
    out = method(object.__new__(RewardTrainer), pairs, tokenizer, args, "check")
    vocab = tokenizer.get_vocab()
    prompt = [vocab[w] for w in ["name", "a", "few", "fruits", ":"]]
    ok = out[0]["chosen_ids"] == [*prompt, vocab["apple"], tokenizer.eos_token_id]
    ok = ok and out[0]["rejected_ids"] == [*prompt, vocab["hammer"], tokenizer.eos_token_id]
    require(ok, "trl", "RewardTrainer._prepare_dataset output (chosen_ids, rejected_ids)", used_by)


# ---------------------------------------------------------------------------------------------------------------------
# transformers


def test_transformers_hf_deepspeed_config_weak_ref():
    """The live DeepSpeed config sits behind the module-level weak reference `_hf_deepspeed_config_weak_ref`;
    `whole_weights` reads it, unsets it for the block and sets it back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    used_by = "trl_bayes.distributed.whole_weights"
    require(
        hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"),
        "transformers",
        "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref",
        used_by,
    )

    class Zero3Config:  # the one method `is_deepspeed_zero3_enabled` calls
        def is_zero3(self):
            return True

    before, config = hf_deepspeed._hf_deepspeed_config_weak_ref, Zero3Config()
    try:
        hf_deepspeed.set_hf_deepspeed_config(config)
        read = hf_deepspeed._hf_deepspeed_config_weak_ref
        ok = callable(read) and read() is config and hf_deepspeed.is_deepspeed_zero3_enabled()
        hf_deepspeed.unset_hf_deepspeed_config()
        ok = ok and not hf_deepspeed.is_deepspeed_zero3_enabled()
        hf_deepspeed.set_hf_deepspeed_config(read())
        ok = ok and hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = before
    require(ok, "transformers", "_hf_deepspeed_config_weak_ref() (the live config; set, unset, set back)", used_by)


def test_transformers_config_private_fields(tokenizer, tmp_path):
    """`config._attn_implementation = "eager"` makes a model built from the config use eager attention, and a model's
    `config._name_or_path` is empty when it was built from a config and its directory when loaded from one."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    config._attn_implementation = "eager"
    model = GPTNeoXForSequenceClassification(config)
    require(
        model.config._attn_implementation == "eager",
        "transformers",
        "PretrainedConfig._attn_implementation",
        "trl_bayes.experiments.world.tiny_gpt_neox_config (the offline world's configs)",
    )
    model.save_pretrained(tmp_path)
    loaded = GPTNeoXForSequenceClassification.from_pretrained(tmp_path)
    require(
        getattr(model.config, "_name_or_path", None) == ""
        and getattr(loaded.config, "_name_or_path", None) == str(tmp_path),
        "transformers",
        "PretrainedConfig._name_or_path ('' when built from a config, else the path it was loaded from)",
        "trl_bayes.reward_trainer.BayesianRewardTrainer (whether save_model writes base_model/)",
    )


def test_transformers_input_require_grads_hook_name(tokenizer):
    """`enable_input_require_grads` registers a forward hook on the input embeddings whose function name starts with
    `make_inputs_require_grad` (PEFT's own fallback hook has that name too); we find the hooks by that name."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = GPTNeoXForCausalLM(config)
    model.enable_input_require_grads()
    names = [getattr(f, "__name__", "") for f in model.get_input_embeddings()._forward_hooks.values()]
    require(
        any(name.startswith("make_inputs_require_grad") for name in names),
        "transformers",
        f"the hook of PreTrainedModel.enable_input_require_grads (hook names: {names})",
        "trl_bayes.laplace_lora.pop_input_require_grads_hooks",
    )


def test_transformers_generation_config_merge_and_dynamic_cache(tokenizer):
    """`model._prepare_generation_config(config)` returns (the merged settings `model.generate` decodes with, the
    leftover model kwargs), filling what the call leaves unset from the model's own `generation_config`; and
    `model._supports_default_dynamic_cache()` says whether a `DynamicCache` may be passed. `generation.lean_settings`
    calls both, as `model.generate` does, to decide whether the lean loop reproduces generate's tokens."""
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = GPTNeoXForCausalLM(config)
    model.generation_config.top_k = 7
    used_by = "trl_bayes.generation.lean_settings (the lean sampling loop)"
    merged = getattr(model, "_prepare_generation_config", None)
    require(callable(merged), "transformers", "GenerationMixin._prepare_generation_config", used_by)
    settings, model_kwargs = merged(GenerationConfig(do_sample=True, max_new_tokens=5, temperature=0.7))
    require(
        isinstance(settings, GenerationConfig)
        and (settings.top_k, settings.temperature, settings.max_new_tokens, settings.do_sample) == (7, 0.7, 5, True)
        and model_kwargs == {},
        "transformers",
        "GenerationMixin._prepare_generation_config (returns (merged GenerationConfig, model kwargs))",
        used_by,
    )
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    require(
        callable(supports) and supports() is True,
        "transformers",
        "GenerationMixin._supports_default_dynamic_cache (True for GPT-NeoX)",
        used_by,
    )


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch and DeepSpeed


def test_torch_module_hook_dicts():
    """`module._forward_hooks` / `._forward_pre_hooks` map a hook handle's `id` to the hook; deleting the entry
    removes the hook and putting it back restores it (we detach hooks for a block and restore them)."""
    module, calls = nn.Linear(2, 2), []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    module.register_forward_hook(lambda m, args, out: calls.append("post"))
    used_by = "trl_bayes.distributed.unwrapped_whole and trl_bayes.laplace_lora (without_input_require_grads_hooks)"
    hooks = getattr(module, "_forward_pre_hooks", None)
    require(
        isinstance(hooks, dict) and handle.id in hooks, "torch", "nn.Module._forward_pre_hooks[handle.id]", used_by
    )
    require(len(getattr(module, "_forward_hooks", {})) == 1, "torch", "nn.Module._forward_hooks", used_by)
    popped = hooks.pop(handle.id)
    module(torch.zeros(1, 2))
    hooks[handle.id] = popped
    module(torch.zeros(1, 2))
    require(calls == ["post", "pre", "post"], "torch", "removing / restoring entries of the hook dicts", used_by)


def test_deepspeed_zero3_start_of_forward_hook():
    """Under ZeRO-3 the engine's optimizer holds a `parameter_offload` whose `fwd_pre_hook` is the handle of the
    start-of-forward hook on the module. `unwrapped_whole` pops it by that handle; if either name changes it finds
    nothing, silently, and processes that forward on their own deadlock. Checked in the source: a real ZeRO-3 engine
    needs a distributed launch (tests/test_scaling.py runs one)."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    used_by = "trl_bayes.distributed.unwrapped_whole"
    stage3 = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    require(
        "self.parameter_offload =" in stage3, "deepspeed", "DeepSpeedZeroOptimizer_Stage3.parameter_offload", used_by
    )
    offload = inspect.getsource(DeepSpeedZeRoOffload)
    require(
        "self.fwd_pre_hook = self.module.register_forward_pre_hook(" in offload,
        "deepspeed",
        "DeepSpeedZeRoOffload.fwd_pre_hook (the start-of-forward hook's handle)",
        used_by,
    )
