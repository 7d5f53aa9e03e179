"""The preference stage: learning from pairs of completions, one preferred over the other.

    pairs.py    pairs from the tweets or a TRL-format source, tokenized as TRL does, collated; the
                pair loss object and the held-out pair evaluation every pair objective shares
    dpo.py      Direct Preference Optimization (sigmoid / ipo / hinge), against a frozen or
                precomputed reference
    reward.py   the reward model (scalar head, Bradley–Terry loss) in transformers' layout
    config.py   their config sections: [pairs], [dpo], [reward]
    recipe.py   ``minift dpo`` and ``minift reward``: ``build_*_stage``, run by ``orchestration.run_stage``
    score.py    ``minift score``: rank completions (or best-of-n samples) with a reward model
"""
import importlib

_PUBLIC = {"DPOObjective": "dpo", "SequenceLogProbs": "dpo", "dpo_losses": "dpo", "PairCollator": "pairs",
           "PairLoss": "pairs", "PairObjective": "pairs", "TokenizedPairs": "pairs",
           "evaluate_pairs": "pairs", "load_pairs": "pairs", "tokenize_pairs": "pairs",
           "tweet_pairs": "pairs", "PreferenceConfig": "config",
           "load_preference_config": "recipe", "run_dpo": "recipe", "run_reward": "recipe",
           "RewardModel": "reward", "load_reward_model": "reward"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    # the stage's modules pull in `datasets`: imported when first asked for (``minift --help`` stays quick)
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
