"""The RL stage on the real task: SFT alone vs SFT + DPO vs SFT + GRPO (the label rule) vs SFT + GRPO (a
reward model), at equal optimizer steps, from the same fine-tuned starting point; the README's table.

    python3 benchmarks/rl_tweets.py          # the README's sizes (tens of minutes on 2 cores)
    python3 benchmarks/rl_tweets.py --sft-steps 40 --rl-steps 10 --train-tweets 800 --pairs 160 --eval 200

Every arm is a ``python3 -m minift`` command (printed before it runs), from the repo root with the shared
material at --shared:

    SFT-N       minift train: tiny-openai-gpt (the real GPT-1 vocabulary, random weights) on the first
                --train-tweets train tweets for --sft-steps steps of 16
    SFT alone   the same run resumed for --rl-steps more SFT steps (SFT-N + M in all)
    + DPO       minift dpo from SFT-N, --rl-steps steps of 16 pairs (the first --pairs tweet pairs)
    reward      minift reward from SFT-N, --rl-steps steps of 16 pairs (for the last arm)
    + GRPO rule minift grpo from SFT-N, --rl-steps steps of 16 completions (2 prompts x 8), label rule
    + GRPO RM   the same with the reward model as the reward

Each model is scored by ``minift eval`` (the labels' log-probabilities after the prompt) on the first --eval
test tweets: label accuracy and macro-F1. The GRPO arms' reward per step and held-out greedy accuracy are
drawn as curves (matplotlib). Writes ``<out>/rl-tweets-<stamp>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def common_sets(args) -> list[str]:
    """The settings every arm shares (the README's $C): the local tweets, 16 per step, constant lr 1e-3,
    dropout 0, no evaluation or checkpoint on the way, the first --eval test tweets held out."""
    data = Path(args.shared) / "data" / "tweet_sentiment_extraction"
    values = [f'data.source="{data}"', 'train.schedule="constant"', "train.batch_size=16",
              "train.grad_accum=1",
              "train.eval_every=0", "train.checkpoint_every=0", f"eval.max_examples={args.eval}",
              "eval.before_training=false", "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0",
              "model.config.attn_pdrop=0.0", f"train.lr={args.lr}", "train.progress=false",
              f"train.device=\"{args.device}\"", "train.plot=false"]
    return [x for v in values for x in ("--set", v)]


def minift(*argv: str, log: Path) -> str:
    """Run ``python3 -m minift ARGV`` (printed first); its output goes to ``log`` and is returned."""
    shown = " ".join(a if " " not in a and '"' not in a else repr(a) for a in argv)
    print(f"$ python3 -m minift {shown}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "minift", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): see {log}\n{result.stderr[-2000:]}")
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return result.stdout


def evaluate(args, model: Path, work: Path, name: str) -> dict:
    out = minift("eval", "configs/openai-gpt-tweets.toml", "--model", str(model), *common_sets(args),
                 log=work / f"eval-{name}.log")
    return json.loads(out[out.index("{"):])


def run_arms(args, work: Path) -> dict[str, Path]:
    """Train every arm; returns arm -> its output folder."""
    c, shared = common_sets(args), Path(args.shared)
    n, m = args.sft_steps, args.rl_steps
    sft = ["--set", f'model.name="{shared / "fixtures" / "tiny-openai-gpt"}"',
           "--set", f"data.max_train_examples={args.train_tweets}"]
    runs = {"sft": work / f"sft-{n}", "sft_more": work / f"sft-{n + m}", "dpo": work / f"dpo-{m}",
            "rm": work / f"rm-{m}", "grpo_rule": work / f"grpo-rule-{m}", "grpo_rm": work / f"grpo-rm-{m}"}
    minift("train", "configs/openai-gpt-tweets.toml", *c, *sft, "--set", f"train.max_steps={n}",
           "--set", f'train.output_dir="{runs["sft"]}"', log=work / "sft.log")
    shutil.copytree(runs["sft"], runs["sft_more"])  # SFT alone: the same run, M more steps (bit-exact resume)
    minift("train", "configs/openai-gpt-tweets.toml", *c, *sft, "--set", f"train.max_steps={n + m}",
           "--set", f'train.output_dir="{runs["sft_more"]}"', "--resume-with-changes",
           log=work / "sft-more.log")
    start = ["--set", f'model.name="{runs["sft"] / "model"}"', "--set", f"train.max_steps={m}"]
    pairs = ["--set", f"pairs.max_train_pairs={args.pairs}", "--set", f"pairs.max_eval_pairs={args.eval}"]
    minift("dpo", "configs/dpo-tweets.toml", *c, *start, *pairs, "--set", f'train.output_dir="{runs["dpo"]}"',
           log=work / "dpo.log")
    minift("reward", "configs/reward-tweets.toml", *c, *start, *pairs,
           "--set", f'train.output_dir="{runs["rm"]}"', log=work / "rm.log")
    grpo = [*c, *start, "--set", f"data.max_train_examples={args.train_tweets}", "--set", "train.log_every=1"]
    minift("grpo", "configs/grpo-tweets.toml", *grpo, "--set", f'train.output_dir="{runs["grpo_rule"]}"',
           log=work / "grpo-rule.log")
    minift("grpo", "configs/grpo-tweets.toml", *grpo, "--set", f'train.output_dir="{runs["grpo_rm"]}"',
           "--set", f'rl.reward_funcs=["{runs["rm"] / "model"}"]', log=work / "grpo-rm.log")
    return runs


def step_rewards(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["reward"]) for r in records if "step_time" in r and r.get("reward") is not None]


def held_out(run: Path) -> list[tuple[int, dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["eval"]) for r in records if "eval" in r]


def plot(runs: dict[str, Path], path: Path, window: int) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no picture: matplotlib is not installed"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (arm, title) in zip(axes, (("grpo_rule", "GRPO, label rule (1 when right)"),
                                       ("grpo_rm", "GRPO, reward model (its score)"))):
        steps, rewards = zip(*step_rewards(runs[arm]))
        smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                  for i in range(len(rewards))]
        ax.plot(steps, rewards, lw=0.6, alpha=0.4, color="tab:blue", label="each step")
        ax.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"mean of {window} steps")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step (after the SFT steps)")
        ax.set_ylabel("mean reward of the step's completions")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"picture: {path}"


def table(args, scores: dict[str, dict], runs: dict[str, Path]) -> str:
    n, m = args.sft_steps, args.rl_steps
    names = {"sft": f"SFT {n} steps (the starting point)", "sft_more": f"SFT {n + m} steps",
             "dpo": f"SFT {n} + DPO {m}",
             "grpo_rule": f"SFT {n} + GRPO {m} (label rule)", "grpo_rm": f"SFT {n} + GRPO {m} (reward model)"}
    lines = [f"| model ({n + m} optimizer steps, but the first row) | accuracy | macro-F1 | "
             "held-out reward (greedy) |",
             "|---|---|---|---|"]
    for arm, name in names.items():
        s = scores[arm]
        evals = held_out(runs[arm]) if arm.startswith("grpo") else []
        reward = f"{evals[-1][1]['reward']:.3f}" if evals else "—"
        lines.append(f"| {name} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} | {reward} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--rl-steps", type=int, default=100)
    parser.add_argument("--train-tweets", type=int, default=8000, help="SFT examples and GRPO prompts")
    parser.add_argument("--pairs", type=int, default=1600, help="DPO and reward-model training pairs")
    parser.add_argument("--eval", type=int, default=1000, help="first N test tweets scored")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--window", type=int, default=10, help="steps the reward curves are averaged over")
    parser.add_argument("--shared", default=os.environ.get("MINIFT_SHARED", str(REPO.parent / "shared")))
    parser.add_argument("--work-dir", default="runs/rl-tweets")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    runs = run_arms(args, work)
    scores = {arm: evaluate(args, runs[arm] / "model", work, arm)
              for arm in ("sft", "sft_more", "dpo", "grpo_rule", "grpo_rm")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picture = plot(runs, out / f"rl-tweets-{stamp}.png", args.window)
    text = table(args, scores, runs)
    record = {"args": vars(args), "scores": scores, "minutes": (time.perf_counter() - started) / 60,
              "rewards": {arm: step_rewards(runs[arm]) for arm in ("grpo_rule", "grpo_rm")},
              "held_out": {arm: held_out(runs[arm]) for arm in ("grpo_rule", "grpo_rm")}}
    (out / f"rl-tweets-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
    command = "python3 benchmarks/rl_tweets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"`{command.strip()}` ({record['minutes']:.1f} min)"
    (out / f"rl-tweets-{stamp}.md").write_text(f"{header}\n\n{text}\n")
    print(text)
    print(picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
