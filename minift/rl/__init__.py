"""The RL stage of RLHF (``minift grpo`` / ``minift rloo``): sample completions from the policy,
score them with rewards, and move the policy with a clipped policy-gradient update, as TRL's
GRPOTrainer and RLOOTrainer do. Each file holds one part; docs/grpo.md walks through a step."""
