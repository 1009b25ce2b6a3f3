"""The experiments the recipes run (recipes/bon.py, ppo.py, grpo.py, reward.py): the offline world, the cached stages
every study shares, the studies' machinery and their reports. The recipes are thin scripts over these modules; the
scripts of scripts/ and the tests import them from here.

    world.py            the offline world: tokenizer, tiny GPT-NeoX, instructions, demonstrations, gold, SFT policy
    stages.py           WorldArguments; Stage (a cached folder), StageClock; the world and preference-pairs stages
    gold.py             the gold reward (the world's function or a reward model), sharded over processes
    proxies.py          the proxies stage (LoRA reward models + Laplace posteriors), their cache keys, PROXY_DEFAULTS
    launch.py           a recipe's parser, Accelerator and output folder; `fill_defaults` for `main()` from Python
    best_of_n_study.py  Best-of-N samples and scores (cached), methods, curves, the k chosen on validation
    ppo_study.py        the PPO runs (cached, dealt to worker processes): MAP, LA, LA-rel, LA-Ens, Ens-UWO and the
                        typicality baselines (Prior-rel, Hidden-Euc, Hidden-Maha), at any KL coefficient
    grpo_study.py       TRL's GRPO / RLOO runs (cached) with `PenalizedReward`, their gold evaluation
    preference_data.py  preference pairs of the reward recipe (offline, Hub, local file or folder)
    reward_study.py     the reward recipe's model + LoRA, its held-out check and summary
    active_study.py     active reward learning (recipes/active.py): the pool, rounds of selection, retraining, metrics
    report.py           CSV, the run record (config.json), mean ± std cells, sources
    best_of_n_report.py Best-of-N tables, figures, diagnostics, summary.md
    rl_report.py        PPO / GRPO tables, figures, summary.md; the gold-vs-KL frontier of the KL study

Nothing is imported here: each recipe imports the modules it needs (most import torch, transformers or TRL lazily).
"""
