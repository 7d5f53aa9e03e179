"""The reinforcement-learning stage (``minift grpo`` / ``minift rloo``): prompts, rewards, generation inside
the step, and the clipped policy update."""
