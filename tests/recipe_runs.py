"""Running a recipe as a user does (a subprocess, offline) or its `main` in this process (for checks that must fail
before any work), shared by the recipe tests."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run_recipe(recipe: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python recipe args...` offline; with `check`, fail the test with the output's tail on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(recipe), *args], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def main_in_process(recipe: Path, *flags: str) -> None:
    """Parse `flags` as `recipe` does (its default config included) and run its `main`."""
    sys.path.insert(0, str(RECIPES))
    try:
        module = importlib.import_module(recipe.stem)
    finally:
        sys.path.remove(str(RECIPES))
    module.run_script(module.make_parser, module.main, module.DEFAULT_CONFIG, list(flags))


def assert_fails_before_any_work(recipe: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    """Running `recipe` with `flags` raises an error naming `message`, before any stage wrote to the cache."""
    import pytest

    args = ["--output_dir", str(tmp_path / "x"), *flags] if "--output_dir" not in flags else flags
    with pytest.raises((ValueError, OSError)) as error:
        main_in_process(recipe, *args)
    assert message in str(error.value)
    assert not (tmp_path / "x" / "cache").exists()
