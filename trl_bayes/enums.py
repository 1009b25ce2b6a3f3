"""The options of the Laplace posterior, as `str, Enum`s with a docstring per member (laplace-torch's
`laplace/utils/enums.py` style): `BayesianRewardConfig` validates its fields against them, and the strings are what
configs, the command line and `laplace_config.json` hold."""

from __future__ import annotations

from enum import Enum


class HessianStructure(str, Enum):
    """Structure of the GGN curvature (and so of the posterior precision) over the Laplace weights."""

    KRON = "kron"
    """Kronecker-factored (K-FAC) blocks per weight matrix: memory ~ sum of squared layer widths. The default."""
    DIAG = "diag"
    """Diagonal of the exact GGN: memory ~ number of weights, ignores all correlations."""
    FULL = "full"
    """Dense GGN: memory ~ (number of weights)^2. Exact, for small models and tests only."""


class SubsetOfWeights(str, Enum):
    """Which trainable weights carry the posterior; every other weight stays at its MAP value."""

    ALL = "all"
    """All trainable weights: the LoRA factors plus the score head (PEFT's `modules_to_save`)."""
    LORA = "lora"
    """The LoRA factors only; the score head is treated as fixed."""
    HEAD = "head"
    """The score head only (last-layer Laplace): the trainable weights that are not LoRA factors, i.e. the head PEFT's
    `SEQ_CLS` task trains and saves (`modules_to_save`: `score` for GPT-NeoX / Pythia, `classifier` with its bias for
    BERT). A BERT pooler is not in it: PEFT leaves the pooler frozen at its pretrained values, so it is not a MAP
    estimate of this data and carries no posterior. The LoRA factors stay at their MAP values."""


class Curvature(str, Enum):
    """Which curvature of the Bradley-Terry loss -log sigmoid(r_c - r_r) the posterior precision uses. With
    p = sigmoid(r_c - r_r) and d = grad (r_c - r_r): GGN = sum p (1 - p) d d^T, EF = sum (1 - p)^2 d d^T."""

    GGN = "ggn"
    """The generalized Gauss-Newton (= Fisher for this likelihood): the paper's and laplace-torch's default."""
    EF = "ef"
    """The empirical Fisher, the sum of outer products of the pairs' loss gradients: large where the model is wrong
    (p small), near zero on pairs it already separates confidently (p near 1)."""


class PriorPrecisionMethod(str, Enum):
    """How `prior_precision` is chosen after the fit."""

    MARGLIK = "marglik"
    """Maximize the Laplace approximation of the log marginal likelihood on the training pairs (no held-out data)."""
    GRIDSEARCH = "gridsearch"
    """Minimize the held-out Bradley-Terry NLL of the probit-approximated predictive over a log-spaced grid."""


class KFACApprox(str, Enum):
    """How K-FAC treats the sequence (weight-sharing) dimension; Eschenhagen et al., NeurIPS 2023 (arXiv 2311.00636).
    The factors of each are written out in `curvature.KronCurvature`."""

    REDUCE_MASKED = "reduce_masked"
    """K-FAC-reduce over each sequence's real tokens: a layer's inputs are averaged over the tokens the attention mask
    keeps, its output gradients summed, before the outer products. The right approximation for one output per
    sequence (a reward), and a pair's contribution is the same whatever it is batched and padded with, so the
    posterior does not depend on `posterior_batch_size`. The default; per-sample fit only (curvlinops has no mask)."""
    REDUCE = "reduce"
    """laplace-torch's (curvlinops') K-FAC-reduce: inputs averaged over every position of the padded batch, padding
    included, so each sequence's mean input mixes in the activations of its pad positions, more of them the longer the
    batch's longest sequence, and the posterior changes with `posterior_batch_size`. Kept to reproduce earlier fits."""
    EXPAND = "expand"
    """laplace-torch's (curvlinops') default: every position of the padded batch is an example, for per-token losses
    (language modeling). Its input factor also sees padding; on reward models it gives a much larger prior precision
    from the marginal likelihood and smaller variances than the reduce variants."""
