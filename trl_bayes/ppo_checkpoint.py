"""A PPO run's checkpoints: `output_dir/checkpoint-<step>` holds what Accelerate saves (models, optimizer, scheduler,
every process's RNG) and `trainer_state.json` (the loop's own state), so that a resumed run continues exactly as the
uninterrupted one would have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_NAME = "trainer_state.json"


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], save_total_limit: int | None
) -> Path:
    """Save `checkpoint-<step>` on every process (each writes its own RNG state); the main process writes `state`
    (JSON) and removes the oldest checkpoints beyond `save_total_limit`. Returns the checkpoint's folder."""
    path = Path(output_dir) / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
        if save_total_limit:
            checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in checkpoints[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore what `save_checkpoint` saved into the prepared objects (RNG states included); returns the loop state."""
    state_file = Path(path) / STATE_NAME
    if not state_file.is_file():
        raise ValueError(f"{path} is not a PPOTrainer checkpoint (no {STATE_NAME}).")
    accelerator.load_state(str(path))
    return json.loads(state_file.read_text())
