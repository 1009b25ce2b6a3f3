"""The public surface: every name in `trl_bayes.__all__` imports, the import paths from before the module split keep
working (and name the same objects), every `from trl_bayes... import ...` in the repository resolves, and the
package's import graph has no cycle, deferred (function-level) imports included."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

import trl_bayes

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_bayes"


def test_every_name_in_all_imports():
    assert len(trl_bayes.__all__) == len(set(trl_bayes.__all__))
    for name in trl_bayes.__all__:
        assert getattr(trl_bayes, name) is not None, name


# Where each name lived before `reward.py` and `ppo.py` were split, and where it lives now.
MOVED = {
    "trl_bayes.reward": {
        "reward_model": ["BayesianRewardModel", "scoring_mode", "base_model_state_dict", "save_base_model",
                         "POSTERIOR_WEIGHTS_NAME", "POSTERIOR_CONFIG_NAME", "BASE_MODEL_DIR", "FORMAT_VERSION"],
        "penalties": ["PenalizedReward", "Penalty", "penalized_reward", "combine_gaussians", "prompt_scale",
                             "PENALTY_SCALES", "UNCERTAINTIES"],
        "generation": ["tokenize_response", "pad_token_ids", "eval_mode"],
    },
    "trl_bayes.ppo": {
        "ppo_config": ["PPOConfig"],
        "ppo_trainer": ["PPOTrainer", "PolicyAndValue", "mean_step_seconds"],
        "rlhf": ["AdaptiveKLController", "Rollout", "masked_mean", "whiten", "kl_penalty", "shaped_rewards",
                 "gae_advantages", "policy_loss", "value_loss"],
        "generation": ["completion_mask", "logprobs_from_logits", "entropy_from_logits"],
    },
    "trl_bayes.best_of_n": {"generation": ["chunk_seed", "RefuseNaNLogits"]},
    "trl_bayes.laplace_lora": {"enums": ["HessianStructure", "SubsetOfWeights", "Curvature", "PriorPrecisionMethod",
                                         "KFACApprox"]},
    "trl_bayes.reward_model": {
        "preference_formats": ["preference_format", "preference_pairs", "PREFERENCE_FORMATS"],
        "hub": ["quiet", "verbose", "save_base_model", "base_model_state_dict", "FORMAT_VERSION", "BASE_MODEL_DIR",
                "POSTERIOR_CONFIG_NAME", "POSTERIOR_WEIGHTS_NAME"],
    },
    "trl_bayes.reward_trainer": {"preference_formats": ["check_preference_dataset"]},
}  # fmt: skip


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_name_the_new_objects(old):
    module = importlib.import_module(old)
    for new, names in MOVED[old].items():
        home = importlib.import_module(f"trl_bayes.{new}")
        for name in names:
            assert getattr(module, name) is getattr(home, name), f"{old}.{name} is not trl_bayes.{new}.{name}"


def _imports(path: Path) -> list[tuple[str, int, list[str]]]:
    """Every `from X import a, b` in a file (module level or deferred): (module, level, names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.module or "", node.level, [alias.name for alias in node.names])
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    ]


def test_every_trl_bayes_import_in_the_repository_resolves():
    """`from trl_bayes.X import Y` in recipes/, scripts/ and tests/, deferred ones included, as users write them."""
    files = [p for folder in ("recipes", "scripts", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    checked = 0
    for path in files:
        for module, level, names in _imports(path):
            if level or not (module == "trl_bayes" or module.startswith("trl_bayes.")):
                continue
            imported = importlib.import_module(module)
            for name in names:
                assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
                    f"{path.relative_to(ROOT)}: from {module} import {name}"
                )
                checked += 1
    assert checked > 50  # the scan found the imports


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any depth in the file (function-level imports count)."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from .pkg import module` imports the module; `from .module import name` the module itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = _package_graph()
    assert "trl_bayes.generation" in graph and graph["trl_bayes.reward_model"]  # the scan sees the package
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lower_layers_import_no_reward_model():
    """Generation knows nothing of reward models; the relative variance takes a model without importing its class."""
    graph = _package_graph()
    assert not {m for m in graph["trl_bayes.generation"] if m.startswith("trl_bayes")}
    reward_modules = {"trl_bayes.reward", "trl_bayes.reward_model", "trl_bayes.penalties"}
    assert not graph["trl_bayes.relative_variance"] & reward_modules
    assert "trl_bayes.generation" in graph["trl_bayes.relative_variance"]
