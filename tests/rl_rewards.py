"""Reward functions with TRL's signature for the RL stage's tests (``rl.reward_funcs = ["rl_rewards:name"]``,
this folder on PYTHONPATH): ones with a signal on random models, and ones that misbehave."""
from __future__ import annotations


def vowels(completions, **kwargs):
    """Share of vowels among the completion's characters: a signal even a random model's samples carry."""
    return [sum(c in "aeiou" for c in text) / max(1, len(text)) for text in completions]


def longer_prompt(prompts, completions, label=None, **kwargs):
    """Uses the prompt and the tweets' ``label`` column; None (does not apply) for neutral tweets."""
    return [None if gold == "neutral" else len(p) / 100 - len(c) / 50
            for p, c, gold in zip(prompts, completions, label)]


async def vowels_async(completions, **kwargs):
    return vowels(completions)


def raises(completions, **kwargs):
    raise KeyError("no such column")


def wrong_length(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(completions, **kwargs):
    return [float("nan")] * len(completions)


NOT_CALLABLE = 3
