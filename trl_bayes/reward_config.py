from __future__ import annotations

from dataclasses import dataclass, field

from trl import RewardConfig

from .enums import Curvature, HessianStructure, KFACApprox, PriorPrecisionMethod, SubsetOfWeights


@dataclass
class BayesianRewardConfig(RewardConfig):
    r"""
    Configuration class for the [`BayesianRewardTrainer`]: TRL's [`~trl.RewardConfig`] plus the Laplace fields.

    The reward model is trained as usual (MAP, Bradley-Terry loss); a post-hoc Laplace approximation over its LoRA
    weights then turns every reward into a Gaussian N(r_MAP(x, y), Λ(x, y)) through the linearized (GLM) predictive.
    Paper: "Bayesian Reward Models for LLM Alignment" (Yang et al. 2024, https://huggingface.co/papers/2402.13210).
    Names follow laplace-torch (https://github.com/aleximmer/Laplace).

    Parameters:
        > Parameters that control the posterior

        hessian_structure (`str`, *optional*, defaults to `"kron"`):
            Curvature structure: `"kron"` (K-FAC, the paper's choice), `"diag"`, or `"full"` (dense; only for models
            with a few thousand LoRA weights).
        subset_of_weights (`str`, *optional*, defaults to `"all"`):
            Weights that carry the posterior: `"all"` trainable weights (LoRA factors + score head), `"lora"` (the
            LoRA factors only), or `"head"` (the score head only: last-layer Laplace, cheap, and the variance then only
            sees the reward model's last hidden state; a BERT pooler is frozen under PEFT and never included). The
            other weights stay at their MAP values.
        curvature (`str`, *optional*, defaults to `"ggn"`):
            Curvature of the Bradley-Terry loss in the posterior precision: `"ggn"` (generalized Gauss-Newton,
            sum p(1-p) d d^T with d the gradient of r_chosen - r_rejected; the paper's) or `"ef"` (empirical Fisher,
            sum (1-p)^2 d d^T: heavier on pairs the model gets wrong, lighter on ones it already separates, so the
            variances are larger where training pairs are easy). For every `hessian_structure`; the reference path
            (`laplace_backend=True`) has no `diag` EF.
        kfac_approx (`str`, *optional*, defaults to `"reduce_masked"`):
            K-FAC treatment of the token dimension for `hessian_structure="kron"` (Eschenhagen et al. 2023,
            https://huggingface.co/papers/2311.00636). `"reduce_masked"`, the default, is K-FAC-reduce over each
            sequence's real tokens: a layer's inputs are averaged over the tokens the attention mask keeps and its
            output gradients summed, the right reduction for one reward per sequence; a pair then adds the same
            curvature whatever it is batched and padded with, so the posterior does not depend on
            `posterior_batch_size` or on the order of the pairs. `"reduce"` is laplace-torch's K-FAC-reduce, which
            averages over every position of the padded batch: the pad tokens' activations enter the input factor and
            the posterior moves with `posterior_batch_size` (variances by a few percent between 8 and 64, by up to
            ~20% between 1 and 64). `"expand"` is laplace-torch's default, every position an example (for per-token
            losses), padding included: on reward models a larger marginal-likelihood prior precision and variances
            3-10x smaller than the reduce variants. `"reduce"` and `"expand"` reproduce laplace-torch's own `fit`
            (`laplace_backend=True`), which has no `"reduce_masked"`.

        > Parameters that control the prior precision

        prior_precision (`float`, *optional*, defaults to `1.0`):
            Precision of the isotropic Gaussian prior on the Laplace weights: the starting point of the
            optimization, or the value used when `optimize_prior_precision=None`.
        optimize_prior_precision (`str` or `None`, *optional*, defaults to `"marglik"`):
            `"marglik"` maximizes the Laplace log marginal likelihood on the training pairs; `"gridsearch"` minimizes
            the held-out pair NLL on `eval_dataset` (or on `posterior_val_fraction` of the training pairs); `None`
            keeps `prior_precision`.
        prior_precision_steps (`int`, *optional*, defaults to `100`):
            Adam steps of the marginal-likelihood optimization.
        prior_precision_grid (`list[float]`, *optional*, defaults to `[1e-4, ..., 1e4]`):
            Values tried by `"gridsearch"` (log-spaced, 33 values by default).
        posterior_val_fraction (`float`, *optional*, defaults to `0.1`):
            Fraction of the training pairs held out for `"gridsearch"` when no `eval_dataset` is given. They are
            held out before training, so the MAP never sees the pairs that choose its prior precision.

        > Parameters that control the fit

        laplace_backend (`bool`, *optional*, defaults to `False`):
            Fit the curvature with laplace-torch's own `fit` (the reference) instead of per-sample gradients from one
            forward and one backward per batch. Same posterior, slower (kron: an extra forward and backward per
            batch; diag/full: time and memory quadratic in `posterior_batch_size`). With kron it needs `kfac_approx`
            `"reduce"` or `"expand"`.
        posterior_batch_size (`int`, *optional*, defaults to `8`):
            Pairs per curvature batch (when `posterior_max_tokens` is `None`). Under several processes the batches are
            dealt round-robin, so this must leave at least one batch per process. Memory grows linearly with it.
        posterior_max_tokens (`int` or `None`, *optional*, defaults to `None`):
            Padded tokens per curvature batch, in place of `posterior_batch_size`: consecutive pairs are packed while
            2 x pairs x the longest row stays within the budget (a pair's two rows pad to its longer one; a pair
            longer than the budget is fitted alone). Fits short pairs in large batches and long ones in small, at
            bounded memory. The batches are the same for any number of processes and, as with `posterior_batch_size`,
            must leave at least one per process. `None` keeps batches of `posterior_batch_size` pairs. The posterior
            does not depend on the batching under `kfac_approx="reduce_masked"` (kron) and for diag and full.
        fit_posterior_after_train (`bool`, *optional*, defaults to `True`):
            Whether `train()` fits the posterior on the training pairs right after MAP training.
    """

    hessian_structure: str = field(
        default="kron",
        metadata={"help": "Curvature structure of the posterior.", "choices": [s.value for s in HessianStructure]},
    )
    subset_of_weights: str = field(
        default="all",
        metadata={
            "help": "Weights that carry the posterior: all trainable (LoRA + score head), LoRA only, or the head only.",
            "choices": [s.value for s in SubsetOfWeights],
        },
    )
    curvature: str = field(
        default="ggn",
        metadata={
            "help": "Curvature of the Bradley-Terry loss: 'ggn' (generalized Gauss-Newton) or 'ef' (empirical Fisher).",
            "choices": [c.value for c in Curvature],
        },
    )
    kfac_approx: str = field(
        default="reduce_masked",
        metadata={
            "help": "K-FAC token treatment for kron: 'reduce_masked' (default) averages layer inputs over real tokens "
            "only, so the posterior does not depend on the fit's batching or padding; 'reduce' (laplace-torch's) "
            "averages over padded positions too; 'expand' (laplace-torch's default) treats every token as an example.",
            "choices": [s.value for s in KFACApprox],
        },
    )
    prior_precision: float = field(
        default=1.0,
        metadata={"help": "Prior precision: initial value of the optimization, or the fixed value."},
    )
    optimize_prior_precision: str | None = field(
        default="marglik",
        metadata={
            "help": "How to choose the prior precision: 'marglik', 'gridsearch' (held-out pairs) or None (keep it).",
        },
    )
    prior_precision_steps: int = field(
        default=100, metadata={"help": "Adam steps of the marginal-likelihood optimization."}
    )
    prior_precision_grid: list[float] | None = field(
        default=None,
        metadata={"help": "Prior precisions tried by 'gridsearch'. Defaults to 33 log-spaced values in [1e-4, 1e4]."},
    )
    posterior_val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of training pairs held out (of MAP training and the fit) for 'gridsearch' when no "
            "eval_dataset is given."
        },
    )
    posterior_batch_size: int = field(default=8, metadata={"help": "Pairs per curvature batch in the posterior fit."})
    posterior_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Padded tokens per curvature batch (2 x pairs x longest row), in place of posterior_batch_size. "
            "None keeps batches of posterior_batch_size pairs."
        },
    )
    laplace_backend: bool = field(
        default=False,
        metadata={"help": "Fit with laplace-torch's own fit (the reference path) instead of per-sample gradients."},
    )
    fit_posterior_after_train: bool = field(
        default=True, metadata={"help": "Whether train() fits the posterior right after MAP training."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.optimize_prior_precision in ("none", "None", ""):
            self.optimize_prior_precision = None
        checks = {
            "hessian_structure": (self.hessian_structure, HessianStructure),
            "subset_of_weights": (self.subset_of_weights, SubsetOfWeights),
            "kfac_approx": (self.kfac_approx, KFACApprox),
            "curvature": (self.curvature, Curvature),
        }
        if self.optimize_prior_precision is not None:
            checks["optimize_prior_precision"] = (self.optimize_prior_precision, PriorPrecisionMethod)
        for name, (value, enum) in checks.items():
            if value not in [member.value for member in enum]:
                choices = ", ".join(repr(m.value) for m in enum)
                raise ValueError(f"`{name}`={value!r} is not valid: choose one of {choices}.")
        if self.laplace_backend and self.hessian_structure == "kron" and self.kfac_approx == "reduce_masked":
            raise ValueError(
                "`laplace_backend=True` fits with laplace-torch's K-FAC, which has no `kfac_approx`='reduce_masked' "
                "(the default): set `kfac_approx` to 'reduce' or 'expand', or `laplace_backend=False`."
            )
        if self.prior_precision <= 0:
            raise ValueError(f"`prior_precision` must be > 0, got {self.prior_precision}.")
        if self.posterior_batch_size < 1:
            raise ValueError(f"`posterior_batch_size` must be >= 1, got {self.posterior_batch_size}.")
        if self.posterior_max_tokens is not None and self.posterior_max_tokens < 1:
            raise ValueError(
                f"`posterior_max_tokens` must be >= 1 (padded tokens per curvature batch), got "
                f"{self.posterior_max_tokens}: set a budget, or None for batches of `posterior_batch_size` pairs."
            )
        if not 0.0 < self.posterior_val_fraction < 1.0:
            raise ValueError(f"`posterior_val_fraction` must be in (0, 1), got {self.posterior_val_fraction}.")
        if self.prior_precision_grid is None:
            self.prior_precision_grid = [10 ** (i / 4) for i in range(-16, 17)]
        if any(p <= 0 for p in self.prior_precision_grid):
            raise ValueError("`prior_precision_grid` values must all be > 0.")
