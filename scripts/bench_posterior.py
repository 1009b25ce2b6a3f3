"""Benchmark of the Laplace-LoRA posterior against MAP training and scoring, on a Pythia-70M-shaped reward model.

Measures, in one run, on CPU in float32 (random weights, random token ids; nothing is downloaded):

1. posterior fit time (`BayesianRewardTrainer.fit_posterior`, per `hessian_structure`, K-FAC with the config's
   default `kfac_approx`) / time of one MAP training epoch (`trainer.train()`, `num_train_epochs=1`) over the same
   preference pairs; for kron also laplace-torch's own fit (`laplace_backend=True`, the reference path, which needs
   `kfac_approx="reduce"`) beside ours with "reduce", and how far its Kronecker factors are from ours (same approx);
2. (mean, var) scoring throughput (`BayesianRewardModel.predict_ids(..., return_var=True)`) / MAP scoring throughput
   (`return_var=False`), and the relative variance (`relative_predict_ids`, groups of 8: one forward-backward pass
   per response), in responses per second;
3. laplace-torch's stock GLM predictive `la(x, pred_type="glm")` on the same responses, our speed-up over it, and
   how far its (mean, var) is from ours;
4. the tokenization of the scoring responses written as text (words of the tiny word-level tokenizer, the same
   lengths): one `tokenize_response` call per response / one `tokenize_responses` call (one batched tokenizer call);
5. the peak resident memory of each phase;
6. the targets side by side (issue 15): (mean, var) >= 0.45 x MAP throughput, relative >= 0.35 x, fit <= 1.1 x one
   MAP epoch; and (issue 6) >= 10 x the stock predictive.

The MAP epoch, the fits and the scoring runs are repeated `--repeats` times in interleaved rounds (epoch, fit kron,
fit diag, epoch, ...; MAP score, (mean, var) kron, (mean, var) diag, MAP score, ...), and each phase reports its
median run: contention from other processes then hits both sides of a ratio alike.

Peak memory is the RSS high-water mark of the process (VmHWM in /proc/self/status, the counter that
`resource.getrusage(...).ru_maxrss` also reports), reset before each phase through /proc/self/clear_refs, so each phase
gets its own peak. Where the reset is not allowed, the cumulative `ru_maxrss` is printed instead (and flagged).
tracemalloc is not used: it sees only Python's allocator, not the memory of torch tensors.

Command (from the repository root; about 2 to 3 minutes on 2 idle CPU cores, 130 s on 2026-11-28):

    .venv/bin/python scripts/bench_posterior.py

MAP training runs without activation (gradient) checkpointing, so that the fit is compared with the fastest epoch.
Times per pair, and so the ratios, depend little on the number of pairs. A quick run (about 1 minute):

    .venv/bin/python scripts/bench_posterior.py --num-pairs 8 --batch-size 8 --stock-batch 2 --seq-len 64 --repeats 1

Other processes on the same cores inflate the times: the "others' CPU" column says how much that happened.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import random
import re
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, PrinterCallback

import trl_bayes
from trl_bayes import BayesianRewardConfig, BayesianRewardModel, BayesianRewardTrainer
from trl_bayes.experiments.world import build_tokenizer
from trl_bayes.generation import tokenize_response, tokenize_responses
from trl_bayes.laplace_lora import without_input_require_grads_hooks
from trl_bayes.relative_variance import relative_predict_ids
from trl_bayes.reward import pad_token_ids, scoring_mode

# EleutherAI/pythia-70m's hyperparameters, written out so that no Hub access is needed.
PYTHIA_70M: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "layer_norm_eps": 1e-5,
}


# ---------------------------------------------------------------------------------------------------------------------
# Per-phase probes: RSS high-water mark, and CPU time taken by other processes (which would inflate our times).


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (first line of /proc/stat, minus idle and iowait)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Probe:
    """Context manager: the RSS high-water mark while inside, the RSS on entry (MiB), and the share of the machine's
    CPU capacity that other processes used meanwhile."""

    def __init__(self):
        self.start_mib = self.peak_mib = self.others = float("nan")
        self.resettable = True

    def __enter__(self) -> Probe:
        # Hand freed heap pages back to the OS first: glibc keeps them mapped otherwise, and the start RSS (the
        # baseline of the "+ over start" column) would then include the previous phase's garbage.
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            # "5" resets the peak RSS to the current RSS (Linux >= 4.0); getrusage cannot be reset otherwise.
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False
        rss = _status_kib("VmRSS")
        self.start_mib = rss / 1024 if rss is not None else float("nan")
        self._busy, self._own, self._wall = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            others = (busy - self._busy) - (own - self._own)
            self.others = max(0.0, others) / (wall * (os.cpu_count() or 1))
        hwm = _status_kib("VmHWM") if self.resettable else None
        if hwm is None:  # no /proc, or no reset: the process-wide peak so far (Linux reports ru_maxrss in KiB)
            self.resettable = False
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = hwm / 1024

    def cells(self) -> str:
        flag = "" if self.resettable else " (cumulative)"
        return f"{self.peak_mib:9.0f} {self.peak_mib - self.start_mib:+9.0f} {self.others:9.0%}{flag}"


@dataclass
class Row:
    """One line of the report."""

    name: str
    structure: str
    seconds: float
    ratio: str
    probe: Probe  # memory and contention of the phase
    rate: float | None = None  # responses per second, for scoring rows
    kfac: str = "-"  # the fit's kfac_approx (kron rows)


def timed(fn: Callable[[], Any]) -> tuple[float, Any, Probe]:
    """Wall-clock seconds, result and probe (memory, contention) of one call."""
    with Probe() as probe:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, result, probe


def interleaved(phases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any, Probe]]:
    """Run every phase once per round, `repeats` rounds; per phase the median run's (seconds, result, probe), and the
    result of the last run (the state the following phases start from)."""
    runs: dict[str, list[tuple[float, Any, Probe]]] = {name: [] for name in phases}
    for _ in range(repeats):
        for name, fn in phases.items():
            runs[name].append(timed(fn))
    medians = {}
    for name, phase_runs in runs.items():
        median = sorted(phase_runs, key=lambda run: run[0])[(len(phase_runs) - 1) // 2]
        medians[name] = (median[0], phase_runs[-1][1], median[2])
    return medians


# ---------------------------------------------------------------------------------------------------------------------
# Model and data.


def build_reward_model(seed: int, pad_token_id: int) -> GPTNeoXForSequenceClassification:
    """A Pythia-70M-shaped sequence-classification model with random weights (fixed seed), float32, eager attention."""
    config = GPTNeoXConfig(**PYTHIA_70M, num_labels=1, attn_implementation="eager", pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    return GPTNeoXForSequenceClassification(config).float()


def random_responses(rng: random.Random, count: int, seq_len: int, low: int, high: int) -> list[list[int]]:
    """Random token ids in [low, high), lengths in [7/8 seq_len, seq_len] so that padding is exercised too."""
    return [
        [rng.randrange(low, high) for _ in range(rng.randint(seq_len - seq_len // 8, seq_len))] for _ in range(count)
    ]


# ---------------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--num-pairs", type=int, default=64, help="preference pairs for MAP training and the fit (batches of 8)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="responses scored per predict_ids batch")
    parser.add_argument("--seq-len", type=int, default=128, help="maximum tokens per response (lengths 7/8..1 of it)")
    parser.add_argument("--stock-batch", type=int, default=8, help="responses for laplace-torch's stock predictive")
    parser.add_argument("--structures", nargs="+", default=["kron", "diag"], choices=["kron", "diag"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each phase reports its median")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.num_pairs, args.batch_size, args.stock_batch, args.repeats) < 1 or args.seq_len < 8:
        parser.error("--num-pairs, --batch-size, --stock-batch, --repeats must be >= 1 and --seq-len >= 8")
    return args


def bench_training_and_fit(
    trainer: BayesianRewardTrainer, pairs: Dataset, structures: list[str], repeats: int
) -> tuple[list[Row], dict[str, BayesianRewardModel], dict[str, float], str]:
    """MAP epochs and posterior fits at the MAP weights, in interleaved rounds; then laplace-torch's kron fit once.

    Returns the rows, the posteriors, the fit / epoch ratio per structure and how far laplace-torch's kron fit is
    from ours.
    """
    # Warm-up: one optimizer step through the same code path (Trainer setup, first kernels).
    max_steps, trainer.args.max_steps = trainer.args.max_steps, 1
    trainer.train()
    trainer.args.max_steps = max_steps

    default_kfac = trainer.args.kfac_approx

    def fit(structure: str, laplace_backend: bool = False, kfac_approx: str = default_kfac) -> BayesianRewardModel:
        # laplace-torch's K-FAC (the reference path) has no "reduce_masked", the config's default: "reduce" there.
        trainer.args.hessian_structure, trainer.args.laplace_backend = structure, laplace_backend
        trainer.args.kfac_approx = kfac_approx
        try:
            return trainer.fit_posterior()
        finally:
            trainer.args.kfac_approx = default_kfac

    def kfac(structure: str, kfac_approx: str = default_kfac) -> str:
        return kfac_approx if structure == "kron" else "-"

    # One pair is enough to warm the fit's code path (lazy imports, first kernels).
    warm_pairs = pairs.select(range(1))
    for structure in structures:
        trainer.args.hessian_structure = structure
        trainer.fit_posterior(warm_pairs)
    phases: dict[str, Callable[[], Any]] = {"epoch": trainer.train}
    phases.update({structure: (lambda s=structure: fit(s)) for structure in structures})
    results = interleaved(phases, repeats)
    map_seconds, _, probe = results["epoch"]
    rows = [Row("MAP training epoch", "-", map_seconds, "1.00 (reference)", probe)]
    posteriors, ratios = {}, {}
    for structure in structures:
        seconds, posteriors[structure], probe = results[structure]
        ratios[structure] = seconds / map_seconds
        ratio = f"{ratios[structure]:.2f} x MAP epoch"
        rows.append(Row("posterior fit", structure, seconds, ratio, probe, kfac=kfac(structure)))

    agreement = ""
    if "kron" in structures:
        # The reference path once, beside ours with the same kfac_approx ("reduce"), both at the last MAP weights.
        ours_seconds, ours, probe = timed(lambda: fit("kron", kfac_approx="reduce"))
        ratio = f"{ours_seconds / map_seconds:.2f} x MAP epoch"
        rows.append(Row("posterior fit", "kron", ours_seconds, ratio, probe, kfac="reduce"))
        seconds, reference, probe = timed(lambda: fit("kron", laplace_backend=True, kfac_approx="reduce"))
        ratio = f"{seconds / map_seconds:.2f} x MAP epoch"
        rows.append(Row("laplace-torch fit (reference)", "kron", seconds, ratio, probe, kfac="reduce"))
        ours_facs, ref_facs = ours.laplace.H_facs.kfacs, reference.laplace.H_facs.kfacs
        worst = max(
            float((f - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for block, ref_block in zip(ours_facs, ref_facs, strict=True)
            for f, r in zip(block, ref_block, strict=True)
        )
        agreement = (
            f"kron fit (kfac_approx='reduce') vs laplace-torch's fit (same): time {ours_seconds / seconds:.2f} of it; "
            f"max relative difference of the Kronecker factors {worst:.1e}"
        )
    return rows, posteriors, ratios, agreement


def bench_scoring(
    posteriors: dict[str, BayesianRewardModel], responses: list[list[int]], batch_size: int, repeats: int
) -> tuple[list[Row], dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, float], float]:
    """MAP scoring and (mean, var) and relative scoring per structure, in interleaved rounds; returns the rows, per
    structure mean, var and responses per second, the relative rate per structure, and the MAP rate."""
    first = next(iter(posteriors.values()))
    phases: dict[str, Callable[[], Any]] = {
        "map": lambda: first.predict_ids(responses, batch_size=batch_size, return_var=False)
    }
    # Relative variance (`uncertainty="relative"`): groups of 8 responses, as GRPO's num_generations would pass them.
    keys = [i // 8 for i in range(len(responses))]

    def relative(posterior: BayesianRewardModel):
        with scoring_mode(posterior.model):
            return relative_predict_ids(posterior, responses, keys, batch_size=batch_size)

    for structure, posterior in posteriors.items():
        posterior.predict_ids(responses[:2], batch_size=batch_size, return_var=True)  # warm-up
        phases[structure] = lambda p=posterior: p.predict_ids(responses, batch_size=batch_size, return_var=True)
        phases[f"{structure} relative"] = lambda p=posterior: relative(p)
    first.predict_ids(responses[:2], batch_size=batch_size, return_var=False)  # warm-up
    results = interleaved(phases, repeats)
    map_seconds, _, probe = results["map"]
    map_rate = len(responses) / map_seconds
    rows = [Row("MAP score (return_var=False)", "-", map_seconds, "1.00 (reference)", probe, map_rate)]
    ours, relative_rates = {}, {}
    for structure, posterior in posteriors.items():
        seconds, (mean, var), probe = results[structure]
        rate = len(responses) / seconds
        ours[structure] = (mean, var, rate)
        kfac = posterior.metadata["kfac_approx"] if structure == "kron" else "-"
        ratio = f"{rate / map_rate:.3f} x MAP"
        rows.append(Row("(mean, var) predict_ids", structure, seconds, ratio, probe, rate, kfac))
        seconds_rel, _, probe = results[f"{structure} relative"]
        relative_rates[structure] = len(responses) / seconds_rel
        ratio = f"{relative_rates[structure] / map_rate:.3f} x MAP, {seconds_rel / seconds:.2f} x var time"
        rows.append(Row("(mean, var, rel) relative", structure, seconds_rel, ratio, probe, relative_rates[structure],
                        kfac))  # fmt: skip
    return rows, ours, relative_rates, map_rate


def bench_stock(
    posteriors: dict[str, BayesianRewardModel],
    responses: list[list[int]],
    pad_token_id: int,
    ours: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[list[Row], list[str], dict[str, float]]:
    """laplace-torch's own GLM predictive on `responses`, padded to one (B, L) batch as laplace-torch expects.

    It differentiates the whole batch once per output (torch.func.jacrev), so its time and memory grow with the square
    of the batch: hence a smaller batch than ours. Also returns how far its (mean, var) is from ours.
    """
    input_ids, attention_mask = pad_token_ids(responses, pad_token_id)
    x = {"input_ids": input_ids, "attention_mask": attention_mask}
    rows, agreement, speedups = [], [], {}
    n = len(responses)
    for structure, posterior in posteriors.items():
        la = posterior.laplace
        posterior.model.eval()  # as predict_ids does, so that both evaluate the same function
        with without_input_require_grads_hooks(posterior.model):
            la({k: v[:1] for k, v in x.items()}, pred_type="glm")  # warm-up
            seconds, (f_mu, f_var), probe = timed(lambda la=la: la(x, pred_type="glm"))
        rate = n / seconds
        mean, var, our_rate = ours[structure]
        speedups[structure] = our_rate / rate
        kfac = posterior.metadata["kfac_approx"] if structure == "kron" else "-"
        ratio = f"ours/stock {our_rate / rate:.1f}"
        rows.append(Row(f"stock la(x, 'glm') at B={n}", structure, seconds, ratio, probe, rate, kfac))
        mean_diff = float((f_mu.reshape(-1) - mean[:n]).abs().max())
        var_diff = float(((f_var.reshape(-1) - var[:n]).abs() / f_var.reshape(-1).abs().clamp_min(1e-30)).max())
        agreement.append(f"{structure}: max |mean diff| {mean_diff:.1e}, max relative var diff {var_diff:.1e}")
    return rows, agreement, speedups


def bench_tokenization(
    tokenizer: transformers.PreTrainedTokenizerBase, responses: list[list[int]], seed: int, repeats: int
) -> list[Row]:
    """`tokenize_response` per response against one `tokenize_responses` call, in interleaved rounds, on texts as long
    as `responses` (8 prompt words, the rest completion words; EOS appended): the CPU work `predict` does before its
    forward passes. At least 15 rounds: a round takes milliseconds, and the batched call's threads are easily delayed
    (e.g. by torch's OpenMP threads still spinning after the previous phase). Raises if the two give different ids."""
    rng = random.Random(seed)  # its own stream: the random token ids of the other phases stay as they were
    words = [w for w in tokenizer.get_vocab() if w not in tokenizer.all_special_tokens]
    texts = [" ".join(rng.choices(words, k=len(ids) - 1)) for ids in responses]  # - 1: the EOS
    prompts = [" ".join(text.split(" ")[:8]) + " " for text in texts]
    completions = [" ".join(text.split(" ")[8:]) for text in texts]
    phases: dict[str, Callable[[], Any]] = {
        "per item": lambda: [tokenize_response(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)],
        "batched": lambda: tokenize_responses(tokenizer, prompts, completions),
    }
    for fn in phases.values():
        fn()  # warm-up
    results = interleaved(phases, max(repeats, 15))
    (per_item, ids, probe), (batched, batched_ids, batched_probe) = results["per item"], results["batched"]
    if batched_ids != ids:
        raise RuntimeError("tokenize_responses gave other ids than tokenize_response per response.")
    n = len(responses)
    ratio = f"{per_item / batched:.2f} x faster, same ids"
    return [
        Row("tokenize_response per item", "-", per_item, "1.00 (reference)", probe, n / per_item),
        Row("tokenize_responses (1 call)", "-", batched, ratio, batched_probe, n / batched),
    ]


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The timed code paths emit deprecation and "max_steps overrides num_train_epochs" chatter; keep the table readable.
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # TRL's max_length filter over the pre-tokenized pairs
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    wall_start, load_start = time.perf_counter(), os.getloadavg()[0]
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | transformers {transformers.__version__} | "
        f"trl_bayes {trl_bayes.__version__} | python {platform.python_version()} | {platform.machine()} CPU, float32"
    )
    print(
        f"settings: num_pairs={args.num_pairs} batch_size={args.batch_size} seq_len~{args.seq_len} "
        f"stock_batch={args.stock_batch} structures={args.structures} repeats={args.repeats} seed={args.seed} | "
        "8 pairs per train and "
        "posterior batch, no activation checkpointing, LoRA r=8 alpha=16 on query_key_value, "
        "prior precision by marglik (100 Adam steps, included in the fit time)"
    )

    tokenizer = build_tokenizer()
    # The tiny tokenizer's ids (pad, eos, unk, words) are all < 50304; random tokens start above them so that no
    # response contains the pad id, which the sequence-classification head uses to find the last token.
    low, high = len(tokenizer), PYTHIA_70M["vocab_size"]
    rng = random.Random(args.seed)
    chosen = random_responses(rng, args.num_pairs, args.seq_len, low, high)
    rejected = random_responses(rng, args.num_pairs, args.seq_len, low, high)
    pairs = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    responses = random_responses(rng, args.batch_size, args.seq_len, low, high)

    model = build_reward_model(args.seed, tokenizer.pad_token_id)
    peft_config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query_key_value"])
    with tempfile.TemporaryDirectory() as tmpdir:
        config = BayesianRewardConfig(
            output_dir=tmpdir,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            per_device_train_batch_size=8,
            posterior_batch_size=8,
            fit_posterior_after_train=False,
            disable_tqdm=True,
            logging_steps=1000,
            num_train_epochs=1,
            activation_checkpointing=False,  # RewardConfig turns it on: recomputation would flatter the fit ratio
            seed=args.seed,
        )
        trainer = BayesianRewardTrainer(
            model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=peft_config
        )
        # With tqdm off, Trainer prints every log dict (final train metrics, laplace/* after each fit) to stdout.
        trainer.remove_callback(PrinterCallback)
        fit_rows, posteriors, fit_ratios, fit_agreement = bench_training_and_fit(
            trainer, pairs, args.structures, args.repeats
        )
        score_rows, ours, relative_rates, map_rate = bench_scoring(
            posteriors, responses, args.batch_size, args.repeats
        )
        stock_rows, agreement, speedups = bench_stock(
            posteriors, responses[: args.stock_batch], tokenizer.pad_token_id, ours
        )
        tokenize_rows = bench_tokenization(tokenizer, responses, args.seed + 1, args.repeats)

    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_laplace = {s: p.n_params for s, p in posteriors.items()}
    priors = {s: float(f"{p.prior_precision:.3g}") for s, p in posteriors.items()}
    print(
        f"model: {n_params / 1e6:.1f}M parameters; Laplace weights (LoRA + score head): {n_laplace}; fitted prior "
        f"precision: {priors}"
    )
    mem_header = "peak RSS MiB  + over start  others' CPU"
    head = f"{'struct':<6} {'kfac_approx':<13} {'time s':>9}"
    print(f"\n{f'fit ({args.num_pairs} pairs)':<30} {head}  {'ratio':<22} {mem_header}")
    for row in fit_rows:
        cells = f"{row.structure:<6} {row.kfac:<13} {row.seconds:9.2f}"
        print(f"{row.name:<30} {cells}  {row.ratio:<22} {row.probe.cells()}")
    print(f"\n{'scoring':<30} {head} {'resp/s':>8}  {'ratio':<34} {mem_header}")
    for row in score_rows + stock_rows + tokenize_rows:
        cells = f"{row.structure:<6} {row.kfac:<13} {row.seconds:9.2f} {row.rate:8.2f}"
        print(f"{row.name:<30} {cells}  {row.ratio:<34} {row.probe.cells()}")
    print(
        f"\nMAP and (mean, var) scoring of {args.batch_size} responses in batches of {args.batch_size}; the stock "
        f"predictive on the first {args.stock_batch} of them in one batch (its cost per response grows with the "
        "batch, so a smaller batch flatters it; ours is one forward and one backward per batch)."
    )
    per_item, batched = (row.seconds for row in tokenize_rows)
    print(
        f"tokenization of the same {args.batch_size} responses as text (word-level tokenizer, fast={tokenizer.is_fast}"
        f"), as `predict` tokenizes them before scoring: per item {per_item * 1e3:.2f} ms, one batched call "
        f"{batched * 1e3:.2f} ms, {per_item / batched:.2f} x."
    )
    print("stock vs ours on the same responses: " + "; ".join(agreement))
    if fit_agreement:
        print(fit_agreement)

    # The targets, side by side.
    fit_peaks = {row.structure: row.probe.peak_mib for row in fit_rows[1 : 1 + len(args.structures)]}
    score_peaks = {row.structure: row.probe.peak_mib for row in score_rows if row.name.startswith("(mean, var)")}
    targets = [
        ("(mean, var) / MAP scoring throughput", ">= 0.45", {s: ours[s][2] / map_rate for s in ours}, 0.45, 1),
        ("relative (mean, var, rel) / MAP throughput", ">= 0.35", {s: r / map_rate for s, r in relative_rates.items()},
         0.35, 1),
        ("posterior fit / one MAP epoch", "<= 1.10", fit_ratios, 1.10, -1),
        ("(mean, var) / stock la(x, 'glm') (issue 6)", ">= 10", speedups, 10.0, 1),
    ]  # fmt: skip
    fit_kfac = fit_rows[1].kfac if args.structures[0] == "kron" else "reduce_masked"
    print(f"\n{'targets (issue 15), kron with ' + fit_kfac:<45} {'target':<8} "
          + " ".join(f"{s:<12}" for s in args.structures))  # fmt: skip
    for name, target, values, bound, sign in targets:
        cells = [
            f"{values[s]:6.2f} {'met' if sign * (values[s] - bound) >= 0 else 'MISSED':<5}" for s in args.structures
        ]
        print(f"{name:<45} {target:<8} " + " ".join(cells))
    print(
        f"{'peak RSS MiB, fit / (mean, var) scoring':<45} {'report':<8} "
        + " ".join(f"{f'{fit_peaks[s]:.0f} / {score_peaks[s]:.0f}':<12}" for s in args.structures)
    )
    probes = [row.probe for row in fit_rows + score_rows + stock_rows + tokenize_rows]
    how = (
        "VmHWM, reset per phase via /proc/self/clear_refs"
        if all(probe.resettable for probe in probes)
        else "getrusage ru_maxrss, cumulative: the reset was refused"
    )
    print(
        f"memory: RSS high-water mark of each phase ({how}); '+ over start' = peak minus the RSS when the phase "
        f"began; largest phase peak {max(probe.peak_mib for probe in probes):.0f} MiB"
    )
    # Other processes on the same cores inflate every time here: say whether that happened.
    print(
        f"others' CPU: share of the {os.cpu_count()} CPUs' capacity used by other processes (or taken by the "
        "hypervisor) during the phase, from /proc/stat; well above 0% means the time is inflated. "
        f"Total wall time {time.perf_counter() - wall_start:.0f} s; 1-min load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end."
    )


if __name__ == "__main__":
    main()
