"""Offline fixtures: a tokenizer built in memory and tiny GPT-NeoX reward models built from configs."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from transformers import GPTNeoXForSequenceClassification

from trl_bayes import BayesianRewardConfig, BayesianRewardTrainer
from trl_bayes.experiments.world import build_tokenizer, make_preference_dataset, tiny_gpt_neox_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The smallest reward model the numerics tests build (`make_trainer(..., model_kwargs=TINY_MODEL)`).
TINY_MODEL = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2)
# Two prompts with 4 and 3 completions, interleaved so that groups are not contiguous in the input; lengths differ, so
# batches are padded. With per-response weights (deduplication counts).
GROUPED_PROMPTS = ["please list fruits : ", "name a few tools : "] * 3 + ["please list fruits : "]
GROUPED_COMPLETIONS = ["apple pear fig", "saw", "red", "hammer saw drill drill", "cat dog", "nail", "apple apple"]
GROUPED_WEIGHTS = [1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 2.0]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def make_reward_model(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialized GPT-NeoX sequence-classification model (one label), deterministic for `seed`."""
    torch.manual_seed(seed)
    config = tiny_gpt_neox_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    return GPTNeoXForSequenceClassification(config).to(dtype)


def lora_config(r: int = 2, random_init: bool = True) -> LoraConfig:
    # Random LoRA B factors (init_lora_weights=False): with PEFT's zero init, the gradient of the reward with respect
    # to the A factors vanishes and the numerics tests would check nothing there.
    return LoraConfig(
        task_type="SEQ_CLS",
        r=r,
        lora_alpha=2 * r,
        target_modules=["query_key_value"],
        init_lora_weights=not random_init,
    )


def make_trainer(
    tokenizer,
    tmp_path,
    num_pairs: int = 24,
    seed: int = 0,
    dtype=torch.float32,
    model_kwargs=None,
    peft=None,
    **config_kwargs,
) -> BayesianRewardTrainer:
    defaults = dict(
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1000,
        per_device_train_batch_size=8,
        posterior_batch_size=4,
        learning_rate=1e-3,
        num_train_epochs=1,
        seed=seed,
    )
    defaults.update(config_kwargs)
    args = BayesianRewardConfig(str(tmp_path / "out"), **defaults)
    model = make_reward_model(tokenizer, seed=seed, dtype=dtype, **(model_kwargs or {}))
    dataset = make_preference_dataset(num_pairs, seed=seed)
    return BayesianRewardTrainer(
        model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft or lora_config()
    )
