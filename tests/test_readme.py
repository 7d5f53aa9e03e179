"""README.md as a reader uses it: every ```python block runs as written, every command of its ```bash
blocks runs (slow: smaller numbers where the README's run for minutes, the same flags) or is skipped
with the reason, and every path of the repo it cites exists."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from shell_blocks import (
    Run,
    Skip,
    bash_blocks,
    environment,
    has_policy,
    policy_of,
    python_shim,
    repo_view,
    run_commands,
)

from conftest import REPO, SHARED, missing_reason, shared_path

README = REPO / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "../shared" in code:
        shared_path("fixtures")  # skips, saying why, without the shared material
        code = code.replace("../shared", str(SHARED))
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the README's paths are relative to the repo root
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_every_repo_path_the_readme_cites_exists():
    cited = set(re.findall(r"`((?:minift|benchmarks|configs|docs|examples|tests)/[\w./-]*)`",
                           README.read_text(encoding="utf-8")))
    assert {"minift/orchestration.py", "minift/components.py", "minift/finetune.py", "minift/preference/",
            "minift/models/lm_loss.py", "docs/how-trainer-works.md", "examples/README.md"} <= cited
    assert sorted(path for path in cited if not (REPO / path).exists()) == []


def test_the_intro_sends_learners_to_how_trainer_works_first():
    intro = README.read_text(encoding="utf-8").split("## Quickstart")[0]
    assert intro.index("docs/how-trainer-works.md") < intro.index("docs/trainer-map.md")
    assert "examples/" in intro and "Change one piece" in intro


# -- the shell blocks -------------------------------------------------------------------------------------
HUB = ("needs the Hugging Face hub (openai-gpt, mteb/tweet_sentiment_extraction); the next command runs it "
       "on local copies")
NO_HUB_RUN = "needs runs/openai-gpt-tweets/model, the model of the hub job (configs/openai-gpt-tweets.toml)"
GPT2_LOCAL = ("configs/gpt2-tweets.toml --set model.name=../shared/fixtures/tiny-gpt2 "
              "--set data.source=../shared/data/tweet_sentiment_extraction --set data.max_length=64")
# 2 steps, 64 prompts, 16 held out, once the python3 shim has divided them (DIVIDE, below)
DIVIDED_BACK = "--set train.max_steps=200 --set data.max_train_examples=6400 --set eval.max_examples=1600"
SMALL_JOB = "--set train.max_steps=2 --set data.max_train_examples=64 --set eval.max_examples=32"
POLICIES = [
    (r"^python3 -m venv |^python3 -m pip install ",
     Skip("makes a virtual environment or installs packages: tests/test_install.py installs minift into a "
          "fresh venv (slow)")),
    (r"^python3 -m pytest ", Skip("runs this test suite")),
    (r"^python3 -m minift train configs/offline-default\.toml", Run()),
    (r"^python3 -m minift (predict|generate) --model runs/offline-default/model ", Run()),
    (r"^python3 -m minift train configs/openai-gpt-tweets\.toml +#", Skip(HUB)),
    (r"model\.name=/path/to/openai-gpt",
     Run(replace={"/path/to/openai-gpt": "../shared/fixtures/tiny-openai-gpt"}, extra=SMALL_JOB)),
    (r"^python3 -m minift train configs/trainer-trace\.toml", Run()),
    (r"^python3 -m minift train configs/llama-chat-tiny\.toml", Run()),
    (r"^python3 -m minift train configs/smollm2-tweets\.toml",
     Skip("needs the Hugging Face hub (HuggingFaceTB/SmolLM2-135M); configs/llama-chat-tiny.toml runs the "
          "same chat path offline")),
    (r"^python3 -m minift train --help", Run()),
    (r"^torchrun --nproc-per-node 4 -m minift train configs/openai-gpt-tweets",
     Skip(HUB.split(";")[0] + "; tests/test_distributed.py runs minift train under torchrun on 2 CPUs")),
    (r"^torchrun --nnodes 2 ", Skip("needs two machines")),
    (r"^python3 benchmarks/throughput\.py",
     Skip("a benchmark: full-size openai-gpt steps for minutes; tests/test_bench.py runs throughput.py "
          "--quick --no-trainer (slow)")),
    (r"^python3 benchmarks/padding\.py", Run()),
    (r"^python3 benchmarks/distributed\.py",
     Skip("a benchmark: full-size openai-gpt steps under torchrun, minutes on a CPU; "
          "tests/test_distributed.py runs the recipe under torchrun")),
    (r"^benchmarks/gpu\.sh", Skip("needs a CUDA GPU")),
    # the feature rows (--features, all by default) run one by one in tests/test_trainer_features.py
    (r"^python3 benchmarks/trainer_side_by_side\.py ",
     Run(requires=("transformers", "accelerate"), extra="--features")),
    (r"^cp minift/finetune\.py my_recipe\.py$|^python3 my_recipe\.py ", Run()),
    (r"^python3 -m minift (dpo|reward) configs/(dpo|reward)-tweets\.toml +#", Skip(NO_HUB_RUN)),
    (r"^python3 -m minift score ",
     Skip("ranks with runs/reward-tweets/model (and runs/dpo-tweets/model), made by the two commands above "
          "from the hub job's model")),
    (r"^python3 -m minift dpo configs/dpo-tiny\.toml", Run()),
    (r"^S=|^C=", Run()),
    (r"^python3 -m minift train configs/openai-gpt-tweets\.toml --set model\.name=\$S/", Run()),  # SFT
    (r"^cp -r runs/sft-400 runs/sft-500", Run()),
    (r"^python3 -m minift eval configs/openai-gpt-tweets\.toml --model runs/(sft-500|dpo-100)/", Run()),
    (r"^python3 -m minift (dpo|reward) configs/\w+-tweets\.toml --set model\.name=runs/sft-400/", Run()),
    (r"^python3 -m minift train configs/gpt2-tweets\.toml ",
     Run(replace={"configs/gpt2-tweets.toml": GPT2_LOCAL}, extra=SMALL_JOB)),
    (r"^python3 -m minift (predict|merge) .*runs/gpt2-tweets/model", Run()),
    (r"^python3 -m minift (grpo|rloo) configs/grpo-tiny\.toml|^python3 -m minift grpo --help", Run()),
    (r"^python3 -m minift (grpo|rloo) configs/(grpo|rloo)-tweets\.toml",
     Run(replace={"-tweets.toml": "-tweets.toml --set data.source=../shared/data/tweet_sentiment_extraction"},
         extra=DIVIDED_BACK)),
    (r"^python3 benchmarks/rl_tweets\.py +#",
     Skip("a benchmark: the full-size SFT, DPO, reward model and RL runs, hours on a CPU; the next "
          "command runs at a smaller size")),
    (r"^python3 benchmarks/rl_tweets\.py --sft-steps",
     Run(extra="--sft-steps 4 --rl-steps 2 --train-tweets 64 --pairs 16 --eval 16 --out bench-results")),
    (r"^torchrun --nproc-per-node 4 -m minift train configs/gpt2-tweets\.toml --set train\.distributed=fsdp",
     Skip("4 ranks of the whole tweets job; tests/test_fsdp.py runs FSDP on 2 gloo ranks against one "
          "process")),
]
# The preference block's runs take minutes: the same commands with these --set values divided by 100
# (SFT 4 + 1 steps on 80 tweets, DPO and the reward model 1 step on 16 pairs, evaluations on 10 tweets).
DIVIDE = {"train.max_steps": 100, "data.max_train_examples": 100, "pairs.max_train_pairs": 100,
          "eval.max_examples": 100}
SHELL_BLOCKS = bash_blocks(README)
COMMANDS = [command for block in SHELL_BLOCKS for command in block.commands]


def test_every_readme_command_has_one_policy():
    assert len(SHELL_BLOCKS) >= 8 and len(COMMANDS) >= 25
    for command in COMMANDS:
        policy_of(command, POLICIES)  # raises for a command no policy names (or two do)


SKIPPED = [c for c in COMMANDS if has_policy(c, POLICIES, Skip)]


@pytest.mark.parametrize("command", SKIPPED, ids=[f"line {c.line}" for c in SKIPPED])
def test_readme_command_not_run(command):
    shown = " ".join(command.text.split("#")[0].split())
    pytest.skip(f"README.md line {command.line}, {shown[:70]}: {policy_of(command, POLICIES).reason}")


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    """One folder for all the blocks, as a reader's clone: later blocks use what earlier ones wrote."""
    where = tmp_path_factory.mktemp("readme")
    return repo_view(where, REPO, SHARED), python_shim(where / "bin", DIVIDE)


def run_block(index: int, view) -> str:
    folder, bin_dir = view
    block = SHELL_BLOCKS[index]
    runnable = [c for c in block.commands if isinstance(policy_of(c, POLICIES), Run)]
    if not runnable:
        pytest.skip(f"README.md line {block.line}: every command skipped (test_readme_command_not_run)")
    needs = {p for c in runnable for p in policy_of(c, POLICIES).requires}
    if missing_reason(needs):
        pytest.skip(missing_reason(needs))
    if "../shared" in block.text + "".join(policy_of(c, POLICIES).command(c.text) for c in runnable):
        shared_path("fixtures")
    result = run_commands(block.commands, POLICIES, folder, environment(REPO, SHARED, bin_dir), timeout=1800)
    assert result.returncode == 0, f"README.md block at line {block.line} failed:\n{result.stdout[-4000:]}"
    return result.stdout


def block_index(text: str) -> int:
    return next(i for i, block in enumerate(SHELL_BLOCKS) if text in block.text)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SHELL_BLOCKS)),
                         ids=[f"line {block.line}" for block in SHELL_BLOCKS])
def test_readme_shell_block_runs(index, view):
    block = SHELL_BLOCKS[index]
    if "runs/offline-default/model" in block.text and not (view[0] / "runs/offline-default/model").exists():
        run_block(block_index("minift train configs/offline-default.toml"), view)  # the model it uses
    made_by = block_index("train.output_dir=runs/sft-400")  # the model the RL runs start from
    if "runs/sft-400/model" in block.text and index != made_by \
            and not (view[0] / "runs/sft-400/model").exists():
        run_block(made_by, view)
    output = run_block(index, view)
    if "minift predict --model runs/offline-default/model" in block.text:
        check_predict_and_generate(output)
    if "runs/sft-500" in block.text:
        check_resumed_sft(view[0], output)


def check_predict_and_generate(output: str) -> None:
    """The README's two ```text blocks after the commands: predict's line (probabilities within 0.01)
    and generate's greedy continuation."""
    text_blocks = re.findall(r"^```text\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    predicted = next(b for b in text_blocks if b.startswith("positive\t")).strip()
    generated = next(b for b in text_blocks if b.startswith("i love the concert")).strip()
    line = next(line for line in output.splitlines() if line.endswith("\ti love the concert so much"))
    label, probabilities, text = line.split("\t")
    want_label, want_probabilities, want_text = predicted.split("\t")
    assert (label, text) == (want_label, want_text)
    got, want = (re.findall(r"[\d.]+", p) for p in (probabilities, want_probabilities))
    assert [float(g) for g in got] == pytest.approx([float(w) for w in want], abs=0.01)
    assert generated in output.splitlines()


def check_resumed_sft(folder, output: str) -> None:
    """SFT-500 resumed SFT-400's checkpoint with the new max_steps (divided by 100 here: 4 -> 5), its
    summary covers the whole run, and it equals one uninterrupted run of as many steps."""
    first = json.loads((folder / "runs/sft-400/summary.json").read_text())
    resumed = json.loads((folder / "runs/sft-500/summary.json").read_text())
    assert (resumed["steps"], resumed["resumed_at"]) == (5, [4])
    assert "done: 5 steps (resumed at step 4)" in output
    steps = [json.loads(line) for line in (folder / "runs/sft-500/metrics.jsonl").read_text().splitlines()]
    mean = [r["loss"] for r in steps if "step_time" in r and r["step"] > 4]  # the steps this run took
    assert resumed["train_loss"] == pytest.approx(sum(mean) / len(mean), rel=1e-12)
    assert (f"train loss: step 1 {first['first_loss']:.4f} -> step 5 {resumed['last_loss']:.4f}, "
            f"mean {resumed['train_loss']:.4f} (steps 5-5)") in output
    block = SHELL_BLOCKS[block_index("runs/sft-500")]
    sft = next(c for c in block.commands if "train.output_dir=runs/sft-500" in c.text)
    straight = sft.text.replace("runs/sft-500", "runs/sft-straight").replace("--resume-with-changes", "")
    plain_resume = sft.text.replace("runs/sft-500", "runs/sft-refused").replace("--resume-with-changes",
                                                                                "--resume")
    variables = [c.text for c in block.commands if c.text.startswith(("S=", "C="))]
    script = "\n".join(["set -eu", *variables, straight, "cp -r runs/sft-400 runs/sft-refused", "set +e",
                        plain_resume, "echo exit=$?"])
    env = environment(REPO, SHARED, folder.parent / "bin")
    result = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=1800)
    again = json.loads((folder / "runs/sft-straight/summary.json").read_text())
    assert again["last_loss"] == resumed["last_loss"]  # constant lr: resuming = one run of as many steps
    error = result.stderr.strip().split("\n")[-1]  # plain --resume is refused, in one clean line
    assert result.stdout.strip().endswith("exit=2") and error.startswith("minift: error: ")
    assert "(checkpoint -> this run: train.max_steps: 4 -> 5); resume with" in error and ":;" not in error
