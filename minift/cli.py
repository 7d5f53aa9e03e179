"""``minift train | eval | predict | generate | dpo | reward | score | grpo | rloo | merge``: every
command's parser is here; each command's body is a plain function of its stage (``finetune.run``,
``preference.run_dpo``, ``rl.run_rl``, ...)."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

import torch

from .config import RunConfig, check_template, describe, load_config
from .errors import InputError, MiniftError


def _load_for_inference(model_dir: str):
    from .hub import from_pretrained
    from .tokenizer import load_tokenizer

    model = from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    run_config_path = Path(model_dir) / "run_config.json"
    data = RunConfig().data
    if run_config_path.exists():
        try:
            saved = json.loads(run_config_path.read_text(encoding="utf-8"))["data"]
            data.template, data.labels = saved["template"], saved["labels"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{run_config_path}: not a minift run config ({type(err).__name__}: {err}) — "
                             f"remove it to use the default template and labels, or pass "
                             f"--template") from None
    return model, tokenizer, data


def resume_of(args):
    """``--resume`` as the recipes take it: True (the newest intact checkpoint), a path, or None;
    ``--resume-with-changes`` alone means ``--resume``. A path that cannot be a checkpoint (a config
    file, an exported model folder) is refused before anything is loaded or created."""
    resume = True if args.resume == "latest" else args.resume
    if args.overwrite and (resume or args.resume_with_changes):
        raise InputError("--overwrite starts afresh (the old run moved aside) and --resume continues it: "
                         "give one")
    if isinstance(resume, str):
        check_resume_path(args.command, Path(resume), args.config)
    return resume or (True if args.resume_with_changes else None)


def check_resume_path(command: str, path: Path, config: str | None) -> None:
    suffix = path.suffix.lower()
    if suffix in (".toml", ".yaml", ".yml") or (path.is_file() and suffix == ".json"):
        fix = (f"minift {command} {path} --resume" if config is None else
               f"minift {command} {config} --resume (the newest checkpoint) or --resume "
               "<output_dir>/checkpoint-N")
        raise InputError(f"--resume {path}: a config file, not a checkpoint — {fix}")
    if path.is_dir() and not (path / "manifest.json").exists() and (path / "config.json").exists() \
            and not (path / "training_state.pt").exists():
        raise InputError(f"--resume {path}: a finished model folder, not a checkpoint (it holds no training "
                         "state) — resume from a checkpoint-N folder beside it, or --resume alone for the "
                         f"newest; to train further from this model, set model.name = {path} and start a new "
                         "run")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command shares (train, dpo, reward, grpo, rloo, and run_script's)."""
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest intact checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="resume although settings that change the maths differ from the checkpoint's "
                             "(the new values are used and recorded)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds another run: the old run is moved "
                             "aside to <output_dir>.previous-N, never deleted")



def add_training_command(sub, common: argparse.ArgumentParser, name: str, text: str, options: str,
                         config_help: str, func, optional: bool = False) -> None:
    """A training command: its TOML config (``optional``: the defaults when omitted), the options
    ``describe`` lists for its sections, and ``add_run_arguments``."""
    parser = sub.add_parser(name, parents=[common], help=text,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="options (set in the TOML file or with --set section.key=value):\n"
                                   + options)
    parser.add_argument("config", nargs="?" if optional else None, help=config_help)
    add_run_arguments(parser)
    parser.set_defaults(func=func)

def cmd_train(args) -> int:
    from .finetune import run

    resume = resume_of(args)
    cfg = load_config(args.config, args.set or [])
    summary = run(cfg, resume=resume, overwrite=args.overwrite, resume_with_changes=args.resume_with_changes)
    return 0 if summary else 1


def cmd_preference(args) -> int:
    from .preference.config import PreferenceConfig
    from .preference.recipe import run_dpo, run_reward

    resume = resume_of(args)
    cfg = load_config(args.config, args.set or [], stage=PreferenceConfig)
    summary = (run_dpo if args.command == "dpo" else run_reward)(
        cfg, resume=resume, overwrite=args.overwrite, resume_with_changes=args.resume_with_changes)
    return 0 if summary else 1


def cmd_rl(args) -> int:
    from .rl.recipe import load_rl_config, run_rl

    resume = resume_of(args)
    cfg = load_rl_config(args.config, args.set or [], algorithm=args.command)
    summary = run_rl(cfg, resume=resume, overwrite=args.overwrite,
                     resume_with_changes=args.resume_with_changes)
    return 0 if summary else 1


def cmd_score(args) -> int:
    from .preference.score import check_best_of_n, rank_completions

    if args.policy:
        if args.candidates:
            raise InputError(f"score: {len(args.candidates)} candidate(s) and --policy — give the "
                             "completions to rank, or --policy to sample them, not both")
        check_generation_args(args)
        check_best_of_n(args.n, args.max_new_tokens)
    ranked = rank_completions(args.model, args.prompt, args.candidates, policy=args.policy, n=args.n,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed, progress=_sampling_progress)
    for reward, text in ranked:
        print(f"{reward:+.4f}\t{text!r}")
    return 0


def _sampling_progress(done: int, total: int) -> None:
    """A line on stderr per batch of best-of-n samples, when there is more than one batch."""
    from .preference.score import SAMPLE_BATCH

    if total > SAMPLE_BATCH:
        print(f"best-of-n: {done}/{total} continuations sampled", file=sys.stderr, flush=True)


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.set or [])
    from .finetune import evaluate_only

    if args.model:
        use_model_folder(cfg, args.model, args.set or [])
    result = evaluate_only(cfg, args.model)
    print(json.dumps({"model": args.model or cfg.model.name, **result.as_dict()}, indent=2))
    return 0


def use_model_folder(cfg: RunConfig, model: str, overrides: list[str]) -> None:
    """``eval --model DIR``: the folder's own config.json rules (the config's ``model.config`` sizes and
    dropout are for training a model from ``model.name``), and its own tokenizer, unless
    ``--set model.tokenizer=...`` names one (refused when it is another: ``components.build_tokenizer``)."""
    from .tokenizer import has_tokenizer_files

    cfg.model.name, cfg.model.config = model, {}
    asked = any(o.split("=", 1)[0].strip() == "model.tokenizer" for o in overrides)
    if not asked and Path(model).is_dir() and has_tokenizer_files(Path(model)):
        cfg.model.tokenizer = ""


def cmd_predict(args) -> int:
    from .data import format_prompt, label_token_ids
    from .evaluate import label_log_probs

    if args.template:
        check_template(args.template)
    model, tokenizer, data = _load_for_inference(args.model)
    if args.template:
        data.template = args.template
    labels = tuple(data.labels)
    label_ids = label_token_ids(tokenizer, data.template, labels)
    prompts = [tokenizer.encode(format_prompt(text, data.template)) for text in args.text]
    room = model.config.n_positions - max(len(ids) for ids in label_ids)
    for i, (text, ids) in enumerate(zip(args.text, prompts), 1):
        if not ids or len(ids) > room:
            what = "shorten it" if ids else "give a text with words in it"
            raise InputError(f"text {i} ({text[:40]!r}{'...' if len(text) > 40 else ''}) makes a prompt of "
                             f"{len(ids)} tokens; the model holds {model.config.n_positions} with the label "
                             f"— {what}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = label_log_probs(model, prompts, label_ids, pad, torch.device("cpu"))
    for text, row in zip(args.text, scores):
        probs = torch.softmax(row, dim=0)
        best = int(probs.argmax())
        shown = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, probs.tolist()))
        print(f"{labels[best]}\t({shown})\t{text}")
    return 0


def check_generation_args(args) -> None:
    """Refuse sampling arguments before the model is loaded."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    for flag, value in (("--top-k", args.top_k), ("--max-new-tokens", args.max_new_tokens)):
        if value < 0:
            raise InputError(f"{flag} {value}: must be >= 0 ({flag} 0 = " +
                             ("no top-k filter)" if flag == "--top-k" else "nothing to generate)"))


def cmd_generate(args) -> int:
    check_generation_args(args)
    model, tokenizer, _ = _load_for_inference(args.model)
    ids = model.generate(tokenizer.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, eos_id=tokenizer.eos_id,
                         generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(ids, skip_special_tokens=True))
    return 0


def cmd_merge(args) -> int:
    from .export import merge_model_folder

    print(f"merged model: {merge_model_folder(args.model, args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minift", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also MINIFT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command as well as before it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    add_training_command(sub, common, "train", "fine-tune as a TOML config says", describe(),
                         "TOML config (configs/*.toml); defaults when omitted", cmd_train, optional=True)

    ev = sub.add_parser("eval", parents=[common],
                           help="loss, perplexity and label accuracy of a model on the eval split")
    ev.add_argument("config", nargs="?")
    ev.add_argument("--model", help="model directory or hub name (default: the config's model.name)")
    ev.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", parents=[common],
                           help="sentiment of one or more texts, with the label probabilities")
    pr.add_argument("text", nargs="+")
    pr.add_argument("--model", required=True, help="a trained model directory (<output_dir>/model)")
    pr.add_argument("--template", help="prompt template (default: the one the model was trained with)")
    pr.set_defaults(func=cmd_predict)

    gen = sub.add_parser("generate", parents=[common],
                           help="sample a continuation of a prompt (KV cache; stops at EOS or n_positions)")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    from .preference.config import PreferenceConfig

    for name, text in (("dpo", "DPO on preference pairs as a TOML config says ([pairs], [dpo])"),
                       ("reward", "train a reward model on preference pairs ([pairs], [reward])")):
        add_training_command(sub, common, name, text, describe(PreferenceConfig),
                             "TOML config (configs/dpo-tweets.toml, configs/reward-tweets.toml)",
                             cmd_preference)
    from .rl.config import STAGE_CONFIGS

    for name, text in (("grpo", "GRPO: sample completions, score them, clipped policy updates ([rl])"),
                       ("rloo", "RLOO: as grpo with the leave-one-out baseline ([rl])")):
        add_training_command(sub, common, name, text, describe(STAGE_CONFIGS[name]),
                             f"TOML config (configs/{name}-tweets.toml, configs/grpo-tiny.toml)", cmd_rl)
    score = sub.add_parser("score", parents=[common],
                           help="rank candidate completions of a prompt with a reward model")
    score.add_argument("prompt", help='e.g. "what a lovely day sentiment:"')
    score.add_argument("candidates", nargs="*", help="completions (default: the model's configured labels)")
    score.add_argument("--model", required=True,
                       help="a reward model directory (<output_dir>/model of minift reward)")
    score.add_argument("--policy",
                       help="best-of-n: sample the candidates from this model (e.g. <output_dir>/model "
                            "of minift train or minift dpo) instead of taking them as arguments")
    score.add_argument("--n", type=int, default=8,
                       help="best-of-n: how many continuations to sample (1 to 10000, in batches of 256)")
    score.add_argument("--max-new-tokens", type=int, default=8, help="best-of-n: tokens per continuation")
    score.add_argument("--temperature", type=float, default=1.0,
                       help="best-of-n: sampling temperature (0 = greedy)")
    score.add_argument("--top-k", type=int, default=0,
                       help="best-of-n: sample from the k likeliest tokens (0 = all)")
    score.add_argument("--seed", type=int, default=0, help="best-of-n: seed of the sampling")
    score.set_defaults(func=cmd_score)
    merge = sub.add_parser("merge", parents=[common],
                           help="fold a LoRA adapter into its base: full weights in transformers' layout")
    merge.add_argument("model", help="a model folder holding an adapter (<output_dir>/model of a [lora] run)")
    merge.add_argument("output", help="a new folder for the merged model")
    merge.set_defaults(func=cmd_merge)
    sub.add_parser("bench", help="throughput of the recipe: benchmarks/throughput.py --no-trainer "
                                 "(see benchmarks/)", add_help=False)
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
    parser = build_parser()
    return call_reporting_errors(parser.parse_args(argv))


def call_reporting_errors(args) -> int:
    """``args.func(args)``; a minift error or an OSError becomes one ``minift: error:`` line and the
    exit code (the traceback with --debug or MINIFT_DEBUG=1)."""
    debug = args.debug or os.environ.get("MINIFT_DEBUG", "0") not in ("", "0")
    try:
        return args.func(args)
    except (MiniftError, OSError) as err:
        if debug:
            raise
        print(f"minift: error: {error_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)


def run_script(build_stage, argv: list[str] | None = None, after=None) -> int:
    """The command line of a training script of your own: ``python3 my_recipe.py CONFIG [--set ...]
    [--resume] ...`` takes ``minift train``'s options and runs ``build_stage`` (a function of a
    ``RunContext`` returning a ``Stage``: a copy of ``minift/finetune.py``, or one of examples/)
    through ``orchestration.run_stage``; ``after(cfg, summary)``, when given, is called once the run
    is done (to show what your change logged). Returns the exit code."""
    parser = argparse.ArgumentParser(description=(build_stage.__doc__ or "").strip().split("\n")[0] or None)
    parser.add_argument("config", nargs="?", help="TOML config (configs/*.toml); defaults when omitted")
    add_run_arguments(parser)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also MINIFT_DEBUG=1)")

    def train_with_build_stage(args) -> int:
        from .orchestration import run_stage

        cfg = load_config(args.config, args.set or [])
        summary = run_stage(cfg, build_stage, resume=resume_of(args), overwrite=args.overwrite,
                            resume_with_changes=args.resume_with_changes)
        if after is not None and summary and "stopped_by" not in summary:
            after(cfg, summary)
        return 0 if summary else 1

    parser.set_defaults(func=train_with_build_stage)
    return call_reporting_errors(parser.parse_args(argv))


def error_line(err: BaseException) -> str:
    """One line for the terminal: a ``MiniftError``'s message (its lines joined), or an
    ``OSError`` with its file and what to do ("No space left on device" for a full disk)."""
    if isinstance(err, OSError) and not isinstance(err, MiniftError):
        where = f" ({err.filename})" if err.filename else ""
        hint = {errno.ENOSPC: "free space or point train.output_dir at a larger disk, "
                              "then rerun with --resume",
                errno.EACCES: "check the permissions", errno.EROFS: "choose a writable train.output_dir"}
        return f"{err.strerror or err}{where} — {hint.get(err.errno, 'rerun with --debug for the traceback')}"
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
