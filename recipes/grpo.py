"""The drop-in for existing TRL setups: TRL's own `GRPOTrainer` (or `RLOOTrainer`) with
`reward_funcs=[PenalizedReward(...)]`, MAP vs Laplace-penalized proxies on the offline world.

The recipe, in stages (the world, pairs and proxies are the cached stages of recipes/bon.py and recipes/ppo.py):

1. world, 2. preference pairs, 3. proxies (see recipes/world_stages.py);
4. GRPO: for each method (MAP: `PenalizedReward(model, penalty="none")`; LA: `penalty` with strength `k`) and each
   seed, TRL's trainer from the SFT policy, the same seed and budget per method. A `TrainerCallback` samples the
   held-out prompts every `grpo_eval_steps` steps and scores them with the gold reward and the proxy, and measures the
   KL to the SFT policy on them;
5. results: `grpo_results.csv` (method, penalty, k, seed, step, kl, proxy_reward, gold_reward), `grpo_curves.png`,
   `summary.md`.

    accelerate launch recipes/grpo.py                                     # offline default (recipes/configs/grpo.yaml)
    accelerate launch recipes/grpo.py --trainer rloo                      # the same with TRL's RLOOTrainer
    accelerate launch recipes/grpo.py --cache_dir outputs/ppo/cache       # reuse the PPO / Best-of-N recipes' proxies

In your own TRL script the drop-in is two lines:

    reward = PenalizedReward(BayesianRewardModel.from_pretrained("my-laplace-rm"), penalty="std", k=1.0)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=prompts)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ppo import aggregate, fmt, method_label, plot_curves
from world_stages import (
    Stage,
    StageClock,
    WorldArguments,
    build_world,
    check_output_dir,
    load_gold_reward,
    make_accelerator,
    normalize_lora_targets,
    recipe_parser,
    run_script,
    sample_pairs,
    train_proxies,
    world_settings,
    write_csv,
    write_run_record,
)

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPE_DIR / "configs" / "grpo.yaml"
METHODS = ("MAP", "LA")
CSV_COLUMNS = ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]


@dataclass
class GRPOScriptArguments(WorldArguments):
    """Arguments of the GRPO recipe: the world's (`WorldArguments`), the ones below (`grpo_` where TRL's `GRPOConfig`
    would clash with the proxies' `BayesianRewardConfig`), the proxies' training and `trl.ModelConfig` arguments.

    Parameters:
        trainer: `grpo` (TRL's GRPOTrainer) or `rloo` (TRL's RLOOTrainer).
        methods, penalty, k: MAP and LA (`penalty` with strength `k`, fixed before the run).
        uncertainty: the variance LA penalizes: `marginal` (J Σ J^T) or `relative` (Var(r_i - mean_j r_j) over the
            `num_generations` completions of the prompt, which TRL scores together).
        grpo_steps, grpo_prompts_per_step, num_generations, grpo_learning_rate, beta (KL coefficient; 0 = none, the
        paper's setting), grpo_temperature, grpo_eval_steps, num_eval_generations, cache_dir, num_threads.
    """

    trainer: str = field(default="grpo", metadata={"help": "grpo or rloo."})
    methods: list[str] = field(default_factory=lambda: ["MAP", "LA"], metadata={"help": f"Subset of {METHODS}."})
    penalty: str = field(default="std", metadata={"help": "LA penalty: std or var."})
    k: float = field(default=1.0, metadata={"help": "Penalty strength, fixed before the run."})
    uncertainty: str = field(default="marginal", metadata={"help": "LA variance: marginal or relative."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cached stages (default <output_dir>/cache)."})
    grpo_steps: int = field(default=20, metadata={"help": "Optimizer steps per run."})
    grpo_prompts_per_step: int = field(default=8, metadata={"help": "Prompts per step (per process)."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group)."})
    grpo_learning_rate: float = field(default=5e-5, metadata={"help": "Policy learning rate."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (0 = no KL penalty, no reference model)."})
    grpo_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    grpo_eval_steps: int = field(default=5, metadata={"help": "Gold evaluation every N steps."})
    num_eval_generations: int = field(default=2, metadata={"help": "Completions per held-out prompt at evaluation."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process (None = default)."})
    dry_run: bool = field(default=False, metadata={"help": "Check the config, print the plan, and stop."})

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: unknown {unknown}; choose from {list(METHODS)}.")
        if self.trainer not in ("grpo", "rloo"):
            raise ValueError(f"--trainer {self.trainer!r}: choose 'grpo' or 'rloo'.")
        if self.penalty not in ("std", "var") or self.k < 0:
            raise ValueError(f"--penalty {self.penalty!r} / --k {self.k}: penalty 'std' or 'var', k >= 0.")
        if self.uncertainty not in ("marginal", "relative"):
            raise ValueError(f"--uncertainty {self.uncertainty!r}: choose 'marginal' or 'relative'.")
        if self.num_generations < 2:
            raise ValueError(f"--num_generations {self.num_generations}: a group needs >= 2 completions.")
        if self.grpo_steps < 1 or self.grpo_eval_steps < 1:
            raise ValueError("--grpo_steps and --grpo_eval_steps must be >= 1.")


class GoldEvaluation:
    """Samples the held-out prompts under fixed seeds and scores them: gold reward, the proxy's MAP reward, and the
    KL to the SFT policy (sum over the completion of log pi - log pi_SFT). A `TrainerCallback` calls it.

    The held-out responses are cut into fixed chunks of `CHUNK`, each sampled under its own seed (from 1234 and the
    chunk's index) and dealt to the processes, and the per-response results are gathered: the same numbers on 1 or N
    processes, and the same draw at every evaluation (differences reflect the policy)."""

    CHUNK = 16

    def __init__(self, args, policy_path, prompts, gold, proxy, state):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_bayes.distributed import whole_weights

        self.tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
        with whole_weights():  # each process evaluates its own chunks
            reference = AutoModelForCausalLM.from_pretrained(policy_path)
        self.reference = reference.to(state.device).eval().requires_grad_(False)
        self.prompts = [p for p in prompts for _ in range(args.num_eval_generations)]
        self.gold, self.proxy, self.args, self.state, self.torch = gold, proxy, args, state, torch

    def __call__(self, policy) -> dict[str, float]:
        """`policy`: the plain model, its weights whole (under ZeRO-3: inside `unwrap_model_for_generation`)."""
        from accelerate.utils import gather_object

        chunks = list(range(0, len(self.prompts), self.CHUNK))
        with self.state.split_between_processes(list(range(len(chunks)))) as local:
            records = [r for c in local for r in self.evaluate_chunk(policy, c, chunks[c])]
        if self.state.num_processes > 1:
            records = gather_object(records)
        kl, gold, proxy = (sum(r[j] for r in records) / len(records) for j in range(3))
        return {"kl": kl, "gold_reward": gold, "proxy_reward": proxy}

    def evaluate_chunk(self, policy, chunk: int, start: int) -> list[tuple[float, float, float]]:
        """(KL, gold, proxy MAP reward) of each response of one chunk."""
        torch = self.torch
        from trl_bayes.best_of_n import chunk_seed
        from trl_bayes.ppo import completion_mask, logprobs_from_logits
        from trl_bayes.reward import eval_mode, pad_token_ids

        prompts = self.prompts[start : start + self.CHUNK]
        device = next(policy.parameters()).device
        input_ids, prompt_mask = pad_token_ids(
            self.tokenizer(prompts)["input_ids"], self.tokenizer.pad_token_id, side="left"
        )
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(policy):
            torch.manual_seed(chunk_seed(1234, chunk))
            out = policy.generate(input_ids=input_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=self.args.grpo_temperature, max_new_tokens=self.args.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                  synced_gpus=False)  # fmt: skip  # whole weights, own chunks: see BestOfNSampler
            completions = out[:, input_ids.shape[1] :]
            mask, _ = completion_mask(completions, [self.tokenizer.eos_token_id])
            completions = torch.where(mask.bool(), completions, self.tokenizer.pad_token_id)
            sequences, attention = torch.cat([input_ids, completions], 1), torch.cat([prompt_mask, mask.long()], 1)
            position_ids = (attention.cumsum(1) - 1).clamp(min=0)
            logprobs = []
            for model in (policy, self.reference):
                logits = model(input_ids=sequences, attention_mask=attention, position_ids=position_ids).logits
                logits = logits[:, input_ids.shape[1] - 1 : -1].float() / self.args.grpo_temperature
                logprobs.append(logprobs_from_logits(logits, completions))
        kl = ((logprobs[0] - logprobs[1]) * mask).sum(1).tolist()
        texts = self.tokenizer.batch_decode(
            [row[: int(m.sum())] for row, m in zip(completions.tolist(), mask, strict=True)], skip_special_tokens=True
        )
        gold = self.gold(prompts=prompts, completions=texts)
        # The MAP reward, unpenalized (no variance needed: a relative reward would also need whole groups here).
        proxy = torch.stack([m.predict(prompts, texts, 64, return_var=False)[0] for m in self.proxy.models]).mean(0)
        return list(zip(kl, gold, proxy.tolist(), strict=True))


def run_grpo(args, training_args, method, seed, proxy_dir, policy_path, prompts, gold, cache, state):
    """One GRPO (or RLOO) run (cached): its evaluation rows and per-step timings."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trl_bayes import BayesianRewardModel, PenalizedReward
    from trl_bayes.distributed import unwrapped_whole

    method_key = [method, args.penalty, args.k] + (
        ["relative"] if method != "MAP" and args.uncertainty == "relative" else []
    )
    key = {"world": world_settings(args), "method": method_key, "seed": seed,
           "grpo": {k: v for k, v in asdict(args).items() if k.startswith(("grpo_", "num_gen", "beta", "trainer"))},
           "proxy": json.loads((proxy_dir / "done.json").read_text()), "max_new_tokens": args.max_new_tokens}  # fmt: skip
    stage = Stage(cache / args.trainer, f"{method}-seed{seed}", key)
    if not stage.done:
        model = BayesianRewardModel.from_pretrained(proxy_dir, device=state.device)
        penalty = "none" if method == "MAP" else args.penalty
        uncertainty = "marginal" if method == "MAP" else args.uncertainty
        reward = PenalizedReward(model, penalty=penalty, k=args.k, batch_size=64, uncertainty=uncertainty)
        evaluation = GoldEvaluation(args, policy_path, prompts[1], gold, reward, state)
        records: list[dict[str, Any]] = []
        times: list[float] = []

        def evaluate() -> dict[str, float]:
            # The policy with whole weights: under ZeRO-3 gathered (and DeepSpeed's hooks off) for the evaluation, so
            # that each process can run its own chunks; elsewhere just unwrapped.
            with unwrapped_whole(trainer.accelerator, trainer.model_wrapped) as policy:
                return evaluation(policy)

        class GoldCallback(TrainerCallback):
            def on_train_begin(self, train_args, trainer_state, control, **kwargs):
                records.append({"step": 0, **evaluate()})
                self.clock = time.perf_counter()

            def on_step_end(self, train_args, trainer_state, control, **kwargs):
                times.append(time.perf_counter() - self.clock)
                step = trainer_state.global_step
                if step % args.grpo_eval_steps == 0 or step == trainer_state.max_steps:
                    records.append({"step": step, **evaluate()})
                self.clock = time.perf_counter()

        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if args.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
        config = config_cls(
            output_dir=str(stage.path / "run"), use_cpu=training_args.use_cpu, ddp_backend=training_args.ddp_backend,
            bf16=False, report_to="none",
            seed=training_args.seed + seed, max_steps=args.grpo_steps, logging_steps=1, save_strategy="no",
            per_device_train_batch_size=args.grpo_prompts_per_step * args.num_generations,
            num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
            learning_rate=args.grpo_learning_rate, lr_scheduler_type="constant", beta=args.beta,
            temperature=args.grpo_temperature, disable_tqdm=True, gradient_checkpointing=False,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
        trainer = trainer_cls(
            model=policy_path, reward_funcs=[reward], args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompts[0]}), callbacks=[GoldCallback()],
        )  # fmt: skip
        trainer.train()
        if state.is_main_process:
            stage.start()
            (stage.path / "records.json").write_text(json.dumps({"records": records, "times": times}, indent=1))
            stage.finish()
        state.wait_for_everyone()
    return json.loads((stage.path / "records.json").read_text())


def write_summary(path: Path, args, table, seconds) -> None:
    lines = [
        f"# {args.trainer.upper()} (TRL's trainer) with Bayesian reward models: the `PenalizedReward` drop-in",
        "",
        "- policy: offline SFT policy (tiny GPT-NeoX), full fine-tuning; gold: the offline world's known function",
        f"- proxies: member 0 of each seed (LoRA + Laplace), {args.num_train_pairs} pairs, "
        f"{args.label_noise:.0%} labels flipped",
        f"- {args.trainer.upper()}: {args.grpo_steps} steps x {args.grpo_prompts_per_step} prompts x "
        f"{args.num_generations} completions, lr {args.grpo_learning_rate:g}, beta {args.beta:g}; penalty {args.penalty}, "
        f"k = {args.k:g} (fixed before the run)",
        f"- gold on {args.num_eval_prompts} held-out prompts x {args.num_eval_generations} every {args.grpo_eval_steps} "
        "steps; proxy = the proxy's MAP reward (unpenalized)",
        "",
        f"## Gold reward (mean ± std over seeds {args.seeds})",
        "",
        "| method | gold at step 0 | final gold | best gold | best step (per seed) | final KL | final proxy (MAP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(f"| {t['label']} | {fmt(t['gold_first'])} | {fmt(t['gold_last'])} | {fmt(t['gold_best'])} | "
                     f"{t['best_step']} | {fmt(t['kl_last'])} | {fmt(t['proxy_last'])} |")  # fmt: skip
    lines += ["", "## Time (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value:.2f} |" for stage, value in seconds.items()]
    lines += ["", f"Files: `{args.trainer}_results.csv`, `{args.trainer}_curves.png`."]
    path.write_text("\n".join(lines) + "\n")


def main(args: GRPOScriptArguments, training_args, model_args) -> None:
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    output_dir = check_output_dir(training_args.output_dir)
    if args.dry_run:
        print(f"{args.trainer.upper()} plan: methods {args.methods}, seeds {args.seeds}, {args.grpo_steps} steps")
        return
    if not args.offline:
        raise ValueError("recipes/grpo.py runs on the offline world only; use recipes/ppo.py for a Hub policy.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)  # tiny models on a shared CPU: avoid oversubscription
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    clock = StageClock()

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "cache"
    gold = load_gold_reward(args, accelerator.device)
    train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
    clock.lap("world + SFT policy")
    train_pairs, _ = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    members = train_proxies(replace(args, ensemble_size=1), training_args, model_args, train_pairs, policy_path,
                            cache, state)  # fmt: skip
    clock.lap("proxies (MAP + Laplace fit)")
    results = {}
    for method in args.methods:
        for seed in args.seeds:
            state.print(f"[{args.trainer}] {method_label(method, args)}, seed {seed}")
            results[method, seed] = run_grpo(args, training_args, method, seed, members[seed, 0], policy_path,
                                             (train_prompts, eval_prompts), gold, cache, state)  # fmt: skip
            clock.lap(f"{args.trainer.upper()} {method_label(method, args)}")
    if state.is_main_process:
        rows = [
            {"method": m, "penalty": "none" if m == "MAP" else args.penalty, "k": 0.0 if m == "MAP" else args.k,
             "seed": s, **r}
            for (m, s), result in results.items() for r in result["records"]
        ]  # fmt: skip
        rows = [{c: r[c] for c in CSV_COLUMNS} for r in rows]
        write_csv(output_dir / f"{args.trainer}_results.csv", rows, CSV_COLUMNS)
        plot_curves(output_dir / f"{args.trainer}_curves.png", rows, args)
        table = aggregate(rows, args)
        clock.lap("results")
        seconds = clock.finish()
        for method in args.methods:
            step = [t for s in args.seeds for t in results[method, s]["times"]]
            seconds[f"mean step (generation + scoring + optimization), {method_label(method, args)}"] = sum(
                step
            ) / len(step)
        write_summary(output_dir / "summary.md", args, table, seconds)
        write_run_record(output_dir, args)
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(GRPOScriptArguments, "outputs/grpo")


if __name__ == "__main__":
    run_script(make_parser, main, DEFAULT_CONFIG)
