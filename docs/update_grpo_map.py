"""The citation table of docs/grpo.md: TRL's (and transformers') lines beside minift's, cited and checked
exactly as docs/trainer-map.md's (``update_trainer_map.locate``: the quoted code on exactly one line),
with TRL pinned at ``update_trainer_map.PINS["trl"]``. Here the table itself is the source: the
command finds each quoted code again and rewrites the line numbers in place.

    python3 docs/update_grpo_map.py          # rewrite the line numbers
    python3 docs/update_grpo_map.py --check  # what tests/test_rl.py runs
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE / "grpo.md"

_spec = importlib.util.spec_from_file_location("update_trainer_map", HERE / "update_trainer_map.py")
trainer_map = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainer_map)


def cited_packages(text: str) -> tuple[str, ...]:
    """The upstream packages the table cites (their pinned versions must be installed to check that half)."""
    return tuple(sorted({row["ufile"].split("/")[0] for row in trainer_map.cited(text)}))


def check(text: str, root: Path | None) -> list[str]:
    """``update_trainer_map.check``'s errors, pointing at this command."""
    return [e.replace("docs/update_trainer_map.py", "docs/update_grpo_map.py")
            for e in trainer_map.check(text, root)]


def renumber(text: str, root: Path) -> str:
    """``text`` with every cited row's two line numbers set to where its quoted code is now."""
    out = []
    for line in text.split("\n"):
        match = trainer_map.CITATION.match(line)
        if match:
            row = match.groupdict()
            codes = {k: row[k].replace("\\|", "|") for k in ("ucode", "mcode")}
            uline = trainer_map.locate(root / row["ufile"], codes["ucode"])
            mline = trainer_map.locate(trainer_map.REPO / row["mfile"], codes["mcode"])
            line = line.replace(f"`{row['ufile']}:{row['uline']}`", f"`{row['ufile']}:{uline}`", 1)
            line = line.replace(f"`{row['mfile']}:{row['mline']}`", f"`{row['mfile']}:{mline}`", 1)
        out.append(line)
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    root, versions = trainer_map.upstream_root(cited_packages(text))
    if "--check" in argv:
        errors = check(text, root)
        summary = f"{len(trainer_map.cited(text))} rows: citations hold"
        print("\n".join(errors) or summary + ("" if root else f"; upstream half not checked: {versions}"))
        return 1 if errors else 0
    if root is None:
        print(f"cannot re-locate the upstream half: {versions}", file=sys.stderr)
        return 1
    DOC.write_text(renumber(text, root), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
