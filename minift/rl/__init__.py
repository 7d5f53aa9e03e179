"""The RL stage of RLHF (``minift grpo`` / ``minift rloo``): sample completions from the policy,
score them with rewards, and move the policy with a clipped policy-gradient update, as TRL's
GRPOTrainer and RLOOTrainer do. Each file holds one part; docs/grpo.md walks through a step.

    prompts.py     the prompts and the order they are drawn in
    generation.py  sampling with the KV cache
    rewards.py     the rule, reward models and callables
    advantages.py  rewards -> advantages and their metrics
    batching.py    a round's layout and micro-batches
    round.py       one sampled, scored round -> this rank's micro-batches
    objective.py   the GRPO and RLOO loss objects
    replay.py      the completions file
    source.py      the step source the loop runs: rounds in TRL's order, resumable
    config.py      the [rl] section
    recipe.py      build_grpo_stage, run by orchestration.run_stage
"""
