"""Chat-format SFT data: conversations (TRL's ``messages``), prompt/completion rows and the tweets
rendered by the chat template; the ids and loss masks against transformers' ``apply_chat_template`` and
TRL's SFTTrainer; packing keeps conversations whole; bad rows and templates are named; the offline chat
recipe trains a Llama-shaped model whose export transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from minift.chat_data import chat_tokenizer
from minift.chat_template import CHATML, ChatTemplateError, render
from minift.collate import Collator, PackingCollator
from minift.config import DataSection, RunConfigError, load_config
from minift.data import DataError, example_preparer
from minift.tokenizer import Tokenizer

from conftest import REPO

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
CONVERSATIONS = [
    [
        {"role": "system", "content": "Label tweets."},
        {"role": "user", "content": "i love it"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "and this?"},
        {"role": "assistant", "content": "neutral"},
    ],
    [{"role": "user", "content": "worst day ever"}, {"role": "assistant", "content": "negative"}],
]
PROMPT_COMPLETION = [
    {
        "prompt": [{"role": "user", "content": "so happy today"}],
        "completion": [{"role": "assistant", "content": "positive"}],
    },
    {"prompt": "just waiting", "completion": "neutral"},
]


def _backend() -> BackendTokenizer:
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("p", "o"), ("po", "s"), ("n", "e"), ("Ġ", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
        ]
    )
    return backend


def _tokenizer(template: str = "qwen2_5") -> Tokenizer:
    return Tokenizer(_backend(), chat_template=(TEMPLATES / f"{template}.jinja").read_text(), **SPECIAL)


def _examples(rows: list[dict], tokenizer, **data_fields):
    data = DataSection(format="chat", chat_template="", max_length=256, **data_fields)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    prepare, label_ids = example_preparer(data, splits, tokenizer)
    examples, report = prepare("train")
    return examples, report, label_ids


@pytest.mark.requires("transformers")
def test_conversations_match_transformers_ids_and_assistant_masks():
    """The template with {% generation %} markers: ids and masks equal transformers'
    ``apply_chat_template(return_assistant_tokens_mask=True)``; the original template (no markers,
    prefix rendering) marks the same turns less the newline after each role header."""
    from transformers import PreTrainedTokenizerFast

    marked = (TEMPLATES / "qwen2_5_training.jinja").read_text()
    theirs = PreTrainedTokenizerFast(tokenizer_object=_backend(), chat_template=marked, **SPECIAL)
    by_markers, report, label_ids = _examples(
        [{"messages": c} for c in CONVERSATIONS], _tokenizer("qwen2_5_training")
    )
    by_prefix, _, _ = _examples([{"messages": c} for c in CONVERSATIONS], _tokenizer("qwen2_5"))
    assert label_ids == [] and report.rows_kept == 2 and report.completion_lost == 0
    for i, chat in enumerate(CONVERSATIONS):
        expected = theirs.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
        assert by_markers.input_ids[i] == by_prefix.input_ids[i] == expected["input_ids"]
        assert by_markers.assistant_mask[i] == expected["assistant_masks"]
        newline = theirs.convert_tokens_to_ids("Ċ")
        starts = [
            t
            for t, m in enumerate(expected["assistant_masks"])
            if m and not expected["assistant_masks"][t - 1]
        ]
        assert all(expected["input_ids"][t] == newline for t in starts)
        assert by_prefix.assistant_mask[i] == [
            0 if t in starts else m for t, m in enumerate(expected["assistant_masks"])
        ]
        assert by_markers.prompt_length[i] == starts[0]


@pytest.mark.requires("transformers", "trl")
@pytest.mark.slow
def test_labels_equal_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (assistant_only_loss on messages; completion-only on prompt/completion) builds the
    same ids and the same loss positions as minift's collator (objective "assistant" / "completion")."""
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    original = (TEMPLATES / "qwen2_5.jinja").read_text()
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(), chat_template=original, **SPECIAL)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    cases = [
        ("messages", [{"messages": c} for c in CONVERSATIONS], "qwen2_5_training", "assistant", True),
        ("prompt-completion", PROMPT_COMPLETION[:1], "qwen2_5", "completion", False),
    ]
    for name, rows, template, objective, assistant_only in cases:
        args = trl.SFTConfig(
            output_dir=str(tmp_path / name),
            assistant_only_loss=assistant_only,
            bf16=False,
            report_to=[],
            max_length=None,
            packing=False,
            use_cpu=True,
        )
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
        )
        examples, _, _ = _examples(rows, _tokenizer(template))
        collate = Collator(pad_id=0, objective=objective)
        for i, row in enumerate(trainer.train_dataset):
            batch = collate([examples[i]])
            assert batch["input_ids"][0].tolist() == row["input_ids"], name
            assert batch["labels"][0].tolist() == row["labels"], name


def test_prompt_completion_and_tweets_rows():
    tok = _tokenizer("qwen2_5")
    for row, reply in zip(PROMPT_COMPLETION, ("positive", "neutral")):  # turns, then plain strings
        examples, _, _ = _examples([row], tok)
        prompt = (
            row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        )
        prompt_ids = tok.encode(render(tok.chat_template, prompt, add_generation_prompt=True, **SPECIAL))
        ids, n_prompt = examples.input_ids[0], examples.prompt_length[0]
        assert ids[:n_prompt] == prompt_ids and tok.decode(ids[n_prompt:]) == reply + "<|im_end|>\n"
        assert examples.assistant_mask[0] == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    tweets = [{"text": " i love this ", "label_text": "positive"}, {"text": "meh", "label_text": "neutral"}]
    examples, _, label_ids = _examples(
        tweets, tok, template="Sentiment? {text} {label}", system_prompt="Be brief."
    )
    first = tok.decode(examples.input_ids[0])
    assert first == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSentiment? i love this<|im_end|>\n"
        "<|im_start|>assistant\npositive<|im_end|>\n"
    )
    assert tok.decode(examples.input_ids[0][examples.prompt_length[0] :]) == "positive<|im_end|>\n"
    assert [tok.decode(ids) for ids in label_ids] == [
        f"{w}<|im_end|>\n" for w in ("negative", "neutral", "positive")
    ]
    assert examples.label_index == [2, 1]


def test_packing_keeps_conversations_whole_with_their_masks():
    examples, _, _ = _examples([{"messages": c} for c in CONVERSATIONS * 3], _tokenizer("qwen2_5"))
    items = [examples[i] for i in range(len(examples))]
    packed = PackingCollator(pad_id=0, objective="assistant", row_length=256, rows_per_batch=3)(items)
    alone = Collator(pad_id=0, objective="assistant")
    for r in range(3):
        docs = packed["document_ids"][r]
        for doc in docs.unique().tolist():
            if doc < 0:
                continue
            cols = (docs == doc).nonzero()[:, 0]
            ids = packed["input_ids"][r, cols].tolist()
            item = next(e for e in items if e["input_ids"] == ids)  # a whole conversation, never split
            labels = alone([item])["labels"][0].clone()
            labels[0] = -100
            assert packed["labels"][r, cols].tolist() == labels.tolist()
    assert packed["n_loss_targets"] == sum(sum(e["assistant_mask"][1:]) for e in items)


@pytest.mark.parametrize(
    "rows,message",
    [
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "split 'train' row 0: the conversation has no assistant",
        ),
        (
            [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                {"messages": [{"content": "no role"}]},
            ],
            "split 'train' row 1: turn 0 must be an object with \"role\"",
        ),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "completion": 5}],
            "row 0 completion: expected a non-empty",
        ),
        ([{"question": "a", "answer": "b"}], "needs a 'messages' column, 'prompt' and 'completion' columns"),
    ],
)
def test_bad_rows_are_named(rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        _examples(rows, _tokenizer("qwen2_5"))


def test_a_template_failing_on_a_row_names_the_row_and_message():
    tok = Tokenizer(
        _backend(),
        chat_template=(TEMPLATES / "mistral.jinja").read_text(),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    rows = [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}]
    with pytest.raises(DataError, match=r"row 1: the chat template fails at message 0 \(role 'system'\)"):
        _examples(rows, tok)


def test_chat_settings(tmp_path):
    with pytest.raises(RunConfigError, match='data.objective = "assistant" trains on the assistant turns'):
        load_config(None, ["data.objective=assistant"])
    with pytest.raises(RunConfigError, match="data.format 'xml'"):
        load_config(None, ["data.format=xml"])
    plain = Tokenizer(_backend(), source="plain")
    chatml = chat_tokenizer(
        Tokenizer(BackendTokenizer.from_str(_backend().to_str())),
        DataSection(format="chat", chat_template="chatml"),
    )
    assert chatml.chat_template == CHATML and plain.chat_template is None
    with pytest.raises(ChatTemplateError, match="the tokenizer has none"):
        chat_tokenizer(plain, DataSection(format="chat"))
    assert chat_tokenizer(plain, DataSection()).chat_template is None  # format "text": untouched


@pytest.mark.slow
def test_offline_chat_recipe_trains_and_scores(tmp_path):
    """configs/llama-chat-tiny.toml, shortened: a random Llama on the synthetic tweets as chat SFT."""
    import minift
    from minift.finetune import run

    cfg = load_config(
        REPO / "configs" / "llama-chat-tiny.toml",
        [
            f'train.output_dir="{tmp_path}"',
            "train.progress=false",
            "train.plot=false",
            "train.max_steps=6",
            "data.max_train_examples=200",
            "eval.max_examples=32",
            "train.eval_every=0",
        ],
    )
    summary = run(cfg, log=lambda *_: None)
    assert summary["last_loss"] < summary["first_loss"] and summary["eval_after"]["n_scored"] == 32
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    exported = minift.load_tokenizer(tmp_path / "model")
    assert exported.chat_template == CHATML and exported.token_to_id("<|im_end|>") is not None
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.requires("transformers")
@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type,fields",
    [
        ("llama", {"num_key_value_heads": 2}),
        ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
        ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
        ("mistral", {"num_key_value_heads": 1, "sliding_window": 8}),
    ],
)
def test_each_family_fine_tunes_from_a_transformers_checkpoint_and_exports(tmp_path, model_type, fields):
    """A transformers checkpoint of each family, fine-tuned by ``minift train`` on the synthetic tweets in
    chat format; transformers loads the export to minift's logits."""
    import transformers

    import minift
    from minift.finetune import build_tokenizer, run

    cfg = load_config(
        REPO / "configs" / "llama-chat-tiny.toml",
        [
            f'train.output_dir="{tmp_path / "run"}"',
            "train.progress=false",
            "train.plot=false",
            "train.max_steps=6",
            "data.max_train_examples=200",
            "eval.max_examples=32",
            "train.eval_every=0",
            "model.pad_vocab_to=0",
        ],
    )
    vocab = build_tokenizer(cfg).vocab_size
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    hf = transformers.AutoModelForCausalLM.from_config(
        config_cls(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **fields,
        )
    )
    hf.save_pretrained(tmp_path / "start")
    cfg.model.name, cfg.model.config = str(tmp_path / "start"), {}
    summary = run(cfg, log=lambda *_: None)
    assert summary["last_loss"] < summary["first_loss"]
    mine = minift.from_pretrained(tmp_path / "run" / "model")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.randint(0, vocab, (2, 20))
    with torch.no_grad():
        assert (back(ids).logits - mine(ids)).abs().max() <= 1e-5
    assert type(back).__name__ == type(mine).__name__


@pytest.mark.requires("transformers")
@pytest.mark.shared
@pytest.mark.slow
def test_smollm2_config_runs_on_a_stand_in(tmp_path):
    """configs/smollm2-tweets.toml as shipped, its hub checkpoint replaced by a tiny random Llama with a
    SmolLM2-like tokenizer (byte-level BPE + <|im_start|>/<|im_end|>), on the shared tweets."""
    import transformers

    import minift
    from minift.finetune import run

    from conftest import shared_path

    stand_in = tmp_path / "smollm2-stand-in"
    backend = BackendTokenizer.from_file(str(shared_path("tokenizers", "gpt2", "tokenizer.json")))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")]
    )
    stand_in.mkdir()
    backend.save(str(stand_in / "tokenizer.json"))
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (stand_in / "tokenizer_config.json").write_text(json.dumps(special))
    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(stand_in)
    cfg = load_config(
        REPO / "configs" / "smollm2-tweets.toml",
        [
            f'model.name="{stand_in}"',
            f'data.source="{shared_path("data", "tweet_sentiment_extraction")}"',
            f'train.output_dir="{tmp_path / "run"}"',
            "train.max_steps=4",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=1e-3",
            "eval.max_examples=48",
            "train.progress=false",
            "train.plot=false",
        ],
    )
    summary = run(cfg, log=lambda *_: None)
    assert summary["eval_after"]["n_scored"] == 48 and summary["last_loss"] < summary["first_loss"]
    exported = tmp_path / "run" / "model"
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
        assert (minift.from_pretrained(exported)(ids) - theirs).abs().max() <= 1e-5
