"""GPU check at the paper's scale: one run on one CUDA device that times every stage of the pipeline on models of the
paper's shapes (random weights, random token ids; nothing is downloaded) and prints, in one table:

1. the Laplace fit (float32, `BayesianRewardTrainer.fit_posterior`) against one MAP training epoch (bf16 mixed
   precision, `trainer.train()`) of the Pythia-70M-shaped reward model over the same preference pairs;
2. (mean, var) scoring (`predict`), relative scoring (`predict_relative`, groups of `--group_size`) and the
   hidden-state Mahalanobis typicality (`PenalizedReward(..., uncertainty="hidden_mahalanobis")`) against MAP scoring
   (`predict(..., return_var=False)`), in responses per second;
3. Best-of-N with a Pythia-1.4B-shaped policy (bf16) and the penalized Bayesian reward (`BestOfNSampler`), in samples
   per second (generation and scoring);
4. one PPO step (`PPOTrainer`, LoRA on the 1.4B policy, a Pythia-70M-shaped value model, bf16), split into its parts;
5. the peak GPU memory of each phase (`torch.cuda.max_memory_allocated`, reset before each).

The models are GPT-NeoX built from configs whose numbers are those of the Pythia model cards and `config.json` files
(https://huggingface.co/EleutherAI/pythia-70m, https://huggingface.co/EleutherAI/pythia-1.4b; Biderman et al. 2023,
arXiv 2304.01373): see `PYTHIA_70M` and `PYTHIA_1_4B`. The tokenizer is a word-level one with as many tokens as
Pythia's vocabulary, so that embeddings and heads have their real sizes.

Run on one H200 on 2026-11-28 with the defaults below (README, "GPU check", has the table); its `--tiny` mode, the
same code on CPU with tiny configs, is tested (tests/test_gpu_check.py).

    python scripts/gpu_check.py            # one CUDA device (cuda:0); a few minutes on an H100/H200
    python scripts/gpu_check.py --tiny     # the same code on CPU with tiny models, under a minute

Timed phases run `--repeats` times and report their fastest run (the first one on a GPU pays for kernel selection and
memory-pool growth); the MAP epoch is the last of `--map_epochs` epochs, for the same reason.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    PrinterCallback,
    TrainerCallback,
)

from trl_bayes import (
    BayesianRewardConfig,
    BayesianRewardTrainer,
    BestOfNSampler,
    PenalizedReward,
    PPOConfig,
    PPOTrainer,
)
from trl_bayes.experiments.world import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer
from trl_bayes.reward_model import quiet

# Pythia-70M (the paper's proxy reward model) and Pythia-1.4B (its policy), from their model cards / config.json.
# Both: rotary embeddings on 25% of each head, parallel residual, 2048 positions, vocabulary padded to 50304.
PYTHIA_70M = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048}
PYTHIA_1_4B = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192}
PYTHIA_VOCAB_SIZE = 50304
# --tiny: the same architecture, small enough for a CPU.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
TINY_VOCAB_SIZE = 512

GiB = 2**30
SCORING = ("MAP scoring", "(mean, var) scoring", "relative scoring", "hidden-Mahalanobis scoring")
PPO_PARTS = ("generation", "scoring", "reference", "optimization")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke run of the same code")
    parser.add_argument("--num_pairs", type=int, default=None, help="preference pairs (default 1024; tiny 16)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per response (default 256; tiny 12)")
    parser.add_argument("--batch_size", type=int, default=None, help="pairs per MAP step, responses per scoring batch")
    parser.add_argument("--posterior_batch_size", type=int, default=None, help="pairs per curvature batch")
    parser.add_argument("--num_responses", type=int, default=None, help="responses scored (default 1024; tiny 32)")
    parser.add_argument("--group_size", type=int, default=8, help="responses per prompt for relative scoring")
    parser.add_argument("--bon_prompts", type=int, default=None, help="Best-of-N prompts (default 8; tiny 2)")
    parser.add_argument("--bon_n", type=int, default=None, help="samples per prompt (default 16; tiny 4)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="generated tokens (default 64; tiny 4)")
    parser.add_argument("--ppo_batch_size", type=int, default=None, help="completions per PPO step (default 64)")
    parser.add_argument("--map_epochs", type=int, default=None, help="MAP epochs; the last one is timed (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each timed phase (default 2; tiny 1)")
    return parser


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Unset sizes take the GPU defaults, or the tiny ones with `--tiny`."""
    defaults = {
        "num_pairs": (1024, 16),
        "seq_len": (256, 12),
        "batch_size": (32, 8),
        "posterior_batch_size": (8, 4),
        "num_responses": (1024, 32),
        "bon_prompts": (8, 2),
        "bon_n": (16, 4),
        "max_new_tokens": (64, 4),
        "ppo_batch_size": (64, 4),
        "map_epochs": (2, 1),
        "repeats": (2, 1),
    }
    for name, (gpu, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    return args


def gpt_neox_config(shape: dict[str, int], vocab_size: int, tokenizer, **kwargs) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        **shape,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def random_texts(rng: random.Random, words: list[str], count: int, length: int) -> list[str]:
    """`count` texts of `length` random words: with a word-level tokenizer, `length` tokens each."""
    return [" ".join(rng.choices(words, k=length)) for _ in range(count)]


class Clock:
    """Times phases (CUDA synchronized) and records each phase's peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, dict[str, Any]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable[[], Any], repeats: int = 1) -> Any:
        """Run `fn` `repeats` times; keep its fastest time and the peak memory over all runs. Returns the last result."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        best, result = math.inf, None
        for _ in range(repeats):
            self._sync()
            start = time.perf_counter()
            result = fn()
            self._sync()
            best = min(best, time.perf_counter() - start)
        self.record(name, best)
        return result

    def record(self, name: str, seconds: float) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) / GiB if self.device.type == "cuda" else math.nan
        self.rows[name] = {"seconds": seconds, "peak_gib": peak}
        print(f"  done: {name} in {seconds:.3f} s", flush=True)  # progress, and what a crash later leaves behind


class EpochTimer(TrainerCallback):
    """Wall time of each training epoch (the first one on a GPU includes kernel selection)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.seconds = sync, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sync()
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.sync()
        self.seconds.append(time.perf_counter() - self.start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = fill_defaults(make_parser().parse_args(argv))
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this check needs one GPU. `--tiny` runs the same code on CPU.")
    device = torch.device("cpu" if args.tiny else "cuda:0")
    reward_shape, policy_shape = (TINY, TINY) if args.tiny else (PYTHIA_70M, PYTHIA_1_4B)
    vocab_size = TINY_VOCAB_SIZE if args.tiny else PYTHIA_VOCAB_SIZE
    words = [f"w{i}" for i in range(vocab_size - 3)]
    tokenizer = build_tokenizer([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *words])
    rng = random.Random(0)
    torch.manual_seed(0)
    clock = Clock(device)
    out = tempfile.TemporaryDirectory()
    prompt_len = max(1, args.seq_len // 4)
    completion_len = max(1, args.seq_len - prompt_len - 1)  # + EOS

    # 1. MAP training (bf16 mixed precision on a float32 model) and the Laplace fit (float32).
    pairs = Dataset.from_dict({
        "prompt": [p + " " for p in random_texts(rng, words, args.num_pairs, prompt_len)],
        "chosen": random_texts(rng, words, args.num_pairs, completion_len),
        "rejected": random_texts(rng, words, args.num_pairs, completion_len),
    })  # fmt: skip
    reward_config = gpt_neox_config(reward_shape, vocab_size, tokenizer, num_labels=1)
    reward_model = GPTNeoXForSequenceClassification(reward_config)
    timer = EpochTimer(clock._sync)
    with quiet():  # no progress bars of the dataset's tokenization
        trainer = BayesianRewardTrainer(
            reward_model,
            args=BayesianRewardConfig(
                out.name,
                use_cpu=args.tiny,
                bf16=not args.tiny,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                logging_steps=10**6,
                per_device_train_batch_size=args.batch_size,
                num_train_epochs=args.map_epochs,
                learning_rate=1e-4,
                max_length=args.seq_len + 1,
                posterior_batch_size=args.posterior_batch_size,
                fit_posterior_after_train=False,
                activation_checkpointing=False,
                seed=0,
            ),
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query_key_value"]),
            callbacks=[timer],
        )
    trainer.remove_callback(PrinterCallback)  # the timings below are the report
    clock.run("MAP training (all epochs)", trainer.train)
    clock.record("MAP epoch", timer.seconds[-1])
    posterior = clock.run("posterior fit", trainer.fit_posterior, args.repeats)

    # 2. Scoring: MAP, (mean, var), relative (groups of `group_size` responses per prompt).
    num_prompts = max(1, args.num_responses // args.group_size)
    prompts = [p + " " for p in random_texts(rng, words, num_prompts, prompt_len)]
    score_prompts = [p for p in prompts for _ in range(args.group_size)]
    completions = random_texts(rng, words, len(score_prompts), completion_len)
    bs = args.batch_size
    clock.run("MAP scoring", lambda: posterior.predict(score_prompts, completions, bs, return_var=False), args.repeats)
    clock.run("(mean, var) scoring", lambda: posterior.predict(score_prompts, completions, bs), args.repeats)
    clock.run("relative scoring", lambda: posterior.predict_relative(score_prompts, completions, bs), args.repeats)
    # The typicality baseline (issue 16): one forward for the hidden states, no backward.
    hidden = PenalizedReward(posterior, penalty="var", uncertainty="hidden_mahalanobis", batch_size=bs)
    clock.run("hidden-Mahalanobis scoring", lambda: hidden.predict(score_prompts, completions), args.repeats)

    # 3. Best-of-N: the policy (bf16 on a GPU) samples, the penalized reward (relative std) scores.
    policy_config = gpt_neox_config(policy_shape, vocab_size, tokenizer)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with device:
        policy = GPTNeoXForCausalLM(policy_config).to(dtype).eval()
    generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    reward = PenalizedReward(posterior, penalty="std", uncertainty="relative", batch_size=bs)
    sampler = BestOfNSampler(
        policy, tokenizer, reward, n=args.bon_n, generation_config=generation_config,
        prompt_batch_size=max(1, args.bon_prompts // 2), score_batch_size=bs * 2, progress_bar=False,
    )  # fmt: skip
    bon_prompts = prompts[: args.bon_prompts]
    clock.run("Best-of-N (generate + score)", functools.partial(sampler.sample, bon_prompts), args.repeats)
    del policy, sampler  # free the GPU for PPO's own copy of the policy
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. PPO: LoRA on the policy (its reference is the disabled adapter), a reward-model-shaped value model.
    with device:  # built in place: a 1.4B model's random initialization is slow on the CPU
        ppo_policy = GPTNeoXForCausalLM(policy_config)
        value_model = GPTNeoXForTokenClassification(gpt_neox_config(reward_shape, vocab_size, tokenizer, num_labels=1))
    micro = min(args.ppo_batch_size, 16)
    # One completion per prompt: the paper's marginal std penalty, k in reward units.
    ppo_reward = PenalizedReward(
        posterior, penalty="std", k=1.0, batch_size=bs, uncertainty="marginal", scale="absolute"
    )
    ppo = PPOTrainer(
        ppo_policy,
        ppo_reward,
        PPOConfig(
            out.name,
            use_cpu=args.tiny,
            bf16=not args.tiny,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=max(1, args.ppo_batch_size // micro),
            num_mini_batches=1,
            num_ppo_epochs=4,
            max_new_tokens=args.max_new_tokens,
            max_steps=1 + args.repeats,
            learning_rate=1e-5,
            temperature=1.0,
            seed=0,
        ),
        Dataset.from_dict({"prompt": prompts}),
        tokenizer,
        value_model=value_model,
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["query_key_value"]),
    )
    history = clock.run("PPO (all steps)", ppo.train)
    # The fastest step after the first (which pays for warm-up), by the parts PPOTrainer times.
    fastest = min(history[1:] or history, key=lambda h: sum(h[f"time/{part}"] for part in PPO_PARTS))
    parts = {part: fastest[f"time/{part}"] for part in PPO_PARTS}
    clock.record("PPO step", sum(parts.values()))
    out.cleanup()

    # 5. The table.
    rows, results = clock.rows, {}
    epoch, fit = rows["MAP epoch"]["seconds"], rows["posterior fit"]["seconds"]
    rate = {name: len(completions) / rows[name]["seconds"] for name in SCORING}
    bon_rate = len(bon_prompts) * args.bon_n / rows["Best-of-N (generate + score)"]["seconds"]
    notes = {
        "MAP epoch": f"{args.num_pairs / epoch:.1f} pairs/s",
        "posterior fit": f"fit / MAP epoch = {fit / epoch:.2f}",
        "MAP scoring": f"{rate['MAP scoring']:.1f} responses/s",
        "(mean, var) scoring": f"{rate['(mean, var) scoring']:.1f} responses/s = "
        f"{rate['(mean, var) scoring'] / rate['MAP scoring']:.2f} x MAP",
        "relative scoring": f"{rate['relative scoring']:.1f} responses/s = "
        f"{rate['relative scoring'] / rate['MAP scoring']:.2f} x MAP",
        "hidden-Mahalanobis scoring": f"{rate['hidden-Mahalanobis scoring']:.1f} responses/s = "
        f"{rate['hidden-Mahalanobis scoring'] / rate['MAP scoring']:.2f} x MAP",
        "Best-of-N (generate + score)": f"{bon_rate:.1f} samples/s",
        "PPO step": ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items()),
    }
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | reward model "
        f"{'tiny' if args.tiny else 'Pythia-70M'} shape, policy {'tiny' if args.tiny else 'Pythia-1.4B'} shape | "
        f"{args.num_pairs} pairs x {args.seq_len} tokens | MAP training and policies in "
        f"{'float32' if args.tiny else 'bf16'}, the fit and the scoring in float32 (kron) | torch {torch.__version__}"
    )
    print(f"{'phase':32s} {'seconds':>9s} {'peak GiB':>9s}  result")
    for name, row in rows.items():
        peak = "-" if math.isnan(row["peak_gib"]) else f"{row['peak_gib']:.2f}"
        print(f"{name:32s} {row['seconds']:9.3f} {peak:>9s}  {notes.get(name, '')}")
        results[name] = dict(row, note=notes.get(name, ""))
    results["ratios"] = {
        "fit_over_map_epoch": fit / epoch,
        "mean_var_over_map_scoring": rate["(mean, var) scoring"] / rate["MAP scoring"],
        "relative_over_map_scoring": rate["relative scoring"] / rate["MAP scoring"],
        "hidden_mahalanobis_over_map_scoring": rate["hidden-Mahalanobis scoring"] / rate["MAP scoring"],
        "best_of_n_samples_per_second": bon_rate,
        "ppo_step_seconds": sum(parts.values()),
    }
    return results


if __name__ == "__main__":
    main()
