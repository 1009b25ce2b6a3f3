"""Independent jobs of the studies' stages dealt to worker processes, so that every core of a CPU machine works: one
proxy (seed, member) trained and fitted, one block of Best-of-N samples, one proxy's scores.

Why worker processes: the offline world's models are too small for a second torch thread to help, so one process keeps
one core busy whatever its thread count; and the jobs of a stage need nothing from each other. Why not the processes
of `accelerate launch`: there a trainer sees a distributed world and trains one model data-parallel (other floats
than one process), while a worker is a world of its own that runs each job exactly as one process does.

Results do not depend on the number of workers. A job runs with `JOB_THREADS` torch threads wherever it runs (a worker,
or this process when there is one worker or one job), under its own seeds, and writes its stage's cache files
(`Stage`), which the recipe reads back: 1 and N workers write the same bytes (tests/test_parallel_stages.py). The
thread count matters: a matrix product split over 2 threads rounds differently from one on 1 thread, so a job on 2
threads trains other weights in the last bits. `JOB_THREADS = 1` is also what `accelerate launch` gives a process on
a CPU machine (OMP_NUM_THREADS=1), i.e. what `make bon` ran each job with before the workers.

Workers are spawned (not forked: a forked torch with live threads can deadlock) once per run: the recipes start them
before the world stage (`Workers.start`), so that their seconds of imports overlap it; a stage with a single job runs
it here. `Workers(1)` runs every job in this process. Under a launch of several processes the stages run data-parallel
over those processes instead (each job in lock-step on all of them), and the workers stay at 1.

Cost: each worker's start-up (imports, ~7 CPU-seconds) and memory (~1 GB resident with the offline world's models).
On a tiny run (tests/test_bon_recipe.py's) that is more than the jobs themselves: pass `--num_workers 1` there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

JOB_THREADS = 1
"""torch threads of every job, in a worker or in this process (see the module docstring)."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or `taskset`'s limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(num_processes: int) -> int:
    """Workers of a run that leaves `num_workers` unset: the usable cores on a machine without CUDA under a one-process
    launch without DeepSpeed (1 torch thread each: no core oversubscribed), else 1 (a GPU runs one job at a time;
    several launched processes already share the stages; a DeepSpeed engine expects its launch's processes)."""
    import torch

    from trl_bayes.distributed import deepspeed_launched

    if num_processes > 1 or torch.cuda.is_available() or deepspeed_launched():
        return 1
    return usable_cores()


def resolve_num_workers(num_workers: int | None, num_processes: int) -> int:
    """`num_workers` (`None` = `default_num_workers`), checked against the launch."""
    if num_workers is None:
        return default_num_workers(num_processes)
    if num_workers < 1:
        raise ValueError(f"--num_workers {num_workers}: must be >= 1 (unset = the usable CPU cores).")
    if num_workers > 1 and num_processes > 1:
        raise ValueError(
            f"--num_workers {num_workers} under a launch of {num_processes} processes: the launched processes already "
            "share the stages. Launch one process (`accelerate launch --num_processes 1`) or drop --num_workers."
        )
    return num_workers


@contextlib.contextmanager
def job_threads() -> Iterator[None]:
    """torch runs on `JOB_THREADS` threads inside the block (the count before is restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(JOB_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker() -> None:
    """Each worker's setup: `JOB_THREADS` torch threads for its whole life, the recipe's quiet logging, and the imports
    every job needs (seconds of start-up, done while the recipe's first stages run)."""
    import datasets
    import torch
    import transformers

    os.environ["OMP_NUM_THREADS"] = str(JOB_THREADS)  # for any library that reads it after this point
    torch.set_num_threads(JOB_THREADS)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    import peft  # noqa: F401
    import trl  # noqa: F401

    from trl_bayes import best_of_n, reward_model, reward_trainer  # noqa: F401


def _ready() -> None:
    """A no-op job: submitted once per worker by `Workers.start`, so that every worker starts (and imports) early."""


class Workers:
    """Runs a stage's independent jobs: `map(fn, jobs)` = `[fn(job) for job in jobs]`, dealt to `num_workers` spawned
    processes (one job at a time each, the next to whichever is free), or run here when `num_workers` is 1.

    `fn` must be a module-level function and each job picklable (a dataclass of paths, numbers, strings); a job writes
    its results to its stage's cache folder and returns at most something small. Use as a context manager, so that the
    workers end with the run (or with its first error).
    """

    def __init__(self, num_workers: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        return self

    def start(self) -> Workers:
        """Start the workers now, in the background: they import torch, transformers and TRL (seconds each) while this
        process works on something else, e.g. the stages before the first one with jobs. No-op with one worker."""
        if self.num_workers > 1:
            for _ in range(self.num_workers):
                self._executor().submit(_ready)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the jobs not started and let the workers exit in the background (seconds of interpreter teardown
        this process need not wait for; Python joins them at its own exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def map(
        self, fn: Callable[[Any], Any], jobs: Sequence[Any], desc: str = "jobs", progress_bar: bool = True
    ) -> list:
        """`fn(job)` of every job, in the order of `jobs`; the first job that fails raises here (the others pending
        are cancelled). A bar over jobs counts them as they finish."""
        from tqdm.auto import tqdm

        jobs = list(jobs)
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress_bar or not jobs)
        try:
            if self.num_workers == 1 or len(jobs) == 1:  # a lone job gains nothing from a worker's start-up
                results = []
                with job_threads():
                    for job in jobs:
                        results.append(fn(job))
                        bar.update()
                return results
            futures = [self._executor().submit(fn, job) for job in jobs]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
            return [future.result() for future in futures]
        finally:
            bar.close()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
            )
        return self._pool

    def inner_progress_bars(self, state) -> bool:
        """Whether a job may show its own progress bar: only where jobs run one at a time, on the main process."""
        return self.num_workers == 1 and state.is_main_process


def run_jobs(fn: Callable[..., Any], jobs: Sequence[Any], workers: Workers | None, state, desc: str) -> None:
    """A stage's jobs: under a launch of several processes each job in lock-step on all of them, `fn(job, state)` (the
    processes share each job's work); otherwise `workers.map(fn, jobs)`, each job alone, `fn(job)` (`None` = 1 worker).
    """
    from tqdm.auto import tqdm

    if state.num_processes > 1:
        for job in tqdm(jobs, desc=desc, disable=not (jobs and state.is_main_process)):
            fn(job, state)
        return
    (workers or Workers(1)).map(fn, jobs, desc, progress_bar=state.is_main_process)
