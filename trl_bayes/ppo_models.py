"""What `PPOTrainer` trains: the policy and the value model as one module (`PolicyAndValue`), the default value model
(the policy's in-memory backbone with a new head), the check that a value model gives one value per token, and the
optimizer over both, built as `Trainer` builds it from `TrainingArguments`."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from transformers import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING, PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names

from .distributed import whole_weights
from .generation import no_cache


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module: DeepSpeed takes one model per `accelerator.prepare`, and one
    forward gives both outputs (so DDP syncs both models' gradients through one wrapper)."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    # Read by TRL's `unwrap_model_for_generation` (which would switch checkpointing off around generation); this
    # trainer never checkpoints activations.
    is_gradient_checkpointing = False

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits `(B, L, V)` and values `(B, L, 1)` of the same inputs."""
        policy, value_model = self.policy, self.value_model
        return policy(**inputs, **no_cache(policy)).logits, value_model(**inputs, **no_cache(value_model)).logits


def value_model_from_policy(policy: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """A value model from the policy's weights as they are in memory (not its checkpoint on disk): its backbone with a
    new scalar head, `AutoModelForTokenClassification(num_labels=1)` of its config, in its dtype. A PEFT policy gives
    its base weights (the adapter unloaded from a copy)."""
    if isinstance(policy, PeftModel):
        policy = copy.deepcopy(policy).unload()
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    # Copies: `from_pretrained` would otherwise take the policy's own tensors, and training one would move the other.
    weights = {name: tensor.detach().clone() for name, tensor in policy.state_dict().items()}
    value_class = MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING[type(config)]
    with whole_weights():  # sharded (if at all) by `prepare`, with the policy
        return value_class.from_pretrained(None, config=config, state_dict=weights, dtype=policy.dtype)


def build_optimizer(args: TrainingArguments, module: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `Trainer.create_optimizer` builds from `args` (`optim`, `optim_args`, betas, eps, lr), over the
    trainable parameters, with `weight_decay` on all but biases and norms (`Trainer.get_decay_parameter_names`)."""
    no_decay = ["bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]  # Trainer's patterns
    decay = set(get_parameter_names(module, [torch.nn.LayerNorm], no_decay))
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0},
    ]
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, module)
    return optimizer_class([g for g in groups if g["params"]], **kwargs)


def check_value_model(value_model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse a value model that does not give one value per token: PPO reads `logits` `(B, L, 1)`. A sequence
    classifier (TRL 1.12's value model, whose `score` head TRL applied to every token's hidden state) gives `(B, 1)`,
    which would fail only inside the first PPO step.

    Args:
        value_model: with whole weights (under ZeRO-3: gathered).
        input_ids: `(1, L)` a few tokens on the model's device.
    """
    with torch.no_grad():
        shape = tuple(value_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.shape)
    length = input_ids.shape[1]
    if shape != (1, length, 1):
        raise ValueError(
            f"value_model ({type(value_model).__name__}) returns logits of shape {shape} for 1 sequence of {length} "
            f"tokens; PPO needs one value per token, shape (1, {length}, 1): a token-classification model with one "
            "label, e.g. AutoModelForTokenClassification.from_pretrained(path, num_labels=1), or no value_model (the "
            "policy's backbone with a new head)."
        )
