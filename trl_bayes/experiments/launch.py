"""The edges of a study's recipe: its parser (script arguments + the proxies' `BayesianRewardConfig` and
`trl.ModelConfig`, with the proxies' defaults), its `Accelerator`, and its output folder."""

from __future__ import annotations

import tempfile
from pathlib import Path


def make_accelerator(training_args):
    """The recipes' Accelerator: without CUDA a gloo process group (DDP over CPU processes, or DeepSpeed's CPU
    accelerator), so that the processes of `accelerate launch --config_file recipes/accelerate/cpu_*.yaml` form one
    group (without it each would run alone)."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    from trl_bayes.distributed import check_cpu_launch, process_group_backend

    check_cpu_launch(training_args.use_cpu)
    backend = process_group_backend()
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
    return Accelerator(cpu=training_args.use_cpu, kwargs_handlers=handlers)


def check_output_dir(output_dir: str) -> Path:
    """Create `output_dir` and prove it writable before any long work."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OSError(f"Cannot write to output_dir {str(path)!r} ({error}): pass another --output_dir.") from error
    return path


def recipe_parser(script_arguments_class, output_dir: str):
    """The parser of the recipes on the offline world (bon.py, ppo.py, grpo.py): their own arguments,
    `BayesianRewardConfig` (the proxies' training and posterior) and `trl.ModelConfig` (the proxies' model and LoRA),
    with the proxies' defaults (`PROXY_DEFAULTS`, one place for the three recipes, which share the proxies' cache).
    `--config file.yaml` replaces defaults, and flags replace both."""
    from trl import ModelConfig, TrlParser

    from trl_bayes import BayesianRewardConfig
    from trl_bayes.distributed import cpu_launch_defaults
    from trl_bayes.experiments.proxies import PROXY_DEFAULTS

    parser = TrlParser((script_arguments_class, BayesianRewardConfig, ModelConfig))
    # A reward model's LoRA: PEFT's SEQ_CLS task also trains (and the posterior covers) the score head.
    # Several CPU processes: gloo, and use_cpu for DDP but not for DeepSpeed (see `cpu_launch_defaults`).
    parser.set_defaults(use_peft=True, lora_task_type="SEQ_CLS", output_dir=output_dir, **PROXY_DEFAULTS,
                        **cpu_launch_defaults())  # fmt: skip
    return parser


def fill_defaults(make_parser, *arguments):
    """`arguments` (the script's, training and model arguments, in the parser's order) with each `None` replaced by the
    recipe's default, the parse of an empty command line: `main()` from Python runs the bare command line's run."""
    import transformers

    if all(a is not None for a in arguments):
        return arguments
    # `TrainingArguments` takes `disable_tqdm`'s default from transformers' log level, which an earlier `main()` in
    # this process may have lowered: parse at a fresh process's level (warning), as the command line does.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        defaults = make_parser().parse_args_and_config([])
    finally:
        transformers.logging.set_verbosity(level)
    return tuple(default if given is None else given for given, default in zip(arguments, defaults, strict=True))
