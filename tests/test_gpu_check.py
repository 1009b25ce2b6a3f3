"""scripts/gpu_check.py --tiny: the GPU check's code, end to end on CPU with tiny models (the GPU run itself needs a
CUDA device; CI has none)."""

from __future__ import annotations

import math
import time

import torch
from transformers import GPTNeoXForCausalLM

from .recipe_runs import load_script


def load_gpu_check():
    return load_script("gpu_check")


def test_tiny_run_prints_every_measurement(capsys):
    gpu_check = load_gpu_check()
    start = time.perf_counter()
    results = gpu_check.main(["--tiny"])
    assert time.perf_counter() - start < 60
    printed = capsys.readouterr().out
    for phase in ("MAP epoch", "posterior fit", *gpu_check.SCORING, "Best-of-N (generate + score)", "PPO step"):
        assert results[phase]["seconds"] > 0 and math.isnan(results[phase]["peak_gib"]), phase  # no GPU memory on CPU
        assert phase in printed
    ratios = results["ratios"]
    assert all(value > 0 and math.isfinite(value) for value in ratios.values()), ratios
    for text in ("fit / MAP epoch = ", "responses/s = ", "x MAP", "samples/s", "generation", "optimization"):
        assert text in printed, text


def test_paper_shapes_have_the_pythia_parameter_counts(tokenizer):
    # The totals the Pythia suite reports (Biderman et al. 2023, arXiv 2304.01373; untied input and output
    # embeddings of 50304 tokens): the configs in the script are those of the released models.
    gpu_check = load_gpu_check()
    for shape, total in ((gpu_check.PYTHIA_70M, 70_426_624), (gpu_check.PYTHIA_1_4B, 1_414_647_808)):
        with torch.device("meta"):  # no memory
            model = GPTNeoXForCausalLM(gpu_check.gpt_neox_config(shape, gpu_check.PYTHIA_VOCAB_SIZE, tokenizer))
        assert sum(p.numel() for p in model.parameters()) == total
