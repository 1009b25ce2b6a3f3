"""Running a recipe as a user does (a subprocess, offline) or its `main` in this process (for checks that must fail
before any work), shared by the recipe tests."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SCRIPTS = RECIPES.parent / "scripts"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_recipe(recipe: Path, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python recipe args...` offline; with `check`, fail the test with the output's tail on a non-zero exit."""
    env = {**os.environ, **OFFLINE_ENV}
    result = subprocess.run(
        [sys.executable, str(recipe), *args], env=env, capture_output=True, text=True, timeout=900, cwd=cwd
    )
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def load_recipe(name: str) -> ModuleType:
    """The recipe `recipes/<name>.py` as a module (recipes/ is a folder of scripts, not a package)."""
    return load_file(RECIPES / f"{name}.py", f"recipes_{name}")


def load_script(name: str) -> ModuleType:
    """The script `scripts/<name>.py` as a module, like `load_recipe`."""
    return load_file(SCRIPTS / f"{name}.py", f"scripts_{name}")


def load_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses resolve their (string) annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def restored_logging():
    """Inside the block a recipe's `main()` may quiet transformers and datasets for its process (log level, progress
    bars); afterwards they are as before, so that the later tests in this process (one of pytest-xdist's workers) see
    what they would see alone."""
    import datasets
    import transformers

    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    dataset_bars = datasets.is_progress_bar_enabled()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        (transformers.logging.enable_progress_bar if bars else transformers.logging.disable_progress_bar)()
        (datasets.enable_progress_bars if dataset_bars else datasets.disable_progress_bars)()


def main_in_process(recipe: Path, *flags: str) -> None:
    """Parse `flags` as `recipe`'s command line does and run its `main` (logging settings restored after)."""
    module = load_recipe(recipe.stem)
    with restored_logging():
        module.main(*module.make_parser().parse_args_and_config(list(flags)))


def assert_fails_before_any_work(recipe: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    """Running `recipe` with `flags` raises an error naming `message`, before any stage wrote to the cache."""
    import pytest

    args = ["--output_dir", str(tmp_path / "x"), *flags] if "--output_dir" not in flags else flags
    with pytest.raises((ValueError, OSError)) as error:
        main_in_process(recipe, *args)
    assert message in str(error.value)
    assert not (tmp_path / "x" / "cache").exists()
