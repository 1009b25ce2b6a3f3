"""Two gloo processes fit the same posterior as one process (the curvature is summed over processes).

`accelerate launch --multi_gpu --num_processes 2` starts two CPU processes here; `--cpu --num_processes 2` would
silently start one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_bayes.distributed import check_cpu_launch, cpu_launch_defaults

SCRIPT = Path(__file__).with_name("dist_fit_posterior.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script: Path, *args: str) -> list[str]:
    """The command that runs `script` in two gloo processes on this CPU machine."""
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    return [*launch, "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(script), *args]


def _launch(config: str, script: Path, *args: str) -> list[str]:
    """The command that runs `script` under `recipes/accelerate/cpu_<config>.yaml` (ddp, zero2, zero3): two gloo
    processes on this CPU machine, as a user launches them."""
    launch = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / f"cpu_{config}.yaml")]
    return [*launch, "--main_process_port", str(_free_port()), str(script), *args]


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_two_process_posterior_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one)])
    _run(_two_processes(SCRIPT, str(two)))
    for structure in ("kron", "diag"):
        p1, p2 = (json.loads((d / structure / "predictions.json").read_text()) for d in (one, two))
        assert (p1["num_processes"], p2["num_processes"]) == (1, 2)
        t1, t2 = (load_file(str(d / structure / "laplace_posterior.safetensors")) for d in (one, two))
        assert sorted(t1) == sorted(t2)
        for name in t1:  # equal up to the order of floating-point reductions
            torch.testing.assert_close(t2[name], t1[name], rtol=1e-5, atol=1e-6, msg=f"{structure}: {name}")
        torch.testing.assert_close(torch.tensor(p2["var"]), torch.tensor(p1["var"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(p2["mean"]), torch.tensor(p1["mean"]), rtol=1e-5, atol=1e-7)
        m1, m2 = (json.loads((d / structure / "laplace_config.json").read_text()) for d in (one, two))
        assert m1["n_data"] == m2["n_data"]
        assert m2["prior_precision"] == pytest.approx(m1["prior_precision"], rel=1e-5)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "1"}, {}),
        ({"WORLD_SIZE": "2"}, {"ddp_backend": "gloo", "use_cpu": True}),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, {"ddp_backend": "gloo", "use_cpu": False}),
    ],
)
def test_cpu_launch_defaults(monkeypatch, env, expected):
    """Without CUDA the recipes default to gloo, and to use_cpu under DDP only: under DeepSpeed it would make
    Accelerate drop DeepSpeed, without it under DDP each CPU process would train alone."""
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_launch_defaults() == expected


def test_use_cpu_under_deepspeed_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="Drop `--use_cpu true`"):
        check_cpu_launch(True)
    check_cpu_launch(False)
