"""The model card of a Bayesian reward model, the README.md of its folder and Hub repository: base model, data, the
Laplace settings, held-out accuracy / Bradley-Terry NLL / calibration of the MAP reward and of the Laplace predictive,
and how to load and use it. Built from `laplace_config.json` alone (`BayesianRewardModel.posterior_config()`), so a
model reloaded from the Hub can be pushed again with the same card.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["trl", "reward-model", "laplace", "trl_bayes"]
"""Tags of every Bayesian reward model card (PEFT's `lora` and the caller's come on top)."""

PAPER_CITATION = """@article{yang2024bayesian,
  title   = {{Bayesian Reward Models for LLM Alignment}},
  author  = {Yang, Adam X. and Robeyns, Maxime and Coste, Thomas and Shi, Zhengyan and Wang, Jun and Bou-Ammar, Haitham and Aitchison, Laurence},
  journal = {arXiv preprint arXiv:2402.13210},
  year    = {2024}
}"""

TRL_CITATION = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""

# Modeled on TRL's `templates/rm_model_card.md`; `huggingface_hub.ModelCard` renders it with Jinja.
TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

A Bayesian reward model: a LoRA reward model on {{ base_model_text }}{% if dataset_name %}, trained on the \
[{{ dataset_name }}](https://huggingface.co/datasets/{{ dataset_name }}) dataset{% endif %} with \
[TRL](https://github.com/huggingface/trl)'s `RewardTrainer` (Bradley-Terry loss, the MAP estimate), plus a Laplace \
posterior over its adapter weights (Laplace-LoRA, [Bayesian Reward Models for LLM Alignment]\
(https://huggingface.co/papers/2402.13210)). Every reward is a Gaussian N(mean, var): `mean` is the MAP reward, `var` \
the linearized (GLM) predictive variance, large where the preference data say little.

## Quick start

```python
from trl_bayes import BayesianRewardModel, PenalizedReward

reward_model = BayesianRewardModel.from_pretrained("{{ repo_id }}")
mean, var = reward_model.predict(["What color is the sky?"], [" It is blue."])  # each reward ~ N(mean, var)
diff_mean, diff_var = reward_model.predict_pairs(prompts, chosen, rejected)  # r(chosen) - r(rejected)

# TRL reward functions for GRPOTrainer(reward_funcs=[reward], ...) and Best-of-n, which score several completions
# per prompt. The default penalizes atypical completions (hidden-state distance within the prompt's completions); the
# second penalizes the Laplace posterior's relative std. PPO (one completion per prompt): uncertainty="marginal".
reward = PenalizedReward(reward_model)
laplace_reward = PenalizedReward(reward_model, penalty="std", k=1.0, uncertainty="relative", scale="absolute")
```

## Laplace posterior

| Setting | Value |
|---|---|
{% for name, value in settings %}| {{ name }} | {{ value }} |
{% endfor %}
Files: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) and tokenizer, \
`laplace_posterior.safetensors` (the posterior's tensors) and `laplace_config.json` (these settings){% if not \
base_model %}, and the base model under `base_model/`{% endif %}.

## Evaluation

{% if evaluation %}On {{ num_eval_pairs ~ " " if num_eval_pairs }}held-out preference pairs:

| Metric | MAP reward | Laplace predictive |
|---|---|---|
{% for name, map_value, laplace_value in evaluation %}| {{ name }} | {{ map_value }} | {{ laplace_value }} |
{% endfor %}
The Laplace predictive is p(chosen > rejected) = sigmoid(mean / sqrt(1 + pi/8 var)) over the reward difference: it keeps \
the sign of the MAP difference, so the accuracy is the MAP's, and only the confidence (NLL, ECE) changes.
{% else %}Not evaluated on held-out pairs: `BayesianRewardTrainer.evaluate_posterior(eval_dataset)` before saving \
fills this section.
{% endif %}
### Framework versions

{% for name, value in versions %}- {{ name }}: {{ value }}
{% endfor %}
## Citations

Cite Bayesian reward models (Laplace-LoRA) as:

```bibtex
{{ paper_citation }}
```

Cite TRL as:

```bibtex
{{ trl_citation }}
```
"""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def hub_base_model(config: Mapping[str, Any]) -> str | None:
    """The base model's Hub id, or `None` when the base weights travel with the adapter (`base_model/`, a model built
    from a config). A local folder is no Hub id: others could not load the model from it.

    Raises:
        ValueError: the base model is a local folder.
    """
    base = config.get("base_model")
    if base and os.path.isdir(base):
        raise ValueError(
            f"The base model is the local folder {base!r}, which others cannot download. Record its Hub id before "
            "pushing (`model.metadata['base_model'] = 'org/name'`), or load the base model by its Hub id."
        )
    return base or None


def model_card(
    config: Mapping[str, Any],
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """The model card of a Bayesian reward model.

    Args:
        config: what `laplace_config.json` holds (`BayesianRewardModel.posterior_config()`), with `eval_metrics`
            (`diagnostics.pair_metrics` plus `num_pairs`) when the model was evaluated on held-out pairs.
        repo_id: the Hub repository (`org/name`), for the usage snippet; `None` for a local folder.
        model_name: the model's name in the card's title; defaults to the repository's name.
        dataset_name: the Hub id of the preference data set, if it has one.
        tags: more tags, on top of `TAGS` and `lora`.
    """
    base = config.get("base_model")
    hub_base = None if base and os.path.isdir(base) else base or None
    if hub_base:
        base_model_text = f"[{hub_base}](https://huggingface.co/{hub_base})"
    elif base:
        base_model_text = f"the local model `{base}`"
    else:
        base_model_text = "a base model built from a config (its weights are in `base_model/`)"
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "a Bayesian reward model")
    card_data = ModelCardData(
        base_model=hub_base,
        datasets=[dataset_name] if dataset_name else None,
        library_name="peft",
        model_name=model_name,
        tags=list(dict.fromkeys([*TAGS, "lora", *tags])),
    )
    prior = config["prior_precision"]  # a list, as laplace-torch's prior precision may be one per weight
    prior_text = f"{prior[0]:.4g}" if len(prior) == 1 else f"one per weight (mean {sum(prior) / len(prior):.4g})"
    method = config.get("optimize_prior_precision")
    prior_text += f" (chosen by `{method}`)" if method else " (fixed)"
    settings = [
        ("Curvature structure (`hessian_structure`)", f"`{config['hessian_structure']}`"),
        ("Weights with a posterior (`subset_of_weights`)", f"`{config['subset_of_weights']}`"),
        ("Number of Laplace weights", f"{config['n_params']:,}"),
        ("Curvature of the Bradley-Terry loss (`curvature`)", f"`{config.get('curvature', 'ggn')}`"),
    ]
    if config["hessian_structure"] == "kron":
        settings.append(("K-FAC token treatment (`kfac_approx`)", f"`{config['kfac_approx']}`"))
    settings += [("Prior precision", prior_text), ("Preference pairs in the fit", f"{config['n_data']:,}")]
    metrics = config.get("eval_metrics") or {}
    evaluation = []
    if metrics:
        accuracy = f"{metrics['map_accuracy']:.4f}"
        evaluation = [
            ("Accuracy", accuracy, accuracy),
            ("Bradley-Terry NLL", f"{metrics['map_nll']:.4f}", f"{metrics['laplace_probit_nll']:.4f}"),
            ("Expected calibration error", f"{metrics['map_ece']:.4f}", f"{metrics['laplace_ece']:.4f}"),
        ]
    versions = [
        (name, _version(package))
        for name, package in [
            ("trl_bayes", "trl_bayes"),
            ("TRL", "trl"),
            ("Transformers", "transformers"),
            ("PEFT", "peft"),
            ("PyTorch", "torch"),
            ("laplace-torch", "laplace-torch"),
        ]
    ]
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        repo_id=repo_id or "path/to/this/folder",
        base_model=hub_base,
        base_model_text=base_model_text,
        dataset_name=dataset_name,
        settings=settings,
        evaluation=evaluation,
        num_eval_pairs=metrics.get("num_pairs"),
        versions=versions,
        paper_citation=PAPER_CITATION,
        trl_citation=TRL_CITATION,
    )
