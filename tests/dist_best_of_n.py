"""Best-of-n sampling on a fixed tiny policy; run by tests/test_best_of_n.py under 1 and 2 processes.

    python tests/dist_best_of_n.py OUT
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        tests/dist_best_of_n.py OUT

Writes OUT/<case>.json from the main process. The two processes must produce exactly what one process does: each prompt
chunk samples under a seed of its own, whichever process runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GenerationConfig, GPTNeoXForCausalLM

from trl_bayes.best_of_n import BestOfNSampler
from trl_bayes.distributed import shutdown
from trl_bayes.synthetic import build_tokenizer, tiny_gpt_neox_config

PROMPTS = ["please list fruits : ", "name a few tools : ", "give me some colors : ", "list animals : ", "a few : "]


class LetterCount:
    """A deterministic reward: how often the letter `e` occurs in the completion."""

    __name__ = "letter_count"

    def __call__(self, prompts, completions, **kwargs):
        return [float(c.count("e")) for c in completions]


def main(out: Path) -> None:
    # cpu=True: without it each CPU process gets a world of its own (and the sampler refuses to start).
    accelerator = Accelerator(cpu=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_gpt_neox_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    policy = GPTNeoXForCausalLM(config).to(accelerator.device)
    generation_config = GenerationConfig(do_sample=True, max_new_tokens=6)
    # "uneven": 3 chunks over 2 processes (2 + 1); "fewer_chunks": 1 chunk, so the second process has none.
    for case, prompts, batch_size in [("uneven", PROMPTS, 2), ("fewer_chunks", PROMPTS[:2], 4)]:
        sampler = BestOfNSampler(
            policy,
            tokenizer,
            reward=LetterCount(),
            n=3,
            generation_config=generation_config,
            prompt_batch_size=batch_size,
            seed=7,
            accelerator=accelerator,
        )
        result = sampler(prompts)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            record = {
                "num_processes": accelerator.num_processes,
                "completions": result.completions,
                "finished": result.finished.tolist(),
                "scores": result.scores.tolist(),
                "best_index": result.best_index.tolist(),
                "best_completions": result.best_completions,
            }
            (out / f"{case}.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    shutdown()
