"""``minift score``: rank completions of one prompt with a reward model, best first.

The completions are given, or the labels the reward model's run was configured with
(``" {label}"``), or — with a policy model — ``n`` continuations sampled from it (best-of-n,
``batch_size`` rows per ``generate_many`` batch). Each is scored on prompt + completion exactly as
the reward model was trained: the template and ``[pairs]`` settings come from the model folder's
own ``run_config.json`` (EOS appended when the pairs had it, ``pairs.append_eos`` resolved as in
training; a folder minift did not write is scored as TRL would have trained it).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import split_template
from ..errors import InputError
from ..hub import from_pretrained
from ..tokenizer import load_tokenizer
from .reward import best_of_n, load_reward_model, saved_run_config, score_texts, trained_with_eos

MAX_N = 10_000  # best-of-n prints every continuation: more is a mistake, not a ranking
SAMPLE_BATCH = 256  # best-of-n rows per generate_many batch


def check_best_of_n(n: int, max_new_tokens: int) -> None:
    """``--n`` and ``--max-new-tokens`` of best-of-n, refused before anything is loaded."""
    if not 1 <= n <= MAX_N:
        raise InputError(f"--n {n}: best-of-n samples between 1 and {MAX_N} continuations (each is printed); "
                         "for more, run score again with another --seed")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: best-of-n needs at least 1 new token per "
                         "continuation")


def label_completions(model_dir: str, run_config: dict) -> list[str]:
    """The completions of the labels the reward model's run was configured with."""
    data = run_config.get("data")
    if not isinstance(data, dict) or "template" not in data or "labels" not in data:
        raise InputError(f"{model_dir} has no run_config.json naming its labels (a folder minift reward did "
                         "not write): give the completions to score")
    completion = split_template(data["template"])[1]
    return [completion.format(label=label) for label in data["labels"]]


def rank_completions(model_dir: str, prompt: str, completions: list[str], policy: str | None = None,
                     n: int = 8, max_new_tokens: int = 8, temperature: float = 1.0, top_k: int = 0,
                     seed: int = 0, progress: Callable[[int, int], None] = lambda done, total: None
                     ) -> list[tuple[float, str]]:
    """``(reward, completion)`` pairs, best first."""
    if policy:
        check_best_of_n(n, max_new_tokens)
    model, tokenizer = load_reward_model(model_dir), load_tokenizer(model_dir)
    run_config = saved_run_config(model_dir)
    if policy:
        return best_of_n(from_pretrained(policy), model, prompt, load_tokenizer(policy), tokenizer, n=n,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                         batch_size=SAMPLE_BATCH, progress=progress)
    completions = completions or label_completions(model_dir, run_config)
    eos = [tokenizer.eos_id] if trained_with_eos(run_config, tokenizer) else []
    sequences = [tokenizer.encode(prompt + c) + eos for c in completions]
    for completion, ids in zip(completions, sequences):
        if not ids:
            raise InputError("nothing to score: the prompt and a completion are both empty — give a prompt")
        if len(ids) > model.config.n_positions:
            raise InputError("prompt + completion "
                             f"{completion[:40]!r}{'...' if len(completion) > 40 else ''} is {len(ids)} "
                             f"tokens; the reward model holds {model.config.n_positions} — shorten it")
    rewards = score_texts(model, sequences, tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                          torch.device("cpu"))
    return [(float(rewards[i]), completions[i]) for i in torch.argsort(rewards, descending=True).tolist()]
