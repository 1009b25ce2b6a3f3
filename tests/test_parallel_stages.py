"""The studies' independent jobs dealt to worker processes (trl_bayes.experiments.workers): where a job runs changes
nothing in what it writes, so the Best-of-N recipe on 2 workers writes the bytes of 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.recipe_runs import run_recipe
from trl_bayes.experiments.workers import JOB_THREADS, Workers, default_num_workers, resolve_num_workers, usable_cores

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bon.py"
# Two proxies, two proxies' scores and three blocks of samples: every stage with jobs has more than one.
SMALL = [
    "--num_eval_prompts", "4", "--num_validation_prompts", "2", "--num_samples", "16", "--sample_block_prompts", "2",
    "--num_train_pairs", "48", "--num_eval_pairs", "12", "--num_demonstrations", "400", "--sft_num_train_epochs", "1",
    "--seeds", "0", "--ensemble_size", "2", "--num_train_epochs", "1", "--ks", "1.0", "2.0", "--uwo_ks", "1.0",
]  # fmt: skip
# What the stages with jobs write (configs and model cards name their run's folders, so they differ by design).
RESULTS = ("*/adapter_model.safetensors", "*/laplace_posterior.safetensors", "block*.json", "scores.npz", "done.json")


def job_info(fail: bool) -> tuple[int, int]:
    """A job: the process it ran in and its torch threads; or an error."""
    import torch

    if fail:
        raise RuntimeError("job failed on purpose")
    return os.getpid(), torch.get_num_threads()


def test_jobs_run_in_other_processes_on_job_threads_and_errors_come_back():
    import torch

    before = torch.get_num_threads()
    with Workers(1) as workers:
        assert workers.map(job_info, [False, False], progress_bar=False) == [(os.getpid(), JOB_THREADS)] * 2
    assert torch.get_num_threads() == before, "a job run here leaves this process's thread count as it was"
    with Workers(2).start() as workers:
        results = workers.map(job_info, [False] * 4, progress_bar=False)
        assert {threads for _, threads in results} == {JOB_THREADS}
        assert os.getpid() not in {pid for pid, _ in results} and len({pid for pid, _ in results}) <= 2
        with pytest.raises(RuntimeError, match="job failed on purpose"):
            workers.map(job_info, [False, True, False], progress_bar=False)


def test_worker_count_follows_the_cores_and_the_launch():
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert default_num_workers(num_processes=2) == 1  # the launched processes share the stages
    assert resolve_num_workers(None, 1) == default_num_workers(1) >= 1
    assert resolve_num_workers(3, 1) == 3
    with pytest.raises(ValueError, match="--num_workers 2 under a launch of 2 processes"):
        resolve_num_workers(2, 2)
    with pytest.raises(ValueError, match="--num_workers 0: must be >= 1"):
        resolve_num_workers(0, 1)


@pytest.mark.slow
def test_two_workers_write_the_bytes_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(RECIPE, "--output_dir", str(one), *SMALL, "--num_workers", "1")
    # The world and the pairs come from the main process either way: shared, so the second run redoes only the stages
    # with jobs (proxies, samples, scores).
    for stage in ("world", "pairs"):
        shutil.copytree(one / "cache" / stage, two / "cache" / stage)
    result = run_recipe(RECIPE, "--output_dir", str(two), *SMALL, "--num_workers", "2")
    assert "on 2 worker process(es)" in result.stdout
    assert (two / "bon_results.csv").read_bytes() == (one / "bon_results.csv").read_bytes()
    assert (two / "k_selection.csv").read_bytes() == (one / "k_selection.csv").read_bytes()
    files = sorted({p.relative_to(one) for pattern in RESULTS for p in (one / "cache").rglob(pattern)})
    stages = {f.parts[1] for f in files}
    assert {"proxies", "maps", "samples", "scores"} <= stages and len(files) >= 2 * 3 + 2 + 3 + 3 + 4
    assert [f for f in files if (one / f).read_bytes() != (two / f).read_bytes()] == []
