"""The GRPO drop-in study (recipes/grpo.py) on top of the shared stages: one cached run of TRL's own `GRPOTrainer` (or
`RLOOTrainer`) per method and seed with `reward_funcs=[PenalizedReward(...)]`, and the gold evaluation of the
held-out prompts that a `TrainerCallback` runs along the way."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trl_bayes.experiments.rl_report import method_label
from trl_bayes.experiments.stages import Stage, world_settings

METHODS = ("MAP", "LA")
CSV_COLUMNS = ["method", "penalty", "k", "seed", "step", "kl", "proxy_reward", "gold_reward"]


class GoldEvaluation:
    """Samples the held-out prompts under fixed seeds and scores them: gold reward, the proxy's MAP reward, and the
    KL to the SFT policy (sum over the completion of log pi - log pi_SFT). A `TrainerCallback` calls it.

    The library's one evaluation loop (`trl_bayes.evaluate_policy`, shared with `PPOTrainer.evaluate`): fixed chunks
    of 16 responses, each sampled under its own seed (from 1234 and the chunk's index) and dealt to the processes, so
    the numbers are the same on 1 or N processes and every evaluation draws the same random numbers."""

    def __init__(self, args, policy_path, prompts, gold, proxy, state):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from trl_bayes.distributed import whole_weights
        from trl_bayes.penalties import PenalizedReward

        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        with whole_weights():  # each process evaluates its own chunks
            reference = AutoModelForCausalLM.from_pretrained(policy_path)
        self.reference = reference.to(state.device).eval().requires_grad_(False)
        self.generation_config = GenerationConfig(
            do_sample=True, top_k=0, top_p=1.0, temperature=args.grpo_temperature, max_new_tokens=args.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )  # fmt: skip
        # The MAP reward, unpenalized: a relative reward would need whole groups, which evaluation does not sample.
        self.proxy = PenalizedReward(proxy.models, penalty="none", batch_size=64)
        self.prompts, self.gold, self.args, self.state = prompts, gold, args, state

    def __call__(self, policy) -> dict[str, float]:
        """`policy`: the plain model, its weights whole (under ZeRO-3: inside `unwrap_model_for_generation`)."""
        from trl_bayes.evaluation import evaluate_policy

        metrics = evaluate_policy(
            policy, self.tokenizer, self.prompts, self.gold, self.proxy, self.generation_config,
            reference=self.reference, num_generations=self.args.num_eval_generations, seed=1234, chunk_size=16,
            accelerator=self.state,
        )  # fmt: skip
        return {"kl": metrics["kl"], "gold_reward": metrics["gold_reward"], "proxy_reward": metrics["proxy_reward"]}


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
        reward = PenalizedReward(model, penalty=penalty, k=args.k, batch_size=64, uncertainty=uncertainty,
                                 scale="absolute")  # k in reward units, as in every GRPO result so far  # fmt: skip
        evaluation = GoldEvaluation(args, policy_path, prompts[1], gold, reward, state)
        records: list[dict[str, Any]] = []
        times: list[float] = []

        def evaluate() -> dict[str, float]:
            # The policy with whole weights: under ZeRO-3 gathered (and DeepSpeed's hooks off) for the evaluation, so
            # that each process can run its own chunks; elsewhere just unwrapped.
            with unwrapped_whole(trainer.accelerator, trainer.model_wrapped) as policy:
                metrics = evaluation(policy)
            trainer.log({f"eval/{name}": value for name, value in metrics.items()})  # to `--report_to`'s trackers
            return metrics

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
            # Outside the stage folder, which `stage.start()` empties: the trackers' files (`--report_to`) stay.
            output_dir=str(Path(training_args.output_dir) / f"{args.trainer}_runs" / f"{method}-seed{seed}"),
            use_cpu=training_args.use_cpu, ddp_backend=training_args.ddp_backend,
            bf16=False, report_to=training_args.report_to,  # `--report_to tensorboard`: GRPO's and our metrics
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


def result_rows(results: dict, args) -> list[dict[str, Any]]:
    """The rows of `<trainer>_results.csv` (`CSV_COLUMNS`) from `run_grpo`'s results per (method, seed)."""
    rows = [
        {"method": m, "penalty": "none" if m == "MAP" else args.penalty, "k": 0.0 if m == "MAP" else args.k,
         "seed": s, **r}
        for (m, s), result in results.items() for r in result["records"]
    ]  # fmt: skip
    return [{c: r[c] for c in CSV_COLUMNS} for r in rows]


def mean_step_seconds(results: dict, args) -> dict[str, float]:
    """Per method, the mean wall time of one step (generation + scoring + optimization) over steps and seeds."""
    seconds = {}
    for method in args.methods:
        step = [t for s in args.seeds for t in results[method, s]["times"]]
        seconds[f"mean step (generation + scoring + optimization), {method_label(method, args)}"] = sum(step) / len(
            step
        )
    return seconds
