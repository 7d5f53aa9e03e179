"""The ```bash blocks of a Markdown file as the commands a reader types, and a way to run them as the
reader would: bash, from a folder laid out as the docs assume (the repo's folders in it, ``shared/``
beside it). A ```text block right after a bash block is the output it promises; ``assert_prints``
compares the two, numbers within a tolerance (other CPUs round the last digits differently).

Every command of a file gets a policy from its test: run it, run it with smaller numbers (a
``python3`` shim divides the ``--set`` values its table names: same flags, a shorter run), or skip
it with the reason. A command that no policy names fails the test, so none is skipped silently.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass
class Command:
    text: str  # as written, continuation lines included
    line: int  # where it starts in the file (1-based)


@dataclass
class Block:
    commands: list[Command]
    line: int
    expected: str | None  # the ```text block right after it, if any

    @property
    def text(self) -> str:
        return "\n".join(c.text for c in self.commands)


@dataclass
class Run:
    """Run the command; ``replace``: placeholders of the text and what stands in for them here;
    ``extra``: flags appended (smaller settings); ``requires``: optional packages it needs."""

    replace: dict[str, str] = field(default_factory=dict)
    extra: str = ""
    requires: tuple[str, ...] = ()

    def command(self, text: str) -> str:
        for old, new in self.replace.items():
            text = text.replace(old, new)
        code, comment = split_comment(text)
        return f"{code.rstrip()} {self.extra}".rstrip() if self.extra else code.rstrip()


@dataclass
class Skip:
    reason: str


def split_comment(text: str) -> tuple[str, str]:
    """(code, comment) of a command: a ``#`` after whitespace, outside quotes, starts a comment that
    runs to the end of its line (continuation lines keep their own code)."""
    code, comment, quote = [], [], None
    for line in text.split("\n"):
        out, i = [], 0
        while i < len(line):
            ch = line[i]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                comment.append(line[i:])
                break
            out.append(ch)
            i += 1
        code.append("".join(out).rstrip() if not quote else "".join(out))
    return "\n".join(code), "\n".join(comment)


def open_quote(text: str) -> bool:
    code, _ = split_comment(text)
    quote = None
    for ch in code:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
    return quote is not None


def split_commands(body: str, first_line: int) -> list[Command]:
    """The logical commands of a block: continuation lines (a trailing backslash, an open quote)
    joined to theirs; blank and comment-only lines left out."""
    commands, current, start = [], [], 0
    for i, line in enumerate(body.split("\n")):
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not current:
            start = first_line + i
        current.append(line)
        joined = "\n".join(current)
        if split_comment(joined)[0].rstrip().endswith("\\") or open_quote(joined):
            continue
        commands.append(Command(joined, start))
        current = []
    if current:
        raise ValueError(f"line {start}: a command that never ends (open quote or trailing backslash)")
    return commands


def bash_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "bash":
            continue
        line = text[:fence.start(2)].count("\n") + 1
        following = fences[i + 1] if i + 1 < len(fences) else None
        adjacent = following is not None and not text[fence.end():following.start()].strip()
        expected = following.group(2) if adjacent and following.group(1) == "text" else None
        blocks.append(Block(split_commands(fence.group(2), line), line, expected))
    return blocks


def policy_of(command: Command, policies: list[tuple[str, Run | Skip]]) -> Run | Skip:
    """The one policy whose pattern the command matches (a command matching none or two is an error)."""
    found = [p for pattern, p in policies if re.search(pattern, command.text)]
    if len(found) != 1:
        raise LookupError(f"line {command.line}: {len(found)} policies match {command.text!r}")
    return found[0]


def has_policy(command: Command, policies, kind: type) -> bool:
    """Whether the command's one policy is a ``kind`` (False when it has none: its test says so)."""
    found = [p for pattern, p in policies if re.search(pattern, command.text)]
    return len(found) == 1 and isinstance(found[0], kind)


# -- running ---------------------------------------------------------------------------------------------
def repo_view(where: Path, repo: Path, shared: Path) -> Path:
    """``where/minift``: the repo's folders as symlinks, ``where/shared`` beside it (as ``../shared``)."""
    view = where / "minift"
    view.mkdir(parents=True)
    for name in ("configs", "examples", "benchmarks", "minift", "docs", "tests"):
        (view / name).symlink_to(repo / name)
    if shared.exists() and not (where / "shared").exists():
        (where / "shared").symlink_to(shared)
    return view


SHIM = """#!{python}
import os, sys
DIVIDE = {divide!r}
def smaller(arg):
    key, sep, value = arg.partition("=")
    if sep and key in DIVIDE and value.isdigit():
        return f"{{key}}={{max(1, int(value) // DIVIDE[key])}}"
    return arg
args = sys.argv[1:]
if args[:2] == ["-m", "minift"]:
    args = [smaller(arg) for arg in args]
os.execv({python!r}, [{python!r}, *args])
"""


def python_shim(bin_dir: Path, divide: dict[str, int]) -> Path:
    """A ``python3`` first on PATH: this interpreter, with each ``--set key=N`` whose key ``divide``
    names made N // divide[key] (at least 1) in ``python3 -m minift`` commands."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python3"
    shim.write_text(SHIM.format(python=sys.executable, divide=divide))
    shim.chmod(0o755)
    return bin_dir


def run_commands(commands: list[Command], policies, cwd: Path, env: dict[str, str], timeout: float
                 ) -> subprocess.CompletedProcess:
    """The commands in one bash (so variables carry over), stopping at the first that fails; the
    skipped ones are left out. stdout and stderr in one stream, as a terminal shows them."""
    lines = ["set -euo pipefail"]
    for command in commands:
        policy = policy_of(command, policies)
        if isinstance(policy, Run):
            lines += [f"echo '$ (line {command.line})' >&2", policy.command(command.text)]
    return subprocess.run(["bash", "-c", "\n".join(lines)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def environment(repo: Path, shared: Path, bin_dir: Path | None = None) -> dict[str, str]:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    return {**os.environ, "PATH": path, "PYTHONPATH": str(repo), "MINIFT_SHARED": str(shared),
            "HF_HUB_OFFLINE": "1"}


# -- comparing with the promised output -----------------------------------------------------------------
def shape(line: str) -> str:
    return NUMBER.sub("#", line.strip())


def numbers_match(expected: str, actual: str, rel: float, abs_: float) -> bool:
    want, got = NUMBER.findall(expected), NUMBER.findall(actual)
    return len(want) == len(got) and all(math.isclose(float(w), float(g), rel_tol=rel, abs_tol=abs_)
                                         for w, g in zip(want, got))


def assert_prints(expected: str, output: str, rel: float = 0.05, abs_: float = 0.002) -> None:
    """Every line of ``expected`` (but ``...``) is a line of ``output``: the same words, and numbers
    equal within ``rel`` (or ``abs_``)."""
    lines = [line for line in output.splitlines() if line.strip()]
    for want in expected.splitlines():
        if not want.strip() or want.strip() == "...":
            continue
        candidates = [line for line in lines if shape(line) == shape(want)]
        assert candidates, f"no line like {want!r} in the output:\n{output[-3000:]}"
        assert any(numbers_match(want, line, rel, abs_) for line in candidates), \
            f"{want!r}: the output has {candidates} instead"
