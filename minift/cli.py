"""``minift train | eval | predict | generate | dpo | reward | score`` on top of the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

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
    model, tokenizer, _ = _load_for_inference(args.model)
    ids = model.generate(tokenizer.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, eos_id=tokenizer.eos_id,
                         generator=torch.Generator().manual_seed(args.seed))
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

    gen = sub.add_parser("generate", help="sample a continuation of a prompt (KV cache; stops at EOS or n_positions)")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    add_preference_commands(sub)  # dpo, reward, score (minift/preference_cli.py)
    sub.add_parser("bench", help="throughput of the recipe: benchmarks/throughput.py --no-trainer (see benchmarks/)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not sys.stderr.isatty():  # piped (CI, `| tee`): no bar frames from datasets or the hub either
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if argv[:1] == ["bench"]:  # a thin entry point: the harness lives in benchmarks/, outside the library
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
        if not script.exists():
            print("minift: error: minift bench runs benchmarks/throughput.py from a clone of the repository "
                  f"(not found at {script})", file=sys.stderr)
            return 2
        import subprocess

        return subprocess.call([sys.executable, str(script), "--no-trainer", *argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad input found past the config: data, tokenizer, generation arguments
        print(f"minift: error: {err}", file=sys.stderr)
        return 2
