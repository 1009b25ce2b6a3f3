"""Processes, devices and DeepSpeed in one place: what a launch needs on a machine without CUDA, and the ZeRO-3 gather
of the model for the steps that need whole weights (the posterior fit, generation). DeepSpeed is imported only when a
ZeRO-3 run needs it.

Launch configs live in `recipes/accelerate/`; the README's "Scaling" section gives the command for each recipe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType, is_compiled_module


def world_size() -> int:
    """Processes launched (torchrun / accelerate launch set WORLD_SIZE); 1 for a plain `python script.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_launched() -> bool:
    """Whether `accelerate launch` started this process with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def cpu_launch_defaults() -> dict[str, Any]:
    """`TrainingArguments` defaults for several processes on a machine without CUDA; empty otherwise.

    - `ddp_backend="gloo"`: the CPU collective backend (DeepSpeed on CPU would otherwise pick oneCCL, which is not
      installed, and each process would end up alone);
    - `use_cpu=True` under DDP: without it transformers gives each CPU process a world of its own; `use_cpu=False`
      under DeepSpeed: with it Accelerate skips DeepSpeed and runs plain DDP (DeepSpeed still runs on the CPU, through
      its CPU accelerator).

    Recipes set these as parser defaults, so `accelerate launch --config_file recipes/accelerate/cpu_*.yaml` needs no
    device flags; a yaml key or a flag still wins.
    """
    if torch.cuda.is_available() or world_size() == 1:
        return {}
    return {"ddp_backend": "gloo", "use_cpu": not deepspeed_launched()}


def check_cpu_launch(use_cpu: bool) -> None:
    """Refuse `use_cpu=True` under a DeepSpeed launch: Accelerate would silently drop DeepSpeed and run DDP."""
    if use_cpu and deepspeed_launched():
        raise ValueError(
            "use_cpu=True under a DeepSpeed launch makes Accelerate skip DeepSpeed (plain DDP instead). Drop "
            "`--use_cpu true` (and `use_cpu: true` from the yaml): DeepSpeed runs on the CPU by itself when there is no "
            "GPU, with `ddp_backend='gloo'`."
        )


def process_group_backend() -> str | None:
    """gloo without CUDA (DDP over CPU processes, or DeepSpeed's CPU accelerator); None = Accelerate's choice."""
    return None if torch.cuda.is_available() else "gloo"


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def unwrap_model(accelerator, wrapped: torch.nn.Module) -> torch.nn.Module:
    """`accelerator.unwrap_model(wrapped)`, unwrapped here when neither DeepSpeed nor FSDP wraps it (no wrapper or
    DDP's): Accelerate's own imports DeepSpeed whenever it is installed, which costs seconds and prints a warning."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP) or is_compiled_module(
        wrapped
    ):
        return accelerator.unwrap_model(wrapped)
    return wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped


@contextlib.contextmanager
def unwrapped_whole(accelerator, wrapped: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`accelerator.unwrap_model(wrapped)`, with whole weights inside the block: under DeepSpeed ZeRO-3 they are
    gathered on every process and the engine's hooks are off, so that processes may do unequal work (their own chunks
    of generation or evaluation, the posterior fit of their own shares); re-sharded after, updates dropped.

    TRL's `unwrap_model_for_generation` gathers the parameters and removes DeepSpeed's per-module hooks; the engine's
    start-of-forward hook stays, and its `reset_step` checks in a collective that every process runs the same forward,
    which would deadlock processes that do not. It is popped here for the block and put back after.

    Cost: the full module (base weights included, in their dtype) on every process for the block, as for TRL's
    generation under ZeRO-3.
    """
    if not is_zero3(accelerator):
        yield unwrap_model(accelerator, wrapped)
        return
    # Imported only under ZeRO-3: `import deepspeed` takes seconds and prints an accelerator warning.
    import deepspeed
    from trl.models.utils import unwrap_model_for_generation

    if not isinstance(wrapped, deepspeed.DeepSpeedEngine):
        yield accelerator.unwrap_model(wrapped)
        return
    offload = getattr(wrapped.optimizer, "parameter_offload", wrapped.optimizer)
    handle = getattr(offload, "fwd_pre_hook", None)
    hooks = wrapped.module._forward_pre_hooks
    start_of_forward = hooks.pop(handle.id) if handle is not None else None
    try:
        with unwrap_model_for_generation(wrapped, accelerator) as model:
            yield model
    finally:
        if start_of_forward is not None:
            hooks[handle.id] = start_of_forward


@contextlib.contextmanager
def gathered_model(accelerator, wrapped: torch.nn.Module | None, model: torch.nn.Module) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, `model`'s weights whole on every process inside the block; elsewhere a no-op.

    With a DeepSpeed engine (`wrapped`) see `unwrapped_whole`: the block runs plain PyTorch, so our forward hooks on the
    LoRA layers, per-sample gradients and parameter identity (`id(p)`) behave exactly as on one process. Without an
    engine (a model loaded under `zero.Init`, no `train()` yet), `GatheredParameters` gathers them.

    The base weights are what a forward through the LoRA layers needs; gathering only the LoRA weights would leave
    DeepSpeed's hooks gathering each base layer at every forward instead, in lockstep across processes.
    """
    if not is_zero3(accelerator):
        yield
        return
    import deepspeed  # only under ZeRO-3, as in `unwrapped_whole`

    if isinstance(wrapped, deepspeed.DeepSpeedEngine):
        with unwrapped_whole(accelerator, wrapped):
            yield
    else:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """`from_pretrained` inside the block loads whole weights on this process, even under a ZeRO-3 launch.

    Once a ZeRO-3 config is live (any `TrainingArguments` of a DeepSpeed launch), transformers loads every model under
    `deepspeed.zero.Init`: sharded, usable only inside a DeepSpeed engine and only in lockstep with the other processes.
    Models that each process runs on its own share of the data (reward models for scoring, policies for sampling, the
    frozen reference of PPO) must be whole; what that costs per process is their full size (README, "Scaling").
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    # transformers keeps the live config behind a module-level weak reference; the object itself is owned by
    # Accelerate's DeepSpeed plugin, so putting the reference back restores the state exactly.
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def shutdown() -> None:
    """Destroy the process group, if any, before the interpreter exits (a script's last call).

    Left to the interpreter's teardown, gloo's worker threads are sometimes destroyed while joinable and the process
    aborts ("terminate called without an active exception", SIGABRT) after all its work is done: the launcher then
    reports the run as failed. Seen on two CPU processes under load.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config of a trainer without a dataloader (PPO), before `accelerator.prepare`: DeepSpeed reads
    the micro batch from a dataloader, and accumulates and clips gradients itself. A no-op without DeepSpeed.

    Args:
        micro_batch_size: sequences per forward/backward pass on each process.
        max_grad_norm: the clipping norm where the config leaves it `auto` (`None` or 0: no clipping).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    steps = accelerator.gradient_accumulation_steps  # micro batches per optimizer step
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = steps
    plugin.deepspeed_config["train_batch_size"] = micro_batch_size * steps * accelerator.num_processes
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm or 0.0
