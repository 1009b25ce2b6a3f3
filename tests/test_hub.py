"""Hub artifacts, offline: `push_to_hub` (of a `BayesianRewardModel` and of a `BayesianRewardTrainer`) against a
stand-in for `HfApi` that keeps what it receives, then `from_pretrained("org/name", revision=...)` from a local Hugging
Face cache holding those files in huggingface_hub's own layout, with `HF_HUB_OFFLINE=1`. The model must come back
identical (same predictions, same posterior tensors) with its card; the card's text is checked."""

from __future__ import annotations

import hashlib
import os
import types
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import transformers.trainer
from huggingface_hub import CommitInfo, ModelCard, scan_cache_dir
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects

import trl_bayes.hub
from trl_bayes import BayesianRewardModel
from trl_bayes.experiments.world import make_preference_dataset
from trl_bayes.hub import BASE_MODEL_DIR, POSTERIOR_CONFIG_NAME, POSTERIOR_WEIGHTS_NAME, save_base_model
from trl_bayes.laplace_lora import laplace_tensors
from trl_bayes.model_card import TAGS, model_card

from .conftest import make_trainer
from .recipe_runs import RECIPES, main_in_process

REPO_ID = "org/bayes-rm"
PROMPTS, COMPLETIONS = ["name a few tools : ", "please list fruits : "], ["hammer saw", "dog dog"]


class FakeHub:
    """What the Hub would hold: per (repo, revision), the files of the last commit, as bytes. Stands in for `HfApi`
    (`create_repo`, `upload_folder`), honouring `ignore_patterns` as the real one does."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.commits: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}

    def __call__(self, *args, **kwargs):  # `HfApi(library_name=...)` and transformers' `hf_api()` return the hub
        return self

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.setdefault(repo_id, {"private": private})
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self, repo_id, folder_path, commit_message=None, revision=None, ignore_patterns=None, create_pr=False, **kwargs
    ):
        assert repo_id in self.repos, "upload before create_repo"
        folder = Path(folder_path)
        paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        files = {
            path: (folder / path).read_bytes() for path in filter_repo_objects(paths, ignore_patterns=ignore_patterns)
        }
        oid = hashlib.sha1(b"".join(path.encode() + data for path, data in files.items())).hexdigest()
        self.commits[(repo_id, revision or "main")] = (oid, files)
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message, "", oid)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.commits[(repo_id, revision)][1]


def populate_cache(cache_dir: Path, hub: FakeHub, repo_id: str, revision: str = "main") -> str:
    """Put a commit of `hub` into `cache_dir` as `snapshot_download` would have: `models--org--name/` with the files
    in `blobs/` (named by their sha256), `snapshots/<commit>/<path>` symlinks to them and `refs/<revision>` holding
    the commit. Returns the commit."""
    oid, files = hub.commits[(repo_id, revision)]
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    for path, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / oid / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(oid)
    return oid


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(trl_bayes.hub, "HfApi", fake)
    monkeypatch.setattr(transformers.trainer, "hf_api", fake)
    return fake


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the variable and the constant it became.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    trainer = make_trainer(tokenizer, tmp_path_factory.mktemp("rm"), num_pairs=16)
    trainer.train()
    metrics = trainer.evaluate_posterior(make_preference_dataset(8, seed=5))
    return trainer, metrics


def assert_same_model(loaded: BayesianRewardModel, original: BayesianRewardModel) -> None:
    expected, got = laplace_tensors(original.laplace), laplace_tensors(loaded.laplace)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    for a, b in zip(loaded.predict(PROMPTS, COMPLETIONS), original.predict(PROMPTS, COMPLETIONS), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_model_push_to_hub_then_from_pretrained_offline(trained, hub, offline, tmp_path):
    trainer, metrics = trained
    posterior = trainer.posterior
    commit = posterior.push_to_hub(REPO_ID, dataset_name="org/prefs", private=True)
    assert commit.oid == hub.commits[(REPO_ID, "main")][0] and hub.repos[REPO_ID] == {"private": True}
    files = hub.files(REPO_ID)
    adapter = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"]
    posterior_files = [
        POSTERIOR_WEIGHTS_NAME,
        POSTERIOR_CONFIG_NAME,
        "base_model/config.json",
        "base_model/model.safetensors",
    ]
    for name in adapter + posterior_files:
        assert name in files, f"{name} was not uploaded; got {sorted(files)}"

    card = ModelCard(files["README.md"].decode())
    assert set(TAGS) <= set(card.data.tags) and card.data.library_name == "peft"
    assert card.data.datasets == ["org/prefs"] and card.data.base_model is None  # built from a config: in base_model/
    assert f'BayesianRewardModel.from_pretrained("{REPO_ID}")' in card.text
    assert f"On {metrics['num_pairs']} held-out preference pairs" in card.text
    assert f"| Bradley-Terry NLL | {metrics['map_nll']:.4f} | {metrics['laplace_probit_nll']:.4f} |" in card.text

    cache = tmp_path / "hub_cache"
    oid = populate_cache(cache, hub, REPO_ID)
    (cached,) = scan_cache_dir(cache).repos  # huggingface_hub reads the layout as one of its own downloads
    assert cached.repo_id == REPO_ID and {r.commit_hash for r in cached.revisions} == {oid}
    loaded = BayesianRewardModel.from_pretrained(REPO_ID, cache_dir=cache)
    assert_same_model(loaded, posterior)
    assert loaded.metadata["eval_metrics"] == pytest.approx(metrics)
    # The card comes back with the model, and the model regenerates the same card.
    snapshot = cache / repo_folder_name(repo_id=REPO_ID, repo_type="model") / "snapshots" / oid
    assert (snapshot / "README.md").read_text() == files["README.md"].decode()
    assert str(loaded.model_card(REPO_ID, dataset_name="org/prefs")) == str(card)


def test_from_pretrained_takes_a_revision(trained, hub, offline, tmp_path):
    trainer, _ = trained
    posterior = trainer.posterior
    cache = tmp_path / "hub_cache"
    posterior.push_to_hub(REPO_ID)
    main_oid = populate_cache(cache, hub, REPO_ID)
    # A "v2" branch: the same adapter with another prior precision.
    prior = posterior.prior_precision
    posterior.laplace.prior_precision = 2 * prior
    try:
        posterior.push_to_hub(REPO_ID, revision="v2")
    finally:
        posterior.laplace.prior_precision = prior
    populate_cache(cache, hub, REPO_ID, revision="v2")
    assert BayesianRewardModel.from_pretrained(
        REPO_ID, revision="v2", cache_dir=cache
    ).prior_precision == pytest.approx(2 * prior)
    for revision in (None, "main", main_oid):  # the default branch, by name, and by commit
        loaded = BayesianRewardModel.from_pretrained(REPO_ID, revision=revision, cache_dir=cache)
        assert loaded.prior_precision == pytest.approx(prior)


def test_a_base_model_named_by_its_hub_id_is_not_uploaded_and_loads_from_the_cache(trained, hub, offline, tmp_path):
    posterior = trained[0].posterior
    save_base_model(posterior.model, tmp_path)  # the base model as its own repository, as on the Hub
    hub.create_repo("org/tiny-base")
    hub.upload_folder("org/tiny-base", tmp_path / BASE_MODEL_DIR)
    posterior.metadata["base_model"] = "org/tiny-base"
    try:
        posterior.push_to_hub(REPO_ID)
    finally:
        posterior.metadata["base_model"] = None
    files = hub.files(REPO_ID)
    assert not any(name.startswith(BASE_MODEL_DIR) for name in files)
    assert ModelCard(files["README.md"].decode()).data.base_model == "org/tiny-base"
    cache = tmp_path / "hub_cache"
    populate_cache(cache, hub, REPO_ID)
    populate_cache(cache, hub, "org/tiny-base")
    loaded = BayesianRewardModel.from_pretrained(REPO_ID, cache_dir=cache)  # the base from the same cache
    assert loaded.metadata["base_model"] == "org/tiny-base"
    assert_same_model(loaded, posterior)


def test_trainer_push_to_hub_uploads_the_posterior_and_its_card(tokenizer, hub, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8, hub_model_id=REPO_ID)
    trainer.train()
    trainer.push_to_hub(dataset_name="org/prefs")
    files = hub.files(REPO_ID)
    assert {
        "adapter_model.safetensors",
        POSTERIOR_WEIGHTS_NAME,
        POSTERIOR_CONFIG_NAME,
        "base_model/config.json",
    } <= set(files)
    uploaded = safetensors.torch.load(files[POSTERIOR_WEIGHTS_NAME])
    for name, tensor in laplace_tensors(trainer.posterior.laplace).items():
        assert torch.equal(uploaded[name], tensor), name
    card = ModelCard(files["README.md"].decode())
    assert set(TAGS) | {"reward-trainer"} <= set(card.data.tags)
    assert card.data.model_name == "bayes-rm" and card.data.datasets == ["org/prefs"]
    assert "## Laplace posterior" in card.text and "Not evaluated on held-out pairs" in card.text


def test_a_model_on_a_local_base_is_not_pushed(tokenizer, hub, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_pairs=8)
    trainer.fit_posterior()
    trainer.posterior.metadata["base_model"] = str(tmp_path)  # as for a base model loaded from a local folder
    with pytest.raises(ValueError, match="local folder .* others cannot download"):
        trainer.posterior.push_to_hub(REPO_ID)
    assert not hub.commits


def test_missing_repositories_fail_clearly(offline, tmp_path):
    with pytest.raises(LocalEntryNotFoundError, match="HF_HUB_OFFLINE"):
        BayesianRewardModel.from_pretrained("org/not-cached", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repository id"):
        BayesianRewardModel.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


# ---------------------------------------------------------------------------------------------------------------------
# The card's text, from a config alone.

CONFIG = {
    "format_version": 1,
    "hessian_structure": "kron",
    "subset_of_weights": "all",
    "kfac_approx": "reduce_masked",
    "curvature": "ggn",
    "optimize_prior_precision": "marglik",
    "n_data": 20000,
    "n_params": 123456,
    "base_model": "EleutherAI/pythia-70m",
    "parameters": [],
    "prior_precision": [0.25],
    "loss": 1.0,
}


def test_card_renders_settings_metrics_and_usage():
    metrics = {"map_accuracy": 0.7, "map_nll": 0.55, "map_ece": 0.08, "laplace_probit_nll": 0.52, "laplace_ece": 0.03}
    metrics["num_pairs"] = 1000
    card = model_card({**CONFIG, "eval_metrics": metrics}, REPO_ID, dataset_name="Anthropic/hh-rlhf", tags=["x"])
    reparsed = ModelCard(str(card))  # what the Hub reads back: YAML metadata + markdown
    assert reparsed.data.base_model == "EleutherAI/pythia-70m" and reparsed.data.datasets == ["Anthropic/hh-rlhf"]
    assert reparsed.data.tags == [*TAGS, "lora", "x"] and reparsed.data.library_name == "peft"
    text = reparsed.text
    assert "# Model Card for bayes-rm" in text
    base = "[EleutherAI/pythia-70m](https://huggingface.co/EleutherAI/pythia-70m)"
    data = "[Anthropic/hh-rlhf](https://huggingface.co/datasets/Anthropic/hh-rlhf)"
    assert f"LoRA reward model on {base}, trained on the {data} dataset" in text
    for row in (
        "| Curvature structure (`hessian_structure`) | `kron` |",
        "| Weights with a posterior (`subset_of_weights`) | `all` |",
        "| Number of Laplace weights | 123,456 |",
        "| K-FAC token treatment (`kfac_approx`) | `reduce_masked` |",
        "| Prior precision | 0.25 (chosen by `marglik`) |",
        "| Preference pairs in the fit | 20,000 |",
        "On 1000 held-out preference pairs:",
        "| Accuracy | 0.7000 | 0.7000 |",
        "| Bradley-Terry NLL | 0.5500 | 0.5200 |",
        "| Expected calibration error | 0.0800 | 0.0300 |",
        'reward_model = BayesianRewardModel.from_pretrained("org/bayes-rm")',
        "- laplace-torch: 0.3",
    ):
        assert row in text, row
    assert "base_model/" not in text  # the base comes from the Hub


def test_card_without_metrics_or_hub_base():
    config = {**CONFIG, "hessian_structure": "diag", "base_model": None, "optimize_prior_precision": None}
    text = str(model_card(config))
    assert "a base model built from a config (its weights are in `base_model/`)" in text
    assert "Not evaluated on held-out pairs" in text and "| Accuracy" not in text
    assert "kfac_approx" not in text  # a K-FAC setting only
    assert "| Prior precision | 0.25 (fixed) |" in text


def test_the_reward_recipe_pushes_a_model_that_comes_back_identical_with_its_card(hub, offline, tmp_path):
    out = tmp_path / "rm"
    main_in_process(RECIPES / "reward.py", "--output_dir", str(out), "--num_train_pairs", "48", "--num_eval_pairs",
                    "12", "--num_train_epochs", "1", "--push_to_hub", "true", "--hub_model_id", REPO_ID)  # fmt: skip
    files = hub.files(REPO_ID)
    assert {POSTERIOR_WEIGHTS_NAME, POSTERIOR_CONFIG_NAME, "adapter_model.safetensors", "README.md"} <= set(files)
    cache = tmp_path / "hf-cache"
    populate_cache(cache, hub, REPO_ID)
    assert_same_model(
        BayesianRewardModel.from_pretrained(REPO_ID, cache_dir=cache), BayesianRewardModel.from_pretrained(out)
    )
    card = ModelCard(files["README.md"].decode())
    assert set(TAGS) <= set(card.data.tags)
    assert "Not evaluated on held-out pairs" not in card.text  # the recipe evaluated the posterior before the push
