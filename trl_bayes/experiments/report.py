"""What every study writes: CSV tables, the run record (`config.json`), the mean ± std cell of its summaries, and the
sources line (policy, gold, proxies) of its summary."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row[c] for c in columns})


def write_run_record(path: Path, script_args, training_args, model_args) -> None:
    """The run record (`config.json` next to a study's results): every argument of the run (the script's, the training
    and the model ones), so that a run is known by its record, whatever config file or flags made it."""
    record = {"script": asdict(script_args), "training": training_args.to_dict(), "model": asdict(model_args)}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def fmt(values) -> str:
    """`mean ± std` of `values` (over seeds), three decimals."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def sources(args, training_args, model_args) -> dict[str, str]:
    """Where the policy, the gold reward and the proxies come from, for a summary's first lines."""
    return {
        "policy": args.policy_name_or_path or "offline SFT policy (tiny GPT-NeoX)",
        "gold": "the offline world's known function" if args.gold_reward == "world" else args.gold_reward,
        "proxy": f"{model_args.model_name_or_path or 'SFT backbone'} + LoRA r={model_args.lora_r}, "
        f"{training_args.hessian_structure} Laplace",
    }
