"""Memory of the posterior fit and of (mean, var) scoring per process, computed from model configs (no download):
the paper's proxy (Pythia-70M, LoRA r=8 on `query_key_value`) and a 7B Llama-shaped reward model (LoRA r=8 on
`q_proj`, `v_proj`), both with the score head in the posterior (`subset_of_weights="all"`).

    python scripts/memory_estimate.py                  # the README's table: 8 pairs (70M) / 1 pair (7B) of 512 tokens
    python scripts/memory_estimate.py --batch 2 --seq 1024

What is counted, in float32 (the fit and the predictive need a float32 model: `check_laplace_dtype`):

- weights: the whole model on every process during the fit and scoring (under ZeRO-3 gathered for the fit, see
  `trl_bayes.distributed.unwrapped_whole`; reward models for scoring are loaded whole, `whole_weights`);
- LoRA: the Laplace weights (LoRA factors + score head);
- curvature, kron: K-FAC factors in `curvature.KronCurvature`'s layout, for a weight (out, in) one out x out and one
  in x in factor: LoRA A (r, in) gives r x r and in x in, LoRA B (out, r) gives out x out and r x r, the score head
  (1, hidden) gives 1 x 1 and hidden x hidden. They are not sharded: every process holds (and all-reduces) all of them.
  After the fit laplace-torch keeps the summed factors (`H_facs`, saved) and their eigendecomposition (eigenvectors of
  the same sizes, for the predictive): twice the factors;
- curvature, diag: one float per Laplace weight (plus the posterior variance, another);
- per-sample gradients: the predictive streams them layer by layer (`per_sample.GLMVariance`); the largest one layer
  needs is B x out x in floats, twice (the gradients and their projection on the eigenbasis);
- activations: the forward kept for the one backward through the LoRA layers, a training step's worth. Estimated with
  Korthikanti et al. (2022, arXiv 2205.05198) per layer, without recomputation: s b h (34 + 5 a s / h) bytes in 16 bit,
  doubled for float32. A rough figure, to be measured on a GPU (`torch.cuda.max_memory_allocated`): not done here.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, LlamaConfig

MiB, GiB = 2**20, 2**30
FLOAT32 = 4


def models() -> dict[str, tuple]:
    """(config, LoRA target module names, pairs per batch) of the two reward models, from their published sizes.
    The batch is `posterior_batch_size` for the fit (the recipes' 8) and a scoring batch of as many responses x 2; at 7B
    one pair of 512 tokens already keeps about 13 GiB of activations."""
    pythia_70m = GPTNeoXConfig(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, vocab_size=50304,
        max_position_embeddings=2048, num_labels=1,
    )  # fmt: skip
    llama_7b = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000,
        max_position_embeddings=4096, num_labels=1,
    )  # fmt: skip
    return {
        "Pythia-70M, LoRA r=8 on query_key_value": (pythia_70m, ["query_key_value"], 8),
        "7B (Llama), LoRA r=8 on q_proj, v_proj": (llama_7b, ["q_proj", "v_proj"], 1),
    }


def laplace_shapes(config, targets: list[str], rank: int) -> tuple[int, list[tuple[int, int]]]:
    """The base model's parameter count and the (out, in) shape of every Laplace weight: LoRA A (r, in) and B (out, r)
    of each targeted linear layer, and the score head (1, hidden). Built on the meta device: no memory, no download."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes += [(rank, module.in_features), (module.out_features, rank)]
    shapes.append((1, config.hidden_size))  # the score head, new and trained: in the posterior
    return sum(p.numel() for p in model.parameters()), shapes


def activation_bytes(config, batch: int, seq: int) -> float:
    """Korthikanti et al.'s activations of a forward kept for the backward, float32: 2 x s b h (34 + 5 a s / h) per
    layer."""
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    return 2 * layers * seq * batch * h * (34 + 5 * a * seq / h)


def estimate(config, targets: list[str], rank: int, batch_pairs: int, seq: int) -> dict[str, float]:
    n_base, shapes = laplace_shapes(config, targets, rank)
    n_laplace = sum(o * i for o, i in shapes)
    factors = sum(o * o + i * i for o, i in shapes) * FLOAT32
    largest_factor = max(max(o, i) for o, i in shapes) ** 2 * FLOAT32
    rows = 2 * batch_pairs  # chosen and rejected are separate rows of the fitting batch
    per_sample = 2 * rows * max(o * i for o, i in shapes) * FLOAT32
    activations = activation_bytes(config, rows, seq)
    weights = n_base * FLOAT32
    kron_fit = weights + factors + largest_factor + activations + per_sample  # + one factor for all-reduce/eigh
    kron_after = weights + 2 * factors  # summed factors + eigenvectors
    diag = 2 * n_laplace * FLOAT32
    return {
        "base parameters": n_base,
        "Laplace weights": n_laplace,
        "weights (fp32)": weights,
        "kron factors": factors,
        "largest factor": largest_factor,
        "kron factors + eigendecomposition": 2 * factors,
        "diag curvature + variance": diag,
        "full GGN": n_laplace**2 * FLOAT32,
        "per-sample gradients (largest layer)": per_sample,
        "activations (batch)": activations,
        "peak fit, kron": kron_fit,
        "peak scoring, kron": kron_after + activations + per_sample,
        "peak fit, diag": weights + diag + activations + per_sample,
        "peak scoring, diag": weights + diag + activations + per_sample,
    }


def human(value: float, key: str) -> str:
    if key in ("base parameters", "Laplace weights"):
        return f"{value / 1e6:,.2f} M" if value < 1e9 else f"{value / 1e9:,.2f} B"
    return f"{value / GiB:,.2f} GiB" if value >= GiB else f"{value / MiB:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--batch", type=int, help="Pairs per batch (posterior_batch_size); default 8 / 1 (7B).")
    parser.add_argument("--seq", type=int, default=512, help="Tokens per sequence.")
    args = parser.parse_args()
    results = {
        f"{name}, {args.batch or b} pair(s)": estimate(c, t, args.rank, args.batch or b, args.seq)
        for name, (c, t, b) in models().items()
    }
    names = list(results)
    print(f"Per process, float32, batches of pairs (2 sequences each) of {args.seq} tokens\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in results[names[0]]:
        print(f"| {key} | " + " | ".join(human(results[n][key], key) for n in names) + " |")


if __name__ == "__main__":
    main()
