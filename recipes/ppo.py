"""RLHF with Bayesian reward models: PPO against a MAP proxy vs a Laplace-penalized one (Yang et al. 2024, Sec. 5.2).

The recipe, in stages (each cached under `<cache_dir>`, by default `<output_dir>/cache/`; the world, pairs and proxies
are the very stages of recipes/bon.py, so pointing `--cache_dir` at a Best-of-N run's cache reuses its proxies):

1. world: instructions, a tokenizer, and the SFT policy (offline default: `trl_bayes.synthetic`, trained here);
2. preference pairs: two SFT samples per training instruction, labelled by the gold reward (with `label_noise`);
3. proxies: per seed, LoRA reward models (MAP) with their Laplace posteriors; member 0 is the seed's MAP / LA model;
4. PPO: for each method (MAP = the proxy's MAP reward; LA = its `penalty`-penalized Laplace reward with strength `k`;
   LA-Ens = the penalized mean of the seed's `ensemble_size` Laplace members) and each seed, `trl_bayes.PPOTrainer`
   from the SFT policy, same PPO seed and budget for every method; the gold reward on the held-out prompts every
   `ppo_eval_steps`. Each run checkpoints, so a killed run resumes;
5. results: `ppo_results.csv` (method, penalty, k, seed, step, kl, proxy_reward, gold_reward), `ppo_curves.png`
   (proxy and gold vs step and vs KL) and `summary.md` (final and best gold per method, time per stage and per step).

    accelerate launch recipes/ppo.py                                      # offline default (recipes/configs/ppo.yaml)
    accelerate launch recipes/ppo.py --seeds 0 1 2 3 4 --output_dir outputs/ppo5
    accelerate launch recipes/ppo.py --cache_dir outputs/bon/cache         # reuse the Best-of-N recipe's proxies
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --use_cpu true        # two CPU processes
    accelerate launch recipes/ppo.py --config recipes/configs/ppo_pythia_alpacafarm.yaml  # paper scale, GPUs + Hub
    python recipes/ppo.py --config recipes/configs/ppo_pythia_alpacafarm.yaml --dry_run true  # print the plan only

`k` is fixed in the config before any result is seen. The proxy reward in the results is the proxy's MAP reward (the
unpenalized mean, comparable across methods); the reward PPO optimizes is the method's (penalized) one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from world_stages import (
    Stage,
    StageClock,
    WorldArguments,
    build_world,
    check_output_dir,
    generation_config,
    load_gold_reward,
    load_policy,
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
DEFAULT_CONFIG = RECIPE_DIR / "configs" / "ppo.yaml"
METHODS = ("MAP", "LA", "LA-Ens")
CSV_COLUMNS = ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]
TIMED_PARTS = ("generation", "scoring", "reference", "optimization")


@dataclass
class PPOScriptArguments(WorldArguments):
    """Arguments of the PPO recipe: the world's (`WorldArguments`, recipes/world_stages.py) and the ones below, beside
    the proxies' training (`BayesianRewardConfig`) and model/LoRA (`trl.ModelConfig`) arguments. The PPO settings carry
    a `ppo_` prefix where `BayesianRewardConfig` (the proxies' trainer) has a field of the same name.

    Parameters that control the comparison:
        methods, penalty, k: MAP, LA (`penalty` with strength `k`), LA-Ens; k fixed before the run.
        uncertainty, num_reference_samples: the variance LA / LA-Ens penalize: `marginal` (J Σ J^T, the paper's) or
            `relative` (Var(r - mean of the prompt's reference completions): PPO scores one completion per prompt, so
            the group is `num_reference_samples` samples of the SFT (reference) policy per prompt, drawn once and
            cached; their mean reward gradients are computed once per prompt).
        cache_dir: where the cached stages live (default `<output_dir>/cache`).

    Parameters that control PPO (see `trl_bayes.PPOConfig`):
        ppo_steps, ppo_batch_size (completions per step and process), ppo_mini_batches, ppo_epochs,
        ppo_learning_rate, kl_coef, kl_estimator, vf_coef, ppo_temperature, missing_eos_penalty, policy_lora_r
        (0 = full fine-tuning), ppo_eval_steps, num_eval_generations, ppo_save_steps.
    """

    methods: list[str] = field(default_factory=lambda: ["MAP", "LA"], metadata={"help": f"Subset of {METHODS}."})
    penalty: str = field(default="std", metadata={"help": "LA / LA-Ens penalty: std or var."})
    k: float = field(default=1.0, metadata={"help": "Penalty strength, fixed before the run."})
    uncertainty: str = field(default="marginal", metadata={"help": "LA / LA-Ens variance: marginal or relative."})
    num_reference_samples: int = field(
        default=8, metadata={"help": "relative: reference-policy samples per prompt that the reward is centered on."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cached stages (default <output_dir>/cache)."})
    # PPO
    ppo_steps: int = field(default=40, metadata={"help": "PPO steps per run."})
    ppo_batch_size: int = field(default=64, metadata={"help": "Completions per step and process."})
    ppo_micro_batch_size: int = field(default=32, metadata={"help": "Completions per forward/backward pass."})
    ppo_mini_batches: int = field(default=2, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs per step."})
    ppo_learning_rate: float = field(default=1e-3, metadata={"help": "Policy and value learning rate."})
    kl_coef: float = field(default=0.0, metadata={"help": "Per-token KL coefficient (the paper: no KL penalty)."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 or k3."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    ppo_temperature: float = field(default=1.0, metadata={"help": "PPO sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Score penalty without EOS."})
    policy_lora_r: int = field(default=0, metadata={"help": "LoRA rank of the policy (0 = full fine-tuning)."})
    ppo_eval_steps: int = field(default=5, metadata={"help": "Gold evaluation every N PPO steps."})
    num_eval_generations: int = field(default=2, metadata={"help": "Completions per held-out prompt at evaluation."})
    ppo_save_steps: int = field(default=10, metadata={"help": "PPO checkpoint every N steps (resume)."})
    ppo_bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision for PPO (GPU)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process (None = default)."})
    dry_run: bool = field(default=False, metadata={"help": "Check the config, print the plan, and stop."})

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: unknown {unknown}; choose from {list(METHODS)}.")
        if self.penalty not in ("std", "var"):
            raise ValueError(f"--penalty {self.penalty!r}: choose 'std' or 'var'.")
        if self.k < 0:
            raise ValueError(f"--k {self.k}: must be >= 0.")
        if self.uncertainty not in ("marginal", "relative"):
            raise ValueError(f"--uncertainty {self.uncertainty!r}: choose 'marginal' or 'relative'.")
        if self.uncertainty == "relative" and self.num_reference_samples < 1:
            raise ValueError("--num_reference_samples must be >= 1 with --uncertainty relative.")
        if "LA-Ens" in self.methods and self.ensemble_size < 2:
            raise ValueError(f"--ensemble_size {self.ensemble_size}: LA-Ens needs >= 2 members; raise it or drop it.")
        if self.ppo_steps < 1 or self.ppo_eval_steps < 1 or self.ppo_save_steps < 1:
            raise ValueError("--ppo_steps, --ppo_eval_steps and --ppo_save_steps must be >= 1.")
        per_minibatch = self.ppo_micro_batch_size * self.ppo_mini_batches
        if self.ppo_batch_size % per_minibatch:
            raise ValueError(
                f"--ppo_batch_size {self.ppo_batch_size} must be a multiple of --ppo_micro_batch_size x "
                f"--ppo_mini_batches = {per_minibatch}."
            )

    def members_used(self) -> int:
        """Proxies per seed the methods need (member 0 for MAP / LA; the ensemble for LA-Ens)."""
        return self.ensemble_size if "LA-Ens" in self.methods else 1


def method_label(method: str, args: PPOScriptArguments) -> str:
    if method == "MAP":
        return method
    relative = ", relative" if args.uncertainty == "relative" else ""
    return f"{method} ({args.penalty}, k={args.k:g}{relative})"


def ppo_config(args: PPOScriptArguments, training_args, output_dir: Path, seed: int):
    from trl_bayes import PPOConfig

    return PPOConfig(
        str(output_dir), use_cpu=training_args.use_cpu, ddp_backend=training_args.ddp_backend, bf16=args.ppo_bf16,
        report_to="none", disable_tqdm=True,
        seed=seed, max_steps=args.ppo_steps, per_device_train_batch_size=args.ppo_micro_batch_size,
        gradient_accumulation_steps=args.ppo_batch_size // (args.ppo_micro_batch_size * args.ppo_mini_batches),
        num_mini_batches=args.ppo_mini_batches, num_ppo_epochs=args.ppo_epochs, learning_rate=args.ppo_learning_rate,
        lr_scheduler_type="constant", kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, vf_coef=args.vf_coef,
        max_new_tokens=args.max_new_tokens, temperature=args.ppo_temperature,
        missing_eos_penalty=args.missing_eos_penalty, eval_steps=args.ppo_eval_steps,
        num_eval_generations=args.num_eval_generations, eval_seed=1234, save_strategy="steps", save_steps=args.ppo_save_steps,
        save_total_limit=1, logging_steps=1,
    )  # fmt: skip


def ppo_key(args, method: str, seed: int, proxy_dirs: list[Path]) -> dict[str, Any]:
    """What one PPO run's results depend on (its stage is redone when any of it changes)."""
    ppo = {name: value for name, value in asdict(args).items() if name.startswith(("ppo_", "kl_", "vf_"))}
    extra = [args.max_new_tokens, args.missing_eos_penalty, args.policy_lora_r, args.num_eval_generations]
    proxies = [json.loads((d / "done.json").read_text()) for d in proxy_dirs]
    if method != "MAP" and args.uncertainty == "relative":
        extra += ["relative", args.num_reference_samples]
    return {"world": world_settings(args), "method": [method, args.penalty, args.k], "seed": seed, "ppo": ppo,
            "extra": extra, "proxies": proxies, "gold": args.gold_reward}  # fmt: skip


def sample_reference(args, prompts: list[str], policy_path: str, cache: Path, accelerator) -> dict[str, list[str]]:
    """`num_reference_samples` completions of the SFT (reference) policy per prompt, drawn once (cached): the group
    the relative variance centers a PPO completion on."""
    from trl_bayes import BestOfNSampler

    key = {"world": world_settings(args), "K": args.num_reference_samples, "max_new_tokens": args.max_new_tokens,
           "sampling": [args.temperature, args.top_k, args.top_p]}  # fmt: skip
    stage = Stage(cache, "reference_samples", key)
    if not stage.done:
        policy, tokenizer = load_policy(policy_path, accelerator.device)
        sampler = BestOfNSampler(
            policy, tokenizer, n=args.num_reference_samples, generation_config=generation_config(args), seed=4321,
            accelerator=accelerator,
        )  # fmt: skip
        completions = sampler.generate(prompts)
        if accelerator.is_main_process:
            stage.start()
            (stage.path / "reference.json").write_text(json.dumps(dict(zip(prompts, completions, strict=True))))
            stage.finish()
        accelerator.wait_for_everyone()
    return json.loads((stage.path / "reference.json").read_text())


def run_ppo(args, training_args, method, seed, proxy_dirs, policy_path, prompts, gold, cache, state, reference=None):
    """One PPO run (cached): its log history. A run killed mid-way resumes from its last checkpoint."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from trl_bayes import BayesianRewardModel, PenalizedReward, PPOTrainer
    from trl_bayes.distributed import whole_weights

    stage = Stage(cache / "ppo", f"{method}-seed{seed}", ppo_key(args, method, seed, proxy_dirs))
    if not stage.done:
        if state.is_main_process and not stage.partial:
            stage.start()  # a folder from other settings is cleared; one from these settings keeps its checkpoints
        state.wait_for_everyone()
        models = [BayesianRewardModel.from_pretrained(d, device=state.device) for d in proxy_dirs]
        penalty = "none" if method == "MAP" else args.penalty
        relative = method != "MAP" and args.uncertainty == "relative"
        reward = PenalizedReward(
            models, penalty=penalty, k=args.k, batch_size=args.ppo_batch_size,
            uncertainty="relative" if relative else "marginal", reference=reference if relative else None,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with whole_weights():  # ZeRO-3 shards it in the trainer's `prepare`; the frozen reference copy stays whole
            policy = AutoModelForCausalLM.from_pretrained(policy_path)
        peft_config = None
        if args.policy_lora_r:
            peft_config = LoraConfig(task_type="CAUSAL_LM", r=args.policy_lora_r, lora_alpha=2 * args.policy_lora_r)
        # The PPO seed: the proxy seed plus the run's seed, the same for every method.
        config = ppo_config(args, training_args, stage.path / "run", seed=training_args.seed + seed)
        trainer = PPOTrainer(
            policy, reward, config, Dataset.from_dict({"prompt": prompts[0]}), tokenizer, peft_config=peft_config,
            eval_dataset=Dataset.from_dict({"prompt": prompts[1]}), gold_reward=gold,
        )  # fmt: skip
        run_dir = stage.path / "run"
        history = trainer.train(resume_from_checkpoint=get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None)
        if state.is_main_process:
            (stage.path / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
            stage.finish()
        state.wait_for_everyone()
    return json.loads((stage.path / "log_history.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Results (main process)


def result_rows(method: str, seed: int, history: list[dict], args) -> list[dict[str, Any]]:
    rows = []
    for entry in history:
        if "eval/gold_reward" not in entry:
            continue
        # The proxy's MAP reward (unpenalized), comparable across methods; penalized methods also log their own.
        proxy = entry.get("eval/laplace/map_reward", entry["eval/reward"])
        rows.append({"method": method, "penalty": "none" if method == "MAP" else args.penalty,
                     "k": 0.0 if method == "MAP" else args.k, "seed": seed, "step": entry["step"],
                     "kl": entry["eval/kl"], "proxy_reward": proxy, "gold_reward": entry["eval/gold_reward"]})  # fmt: skip
    return rows


def aggregate(rows, args) -> list[dict[str, Any]]:
    """Per method: gold at step 0, at the last step and at the best evaluated step, per seed."""
    import numpy as np

    table = []
    for method in args.methods:
        per_seed = [[r for r in rows if r["method"] == method and r["seed"] == s] for s in args.seeds]
        gold, kl, proxy = (
            np.array([[r[c] for r in mine] for mine in per_seed]) for c in ("gold_reward", "kl", "proxy_reward")
        )
        steps = [r["step"] for r in per_seed[0]]
        table.append({
            "method": method, "label": method_label(method, args), "gold_first": gold[:, 0], "gold_last": gold[:, -1],
            "gold_best": gold.max(1), "best_step": [steps[i] for i in gold.argmax(1)], "kl_last": kl[:, -1],
            "proxy_last": proxy[:, -1],
        })  # fmt: skip
    return table


def step_times(histories, args) -> dict[str, dict[str, float]]:
    """Per method, the mean seconds per PPO step of each timed part, over steps and seeds."""
    import numpy as np

    return {
        method: {p: float(np.mean([h[f"time/{p}"] for s in args.seeds for h in histories[method, s] if f"time/{p}" in h]))
                 for p in TIMED_PARTS}
        for method in args.methods
    }  # fmt: skip


def plot_curves(path: Path, rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for method in args.methods:
        mine = [[r for r in rows if r["method"] == method and r["seed"] == s] for s in args.seeds]
        steps = np.array([r["step"] for r in mine[0]])
        label = method_label(method, args)
        for row, column in enumerate(("proxy_reward", "gold_reward")):
            values = np.array([[r[column] for r in seed_rows] for seed_rows in mine])
            kls = np.array([[r["kl"] for r in seed_rows] for seed_rows in mine])
            mean, std = values.mean(0), values.std(0)
            (line,) = axes[row, 0].plot(steps, mean, marker=".", label=label)
            axes[row, 0].fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            for s, (k, v) in enumerate(zip(kls, values, strict=True)):
                axes[row, 1].plot(k, v, marker=".", color=line.get_color(), alpha=0.7, label=label if s == 0 else None)
    for row, name in enumerate(("proxy reward (the proxy's MAP reward)", "gold reward")):
        axes[row, 0].set(xlabel="PPO step", ylabel=name, title=f"{name} vs step, mean ± std over seeds {args.seeds}")
        axes[row, 1].set(
            xlabel="KL(policy || SFT) on held-out prompts [nats]", ylabel=name, title=f"{name} vs KL, per seed"
        )
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"PPO on the {'offline world' if args.offline else args.prompts_dataset_name}: MAP vs Laplace proxies"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(values) -> str:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def write_summary(path: Path, args, table, times, seconds, sources) -> None:
    lines = [
        "# PPO with Bayesian reward models",
        "",
        f"- policy: {sources['policy']} ({sources['policy_training']}); gold reward: {sources['gold']}",
        f"- proxies: {sources['proxy']}, {args.num_train_pairs} training pairs ({args.label_noise:.0%} labels flipped)",
        f"- PPO: {args.ppo_steps} steps x {args.ppo_batch_size} completions, {args.ppo_epochs} epochs x "
        f"{args.ppo_mini_batches} minibatches, lr {args.ppo_learning_rate:g}, kl_coef {args.kl_coef:g}, "
        f"max_new_tokens {args.max_new_tokens}; seed s = the proxies of seed s and PPO seed {sources['seed']} + s "
        "(the same for every method)",
        f"- gold on {args.num_eval_prompts} held-out prompts x {args.num_eval_generations} completions every "
        f"{args.ppo_eval_steps} steps; penalty fixed before the run: {args.penalty}, k = {args.k:g}",
        "",
        f"## Gold reward (mean ± std over seeds {args.seeds})",
        "",
        "| method | gold at step 0 | final gold | best gold | best step (per seed) | final KL | final proxy (MAP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['label']} | {fmt(t['gold_first'])} | {fmt(t['gold_last'])} | {fmt(t['gold_best'])} | "
            f"{t['best_step']} | {fmt(t['kl_last'])} | {fmt(t['proxy_last'])} |"
        )
    lines += ["", "Per seed (final / best gold):", "", "| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
              "|---|" + "---|" * len(args.seeds)]  # fmt: skip
    for t in table:
        cells = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(t["gold_last"], t["gold_best"], strict=True))
        lines.append(f"| {t['label']} | {cells} |")
    lines += ["", "## Time per PPO step (s, mean over steps and seeds)", "",
              "| method | " + " | ".join(TIMED_PARTS) + " | total |", "|---|" + "---|" * (len(TIMED_PARTS) + 1)]  # fmt: skip
    for t in table:
        parts = [times[t["method"]][p] for p in TIMED_PARTS]
        lines.append(f"| {t['label']} | " + " | ".join(f"{v:.3f}" for v in parts) + f" | {sum(parts):.3f} |")
    lines += ["", "`scoring` = the proxy reward callable; `reference` = no-grad log-probabilities of policy and reference "
              "and the values; evaluation time is not in the steps.", "", "## Time per stage (s, this run)", "",
              "| stage | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {stage} | {value:.1f} |" for stage, value in seconds.items()]
    lines += ["", "Files: `ppo_results.csv`, `ppo_curves.png`, cached stages and PPO logs in the cache folder."]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------


def describe_plan(args, training_args, model_args) -> list[str]:
    policy = args.policy_name_or_path or "offline tiny GPT-NeoX SFT policy (trained here)"
    return [
        f"world: {'offline world, seed ' + str(args.world_seed) if args.offline else args.prompts_dataset_name}"
        f" -> {args.num_eval_prompts} held-out prompts",
        f"policy: {policy} ({'LoRA r=' + str(args.policy_lora_r) if args.policy_lora_r else 'full fine-tuning'})",
        f"gold reward: {args.gold_reward}",
        f"pairs: {args.num_train_pairs} sampled + gold-labelled ({args.label_noise:.0%} flipped)",
        f"proxies: {model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r} "
        f"alpha={model_args.lora_alpha}, {training_args.hessian_structure} Laplace, "
        f"{len(args.seeds)} seeds x {args.members_used()} members",
        f"PPO: methods {[method_label(m, args) for m in args.methods]}, seeds {args.seeds}, {args.ppo_steps} steps x "
        f"{args.ppo_batch_size} completions (max_new_tokens={args.max_new_tokens}), kl_coef {args.kl_coef:g}",
    ]


def main(args: PPOScriptArguments, training_args, model_args) -> None:
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    normalize_lora_targets(model_args)
    plan = describe_plan(args, training_args, model_args)
    output_dir = check_output_dir(training_args.output_dir)
    missing = args.missing_local_paths()
    if args.dry_run:
        print("\n".join(["PPO plan:", *plan, *(f"not found here: {m}" for m in missing)]))
        return
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)} (cwd: {Path.cwd()}).")
    if args.num_threads:
        # Tiny models on a shared CPU: one thread per process avoids oversubscription (a step ran 10-40x slower).
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(training_args)
    state = accelerator.state
    clock = StageClock()

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else output_dir / "cache"
    gold = load_gold_reward(args, accelerator.device)
    train_prompts, eval_prompts, policy_path = build_world(args, cache, state)
    clock.lap("world + SFT policy")
    train_pairs, _ = sample_pairs(args, train_prompts, eval_prompts, policy_path, gold, cache, accelerator)
    clock.lap("preference pairs")
    # Only the members the methods use are trained (the Best-of-N recipe's cache may already hold more).
    proxy_args = replace(args, ensemble_size=args.members_used(), methods=["MAP"])
    members = train_proxies(proxy_args, training_args, model_args, train_pairs, policy_path, cache, state)
    clock.lap("proxies (MAP + Laplace fit)")
    reference = None
    if args.uncertainty == "relative" and set(args.methods) - {"MAP"}:
        reference = sample_reference(args, train_prompts + eval_prompts, policy_path, cache, accelerator)
        clock.lap("reference samples")
    histories = {}
    for method in args.methods:
        for seed in args.seeds:
            dirs = [members[seed, j] for j in range(args.members_used() if method == "LA-Ens" else 1)]
            state.print(f"[ppo] {method_label(method, args)}, seed {seed}")
            histories[method, seed] = run_ppo(args, training_args, method, seed, dirs, policy_path,
                                              (train_prompts, eval_prompts), gold, cache, state, reference)  # fmt: skip
            clock.lap(f"PPO {method_label(method, args)}")
    if state.is_main_process:
        rows = [r for (method, seed), h in histories.items() for r in result_rows(method, seed, h, args)]
        write_csv(output_dir / "ppo_results.csv", rows, CSV_COLUMNS)
        plot_curves(output_dir / "ppo_curves.png", rows, args)
        clock.lap("results")
        seconds = clock.finish()
        sources = {
            "policy": args.policy_name_or_path or "offline SFT policy (tiny GPT-NeoX)",
            "policy_training": f"LoRA r={args.policy_lora_r}" if args.policy_lora_r else "full fine-tuning",
            "gold": "the offline world's known function" if args.gold_reward == "world" else args.gold_reward,
            "proxy": f"{model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r}, "
            f"{training_args.hessian_structure} Laplace",
            "seed": training_args.seed,
        }
        table, times = aggregate(rows, args), step_times(histories, args)
        write_summary(output_dir / "summary.md", args, table, times, seconds, sources)
        write_run_record(output_dir, args)
        print(f"Results in {output_dir}: ppo_results.csv, ppo_curves.png, summary.md.")
    accelerator.wait_for_everyone()


def make_parser():
    return recipe_parser(PPOScriptArguments, "outputs/ppo")


if __name__ == "__main__":
    run_script(make_parser, main, DEFAULT_CONFIG)
