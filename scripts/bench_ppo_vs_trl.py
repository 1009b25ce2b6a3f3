"""Per-update time of `trl_bayes.PPOTrainer` against TRL 1.12's `PPOTrainer` loop, side by side on one tiny setup.

The setup (both sides): a tiny GPT-NeoX policy on the offline world's tokenizer (`trl_bayes.experiments.world`), a
frozen reference copy, a tiny GPT-NeoX value model and a tiny sequence-classification reward model, 64 pre-tokenized
prompts; per update 16 completions x 16 new tokens, 2 PPO epochs x 2 minibatches of 8, on the CPU, one torch thread.
Both get TRL's config values verbatim (`per_device_train_batch_size=16`, `num_mini_batches=2`, `response_length`,
`stop_token="eos"`, `total_episodes`); ours adds only `max_grad_norm=0` (TRL 1.12 never clipped) so that both run the
same algorithm. Our reward is the same reward model behind a TRL reward function (`ModelReward` below).

The reference being measured is TRL 1.12's own code, not a copy: `trl/experimental/ppo/ppo_trainer.py` of the
trl 1.12.0 wheel (its `PPOTrainer.train`, lines 604-949), imported from the unpacked wheel against the installed trl
(its imports all still exist). Two changes, both to the loop's surroundings: its per-update `gc.collect()` calls
(lines 753 and 919) are no-ops, and `num_sample_generations=0` (no sample tables). Get the wheel with

    pip download trl==1.12.0 --no-deps -d /tmp/trl112 && unzip -q -o /tmp/trl112/trl-1.12.0-py3-none-any.whl -d /tmp/trl112/src

Each measurement is a fresh process (imports, memory and timing independent of the other side); the two alternate for
`--rounds` rounds. Per update: wall time and process CPU time between consecutive `on_step_end` callbacks (both
trainers call it once per update), the first `--warmup` updates dropped. Other processes' CPU share (from /proc/stat)
is reported because the machine may be shared: CPU time is the figure that load disturbs least.

    python scripts/bench_ppo_vs_trl.py                       # 3 rounds x 30 updates each side (~1 min)
    python scripts/bench_ppo_vs_trl.py --rounds 5 --updates 40 --trl112 /tmp/trl112/src
    python scripts/bench_ppo_vs_trl.py --policy_cache        # both sides sample with a KV cache (see `run_one`)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_trl112(root: Path):
    """TRL 1.12's `trl.experimental.ppo` package, imported from the unpacked wheel under `root`."""
    package = root / "trl" / "experimental" / "ppo"
    if not (package / "ppo_trainer.py").is_file():
        sys.exit(f"No TRL 1.12 source under {root}; see this script's docstring for the two commands that fetch it.")
    spec = importlib.util.spec_from_file_location(
        "trl.experimental.ppo", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl.experimental.ppo"] = module
    spec.loader.exec_module(module)
    trainer_module = sys.modules["trl.experimental.ppo.ppo_trainer"]
    trainer_module.gc = types.SimpleNamespace(collect=lambda *args: 0)  # the loop "without its gc calls"
    return module


def run_one(side: str, updates: int, trl_root: Path, policy_cache: bool = False) -> dict:
    """One side's run in this process: per-update times, memory before training, the scores it learned.

    `policy_cache`: the policy's config asks for a KV cache (`use_cache=True`, as Hub checkpoints such as Pythia's do).
    The tiny config sets `use_cache=False`, which TRL 1.12's loop follows (it samples without a cache) while ours always
    samples with one; with `policy_cache` both sides use the cache, so the ratio leaves that difference out."""
    start_import, rss_start = time.perf_counter(), rss_mib()
    import torch
    from datasets import Dataset
    from transformers import (
        GPTNeoXForCausalLM,
        GPTNeoXForSequenceClassification,
        GPTNeoXForTokenClassification,
        TrainerCallback,
    )

    from trl_bayes.experiments.world import build_tokenizer, tiny_gpt_neox_config, world_prompts

    if side == "trl":
        trl = load_trl112(trl_root)
        Config, Trainer = trl.PPOConfig, trl.PPOTrainer
    else:
        from trl_bayes import PPOConfig as Config
        from trl_bayes import PPOTrainer as Trainer
    import_seconds = time.perf_counter() - start_import

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"  # as TRL's PPO example loads its tokenizer

    def config(**kwargs):
        return tiny_gpt_neox_config(
            len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs
        )

    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(config())
    if policy_cache:
        policy.config.use_cache = policy.generation_config.use_cache = True
    reference = GPTNeoXForCausalLM(config())
    reference.load_state_dict(policy.state_dict())
    reward_model = GPTNeoXForSequenceClassification(config(num_labels=1)).eval()
    # TRL 1.12 reads a sequence classifier's `score` head at every token; ours takes a token classifier.
    value_class = GPTNeoXForSequenceClassification if side == "trl" else GPTNeoXForTokenClassification
    value_model = value_class(config(num_labels=1))
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in world_prompts()[:64]]})

    stamps: list[tuple[float, float]] = []
    scores: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])

    shared = dict(
        per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2,
        response_length=16, stop_token="eos", total_episodes=16 * updates, temperature=1.0, learning_rate=3e-4,
        num_sample_generations=0, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
        save_strategy="no", seed=0,
    )  # fmt: skip
    output_dir = tempfile.mkdtemp()
    if side == "trl":
        args = Config(output_dir, logging_steps=1, **shared)
        trainer = Trainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward_model,
            train_dataset=dataset, value_model=value_model, eval_dataset=dataset, callbacks=[Stamp()],
        )  # fmt: skip
    else:
        args = Config(output_dir, max_grad_norm=0.0, **shared)
        trainer = Trainer(
            policy, ModelReward(reward_model, tokenizer), args, dataset, tokenizer, ref_model=reference,
            value_model=value_model, callbacks=[Stamp()],
        )  # fmt: skip
    rss_before_training = rss_mib()
    busy0, total0 = cpu_jiffies()
    own0 = own_cpu_seconds()
    wall0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - wall0
    busy1, total1 = cpu_jiffies()
    hz, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    others = max(0.0, (busy1 - busy0) / hz - (own_cpu_seconds() - own0)) / (wall * cpus)
    return {
        "side": side,
        "wall": [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)],
        "cpu": [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)],
        "updates": len(stamps),
        "import_seconds": import_seconds,
        "rss_start_mib": rss_start,
        "rss_before_training_mib": rss_before_training,
        "modules": {name: name in sys.modules for name in ("laplace", "deepspeed")},
        "others_cpu_share": others,
        "machine_busy_share": (busy1 - busy0) / max(1, total1 - total0),
        "scores": scores,
    }


class ModelReward:
    """A sequence-classification reward model that shares the policy's tokenizer, as a TRL reward function: the score
    of prompt + completion tokens (right-padded; the model reads its last non-pad token), as TRL 1.12's `get_reward`
    scores its `reward_model`."""

    __name__ = "model_reward"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, {}

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        import torch

        pad = self.tokenizer.pad_token_id
        ids = [
            self.prompt_ids.setdefault(p, self.tokenizer(p)["input_ids"]) + list(c)
            for p, c in zip(prompts, completion_ids, strict=True)
        ]
        length = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in ids])
        with torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=(input_ids != pad).long()).logits[:, 0].tolist()


def summarize(runs: list[dict], warmup: int) -> None:
    def per_update(side: str, key: str) -> list[float]:
        return [t for r in runs if r["side"] == side for t in r[key][warmup:]]

    print(f"{'':24}{'TRL 1.12':>12}{'ours':>12}{'ours/TRL':>10}")
    for key, label in (("wall", "update, wall (ms)"), ("cpu", "update, CPU (ms)")):
        trl, ours = (1000 * statistics.median(per_update(s, key)) for s in ("trl", "ours"))
        print(f"median {label:17}{trl:12.1f}{ours:12.1f}{ours / trl:10.3f}")
    for key, label in (("rss_before_training_mib", "RSS before train (MiB)"), ("import_seconds", "imports (s)")):
        trl, ours = (statistics.median(r[key] for r in runs if r["side"] == s) for s in ("trl", "ours"))
        print(f"{label:24}{trl:12.1f}{ours:12.1f}{ours - trl:+10.1f}")
    for side in ("trl", "ours"):
        mine = [r for r in runs if r["side"] == side]
        shares = ", ".join(f"{r['others_cpu_share']:.0%}" for r in mine)
        first = statistics.mean(s for r in mine for s in r["scores"][:5])
        last = statistics.mean(s for r in mine for s in r["scores"][-5:])
        print(
            f"{side}: {len(mine)} runs x {mine[0]['updates']} updates; other processes' CPU share per run: {shares}; "
            f"score first 5 / last 5 updates {first:.3f} / {last:.3f}; modules loaded {mine[0]['modules']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl112", type=Path, default=Path("/tmp/trl112/src"), help="unpacked trl 1.12.0 wheel")
    parser.add_argument("--updates", type=int, default=30, help="PPO updates per run")
    parser.add_argument("--warmup", type=int, default=3, help="first updates left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    parser.add_argument(
        "--policy_cache",
        action="store_true",
        help="the policy's config asks for a KV cache (both sides sample with it)",
    )
    parser.add_argument("--run", choices=("trl", "ours"), help=argparse.SUPPRESS)  # one side, in a child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        args.out.write_text(json.dumps(run_one(args.run, args.updates, args.trl112, args.policy_cache)))
        return
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for side in ("trl", "ours") if round_ % 2 == 0 else ("ours", "trl"):
                out = Path(folder) / f"{side}{round_}.json"
                command = [sys.executable, __file__, "--run", side, "--updates", str(args.updates), "--out", str(out)]
                command += ["--policy_cache"] if args.policy_cache else []
                done = subprocess.run(
                    [*command, "--trl112", str(args.trl112)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                if done.returncode:
                    sys.exit(f"The {side} run failed:\n{done.stderr.decode()[-3000:]}")
                runs.append(json.loads(out.read_text()))
                print(f"round {round_} {side}: median update {1000 * statistics.median(runs[-1]['wall']):.1f} ms")
    summarize(runs, args.warmup)


if __name__ == "__main__":
    main()
