"""The offline default's material, made by the project itself: tweet-style sentences with a
sentiment label, and a small GPT-1-style BPE tokenizer trained on them with ``tokenizers``.

Deterministic for a seed, byte for byte. Written to a directory in the mteb schema (``train.jsonl``,
``test.jsonl``: id, text, label, label_text) so the normal data path loads it.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers

LABELS = ("negative", "neutral", "positive")
_WORDS = {
    "positive": ["love", "great", "awesome", "happy", "amazing", "best", "fun", "glad", "excited",
                 "wonderful", "thanks", "nice", "cool", "enjoyed", "beautiful"],
    "negative": ["hate", "sad", "awful", "terrible", "worst", "bored", "tired", "sick", "miss", "angry",
                 "sorry", "ugh", "broken", "lost", "hurts"],
    "neutral": ["going", "today", "just", "watching", "reading", "working", "heading", "waiting", "thinking",
                "eating", "listening", "home", "later", "tomorrow", "again"],
}
_SUBJECTS = ["the new phone", "this weather", "my morning", "the concert", "work", "the game", "my weekend",
             "that movie", "the coffee", "school", "the trip", "my sister", "the show", "lunch",
             "the traffic"]
_FILLERS = ["so", "really", "kinda", "just", "totally", "lol", "omg", "haha", "today", "right now", "tbh",
            "..."]
_PATTERNS = ["{w1} {s} {f}", "{s} is {f} {w1}", "{f} {w1} {s} {w2}", "i {w1} {s}", "{s} {w1} {w2} {f}",
             "@user {w1} {s}", "{s} ... {w1}", "{f} {s} {w1}!"]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(3)
        words = _WORDS[LABELS[label]]
        text = rng.choice(_PATTERNS).format(w1=rng.choice(words), w2=rng.choice(words),
                                            s=rng.choice(_SUBJECTS), f=rng.choice(_FILLERS))
        if rng.random() < 0.3:
            text = text.capitalize()
        rows.append({"id": f"syn{seed}-{i}", "text": text, "label": label, "label_text": LABELS[label]})
    return rows


def write_dataset(directory: Path, n_train: int = 2400, n_test: int = 300, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        path = directory / f"{split}.jsonl"
        lines = "".join(json.dumps(row) + "\n" for row in make_rows(n, split_seed))
        if not path.exists() or path.read_text() != lines:
            path.write_text(lines)
    return directory


def train_bpe(texts: list[str], n_merges: int = 300) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A GPT-1-style BPE (lowercase, Bert pre-tokenizer, ``</w>`` on each word's last symbol)
    learned from ``texts``. Plain rank-greedy training with ties broken by the pair's text,
    so the result is the same on every machine (the ``tokenizers`` trainer breaks ties by
    hash order, which differs between runs)."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    symbols = sorted({s for word in counts for s in word})
    merges: list[tuple[str, str]] = []
    words = dict(counts)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_words = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    vocab = {"<unk>": 0}
    for token in symbols + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(directory: Path, texts: list[str]) -> Path:
    """``vocab.json`` + ``merges.txt`` that ``minift.load_tokenizer`` builds the GPT-1 pipeline from."""
    vocab, merges = train_bpe(texts + [f"sentiment: {label}" for label in LABELS] * 50)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return directory


def prepare(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write (or reuse) the synthetic dataset and its tokenizer under ``directory``."""
    directory = Path(directory)
    data_dir = write_dataset(directory / "data", seed=seed)
    tokenizer_dir = directory / "tokenizer"
    if not (tokenizer_dir / "merges.txt").exists():
        texts = [json.loads(line)["text"] for line in (data_dir / "train.jsonl").read_text().splitlines()]
        write_tokenizer(tokenizer_dir, texts)
    return data_dir, tokenizer_dir
