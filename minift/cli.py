"""``minift train | eval | predict | generate | dpo | reward | score`` on top of the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import RunConfig, RunConfigError, describe, load_config
from .preference_cli import add_preference_commands


def _load_for_inference(model_dir: str):
    from .hub import from_pretrained
    from .tokenizer import load_tokenizer

    model = from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    run_config_path = Path(model_dir) / "run_config.json"
    data = RunConfig().data
    if run_config_path.exists():
        saved = json.loads(run_config_path.read_text())["data"]
        data.template, data.labels = saved["template"], saved["labels"]
    return model, tokenizer, data


def cmd_train(args) -> int:
    from .finetune import run

    cfg = load_config(args.config, args.set or [])
    resume = True if args.resume == "latest" else args.resume
    summary = run(cfg, resume=resume)
    return 0 if summary else 1


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.set or [])
    from .finetune import evaluate_only

    result = evaluate_only(cfg, args.model)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


def cmd_predict(args) -> int:
    from .data import format_prompt, label_token_ids
    from .evaluate import label_log_probs

    model, tokenizer, data = _load_for_inference(args.model)
    if args.template:
        data.template = args.template
    labels = tuple(data.labels)
    label_ids = label_token_ids(tokenizer, data.template, labels)
    prompts = [tokenizer.encode(format_prompt(text, data.template)) for text in args.text]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = label_log_probs(model, prompts, label_ids, pad, torch.device("cpu"))
    for text, row in zip(args.text, scores):
        probs = torch.softmax(row, dim=0)
        best = int(probs.argmax())
        shown = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, probs.tolist()))
        print(f"{labels[best]}\t({shown})\t{text}")
    return 0


def cmd_generate(args) -> int:
    """Sampling recomputes the whole prefix at every new token (no KV cache): simple and
    exact, O(T^2) per sequence, fine for tweet-length continuations."""
    model, tokenizer, _ = _load_for_inference(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    with torch.no_grad():
        for _ in range(args.max_new_tokens):
            context = torch.tensor([ids[-model.config.n_positions:]])
            logits = model(context)[0, -1].float()
            if args.temperature <= 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / args.temperature
                if args.top_k:
                    kth = torch.topk(logits, min(args.top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))
            ids.append(next_id)
            if next_id == tokenizer.eos_id:
                break
    print(tokenizer.decode(ids, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune as a TOML config says",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="options (set in the TOML file or with --set section.key=value):\n" + describe())
    train.add_argument("config", nargs="?", help="TOML config (configs/*.toml); defaults when omitted")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the newest intact checkpoint in output_dir, or from CHECKPOINT")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="loss, perplexity and label accuracy of a model on the eval split")
    ev.add_argument("config", nargs="?")
    ev.add_argument("--model", help="model directory or hub name (default: the config's model.name)")
    ev.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="sentiment of one or more texts, with the label probabilities")
    pr.add_argument("text", nargs="+")
    pr.add_argument("--model", required=True, help="a trained model directory (<output_dir>/model)")
    pr.add_argument("--template", help="prompt template (default: the one the model was trained with)")
    pr.set_defaults(func=cmd_predict)

    gen = sub.add_parser("generate", help="sample a continuation (recomputes the prefix each token, no KV cache)")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    add_preference_commands(sub)  # dpo, reward, score (minift/preference_cli.py)
    sub.add_parser("bench", help="throughput of the training loop (minift bench --help; see benchmarks/)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: python benchmarks/throughput.py shares it
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
