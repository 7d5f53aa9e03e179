"""``minift dpo | reward | score``: the preference stage's commands (added to ``minift.cli``'s parser)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

def cmd_preference(args) -> int:
    from .preference_run import load_preference_config, run_dpo, run_reward

    from .cli import resume_of

    cfg, pref = load_preference_config(args.config, args.set or [])
    summary = (run_dpo if args.command == "dpo" else run_reward)(
        cfg, pref, resume=resume_of(args), overwrite=args.overwrite, resume_with_changes=args.resume_with_changes)
    return 0 if summary else 1


def cmd_score(args) -> int:
    """Rank candidate completions of one prompt by reward (best first). Without candidates, the
    candidates are the labels the reward model's run was configured with (`` {label}``); with
    ``--policy``, ``--n`` continuations sampled from that model (best-of-n)."""
    from .data import split_template
    from .hub import from_pretrained
    from .reward import best_of_n, load_reward_model, score_texts
    from .tokenizer import load_tokenizer

    model = load_reward_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.policy:
        ranked = best_of_n(from_pretrained(args.policy), model, args.prompt, load_tokenizer(args.policy), tokenizer,
                           n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)
        for reward, text in ranked:
            print(f"{reward:+.4f}\t{text!r}")
        return 0
    candidates = args.candidates
    if not candidates:
        run_config = json.loads((Path(args.model) / "run_config.json").read_text())["data"]
        completion = split_template(run_config["template"])[1]
        candidates = [completion.format(label=label) for label in run_config["labels"]]
    sequences = [tokenizer.encode(args.prompt + c) for c in candidates]
    rewards = score_texts(model, sequences, tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                          torch.device("cpu"))
    for i in torch.argsort(rewards, descending=True).tolist():
        print(f"{rewards[i]:+.4f}\t{candidates[i]!r}")
    return 0


def add_preference_commands(sub) -> None:
    from .cli import add_run_arguments  # the options minift train has (called while cli builds its parser)

    for name, text in (("dpo", "DPO on preference pairs as a TOML config says ([pairs], [dpo])"),
                       ("reward", "train a reward model on preference pairs ([pairs], [reward])")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="TOML config (configs/dpo-tweets.toml, configs/reward-tweets.toml)")
        add_run_arguments(p)
        p.set_defaults(func=cmd_preference)
    score = sub.add_parser("score", help="rank candidate completions of a prompt with a reward model")
    score.add_argument("prompt", help='e.g. "what a lovely day sentiment:"')
    score.add_argument("candidates", nargs="*", help="completions (default: the model's configured labels)")
    score.add_argument("--model", required=True, help="a reward model directory (<output_dir>/model of minift reward)")
    score.add_argument("--policy", help="best-of-n: sample the candidates from this model (e.g. <output_dir>/model "
                                        "of minift train or minift dpo) instead of taking them as arguments")
    score.add_argument("--n", type=int, default=8, help="best-of-n: how many continuations to sample")
    score.add_argument("--max-new-tokens", type=int, default=8, help="best-of-n: tokens per continuation")
    score.add_argument("--temperature", type=float, default=1.0, help="best-of-n: sampling temperature (0 = greedy)")
    score.add_argument("--top-k", type=int, default=0, help="best-of-n: sample from the k likeliest tokens (0 = all)")
    score.add_argument("--seed", type=int, default=0, help="best-of-n: seed of the sampling")
    score.set_defaults(func=cmd_score)
