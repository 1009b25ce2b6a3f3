"""Lean imports: `trl_bayes` loads its names lazily (PEP 562), so PPO on a plain reward function loads neither
laplace-torch nor DeepSpeed, at import or in training; every public name still imports. Each check runs in a fresh
interpreter, since this test session has imported everything already."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import trl_bayes


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_ppo_loads_neither_laplace_nor_deepspeed():
    run_python(
        """
        import trl_bayes
        from trl_bayes import PPOTrainer, PPOConfig
        import sys
        assert 'laplace' not in sys.modules and 'deepspeed' not in sys.modules
        """
    )


def test_a_ppo_run_on_a_plain_reward_loads_neither_laplace_nor_deepspeed(tmp_path):
    run_python(
        f"""
        import sys
        import torch
        from datasets import Dataset
        from transformers import GPTNeoXForCausalLM
        from trl_bayes import PPOConfig, PPOTrainer
        from trl_bayes.experiments.world import build_tokenizer, tiny_gpt_neox_config, world_prompts

        tokenizer = build_tokenizer()
        policy = GPTNeoXForCausalLM(tiny_gpt_neox_config(len(tokenizer), pad_token_id=0, eos_token_id=1))
        args = PPOConfig({str(tmp_path)!r}, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                         per_device_train_batch_size=4, max_new_tokens=4, max_steps=1, num_ppo_epochs=1)
        reward = lambda prompts, completions, **kwargs: [float(len(c)) for c in completions]
        trainer = PPOTrainer(policy, reward, args, Dataset.from_dict({{"prompt": world_prompts()[:8]}}), tokenizer)
        trainer.train()
        assert 'laplace' not in sys.modules and 'deepspeed' not in sys.modules, [
            m for m in ('laplace', 'deepspeed') if m in sys.modules
        ]
        """
    )


def test_every_public_name_imports_lazily():
    out = run_python(
        """
        import sys
        import trl_bayes
        assert 'trl_bayes.ppo_trainer' not in sys.modules  # nothing but the package itself yet
        for name in trl_bayes.__all__:
            assert getattr(trl_bayes, name) is not None, name
        assert set(trl_bayes.__all__) <= set(dir(trl_bayes))
        print(len(trl_bayes.__all__))
        """
    )
    assert int(out) == len(trl_bayes.__all__)


def test_names_resolve_to_their_modules_and_unknown_names_fail():
    from trl_bayes.ppo_trainer import PPOTrainer
    from trl_bayes.reward_model import BayesianRewardModel

    assert trl_bayes.PPOTrainer is PPOTrainer and trl_bayes.BayesianRewardModel is BayesianRewardModel
    assert trl_bayes.rlhf.whiten is not None  # submodules as attributes, as when everything was imported eagerly
    with pytest.raises(AttributeError, match="module 'trl_bayes' has no attribute 'NoSuchName'"):
        trl_bayes.NoSuchName  # noqa: B018
