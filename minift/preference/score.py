"""``minift score``: rank completions of one prompt with a reward model, best first.

The completions are given, or the labels the reward model's run was configured with
(``" {label}"``), or — with a policy model — ``n`` continuations sampled from it (best-of-n).
Each is scored on prompt + completion exactly as the reward model was trained: the template and
``[pairs]`` settings come from the model folder's own ``run_config.json`` (EOS appended when the
pairs had it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import split_template
from ..errors import InputError
from ..hub import from_pretrained
from ..tokenizer import load_tokenizer
from .reward import best_of_n, load_reward_model, score_texts


def saved_run_config(model_dir: str | Path) -> dict:
    """The run config a minift model folder was trained with ({} for a folder minift did not write)."""
    path = Path(model_dir) / "run_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a minift run config ({err}) — remove it, or pass the completions") from None


def rank_completions(model_dir: str, prompt: str, completions: list[str], policy: str | None = None, n: int = 8,
                     max_new_tokens: int = 8, temperature: float = 1.0, top_k: int = 0, seed: int = 0
                     ) -> list[tuple[float, str]]:
    """``(reward, completion)`` pairs, best first."""
    model, tokenizer = load_reward_model(model_dir), load_tokenizer(model_dir)
    run_config = saved_run_config(model_dir)
    if policy:
        return best_of_n(from_pretrained(policy), model, prompt, load_tokenizer(policy), tokenizer, n=n,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    if not completions:
        if "data" not in run_config:
            raise InputError(f"{model_dir} has no run_config.json naming its labels: give the completions to score")
        completion = split_template(run_config["data"]["template"])[1]
        completions = [completion.format(label=label) for label in run_config["data"]["labels"]]
    eos = [tokenizer.eos_id] if run_config.get("pairs", {}).get("append_eos") and tokenizer.eos_id is not None else []
    sequences = [tokenizer.encode(prompt + c) + eos for c in completions]
    rewards = score_texts(model, sequences, tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                          torch.device("cpu"))
    return [(float(rewards[i]), completions[i]) for i in torch.argsort(rewards, descending=True).tolist()]
