"""The gold reward of a study: the offline world's known function, or a sequence-classification reward model (the
oracle of a Hub setup); and the wrapper that splits one reward's inputs over the processes."""

from __future__ import annotations

from pathlib import Path


class SequenceClassifierReward:
    """A TRL reward function from a sequence-classification reward model with its own tokenizer (e.g. a gold RM)."""

    def __init__(self, name_or_path: str, device, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from trl_bayes.distributed import whole_weights

        self.__name__ = Path(name_or_path).name
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        with whole_weights():  # each process scores its own share of the responses
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)
        self.model.to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.torch = torch

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(prompts), self.batch_size):
            texts = [
                p + c
                for p, c in zip(prompts[i : i + self.batch_size], completions[i : i + self.batch_size], strict=True)
            ]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
            with self.torch.no_grad():
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores


class ShardedReward:
    """A TRL reward function whose inputs are split over the processes and whose scores are gathered back, all of
    them on every process: for a reward that every process calls on the same inputs (the gold labels of the pairs).
    Each response is scored once, by one process; the scores are those of one process (a reward model's batches
    differ, so its scores may differ in the last bits)."""

    def __init__(self, reward, state):
        self.reward, self.state = reward, state
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from accelerate.utils import gather_object

        if self.state.num_processes == 1:
            return list(self.reward(prompts=prompts, completions=completions, **kwargs))
        with self.state.split_between_processes(list(range(len(prompts)))) as local:
            local = list(local)
            scores = self.reward(prompts=[prompts[i] for i in local], completions=[completions[i] for i in local])
        return gather_object(list(scores) if local else [])


def load_gold_reward(script_args, device):
    """The gold reward of `script_args` (`WorldArguments`: its `gold_reward`, and `world` for the offline one)."""
    if script_args.gold_reward == "world":
        from trl_bayes.experiments.world import world_gold_reward

        return world_gold_reward(script_args.world)
    return SequenceClassifierReward(script_args.gold_reward, device)


# ---------------------------------------------------------------------------------------------------------------------
