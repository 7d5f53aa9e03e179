"""Hostile and careless use of the pair commands (``minift dpo``, ``reward``, ``score``): settings
they would ignore are refused, pairs that cannot teach are dropped and counted, a single pairs file
holds out ``data.validation_fraction``, and a reward model is scored as its pairs were tokenized
(docs/robustness.md lists every case)."""
from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from minift.cli import main
from minift.config import RunConfigError, load_config
from minift.data import DataError
from minift.models import GPT2Config, GPTConfig, build_model
from minift.preference.config import PreferenceConfig
from minift.preference.dpo import DPOObjective, SequenceLogProbs
from minift.preference.pairs import PairCollator, TokenizedPairs, append_eos_for, tokenize_pairs
from minift.preference.recipe import run_dpo
from minift.preference.reward import RewardModel, load_reward_model
from minift.preference.score import rank_completions
from minift.tokenizer import ensure_pad_token, load_tokenizer

from conftest import REPO, shared_path

QUIET = dict(log=lambda *_: None)
SMALL = ["pairs.max_train_pairs=16", "pairs.max_eval_pairs=8", "train.batch_size=4", "train.grad_accum=1",
         "train.max_steps=1", "eval.batch_size=8"]


def _config(stage: str, out, *overrides):
    return load_config(REPO / "configs" / f"{stage}-tiny.toml", [f'train.output_dir="{out}"', *SMALL,
                                                                *overrides], stage=PreferenceConfig)


def cli(capsys, *argv):
    """``minift ARGV`` in this process: (exit code, its ``minift:`` lines on stderr), never a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("minift")]


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), row))) + "\n"
                            for row in rows))


# -- settings the pair commands would ignore, refused before anything is created -----------------------------
@pytest.mark.parametrize("stage,setting,message", [
    ("dpo", "data.sampler=packed", 'data.sampler = "packed" fills rows with sequences; pairs are batched as '
                                   'pairs'),
    ("reward", "data.packing=true", "data.packing = true concatenates sequences; the pair commands keep "
                                    "each"),
    ("dpo", "data.padding=max_length", 'data.padding = "max_length" is not supported for pairs'),
    ("reward", "pairs.append_eos=maybe", "pairs.append_eos must be one of ['auto', 'yes', 'no']"),
    ("dpo", "pairs.source=./no/such/pairs.jsonl", "pairs.source = ./no/such/pairs.jsonl: no such file or "
                                                  "directory"),
])
def test_pair_commands_refuse_what_they_would_ignore(tmp_path, capsys, stage, setting, message):
    out = tmp_path / "run"
    code, err = cli(capsys, stage, REPO / "configs" / f"{stage}-tiny.toml", "--set",
                    f"train.output_dir={out}", "--set", setting)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_the_library_path_refuses_them_too(tmp_path):
    cfg = load_config(REPO / "configs" / "offline-default.toml", [f'train.output_dir="{tmp_path}"',
                                                                  "data.sampler=packed"])
    with pytest.raises(RunConfigError, match='data.sampler = "packed"'):
        run_dpo(cfg, PreferenceConfig(), **QUIET)


@pytest.mark.parametrize("setting,expected", [("true", "yes"), ("false", "no"), ('"auto"', "auto")])
def test_append_eos_takes_yes_no_auto_and_old_booleans(setting, expected):
    from minift.checkpoint import same_setting

    cfg = load_config(None, [f"pairs.append_eos={setting}", f"data.append_eos={setting}"],
                      stage=PreferenceConfig)
    assert cfg.stage.pairs.append_eos == expected and cfg.data.append_eos == expected
    assert same_setting(False, "no") and same_setting(True, "yes") and not same_setting(False, "auto")


# -- pairs that cannot teach --------------------------------------------------------------------------------
class CharTokenizer:
    """One id per character (a=1, ..., space=27, ':'=28), EOS 29: token boundaries known by hand."""

    source, eos_id, pad_id = "chars", 29, 0

    def encode(self, text):
        return [27 if c == " " else 28 if c == ":" else ord(c) - 96 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_pairs_that_cannot_teach_are_dropped_and_counted():
    rows = [("ab:", " x", " y"), ("ab:", " x", " x"), ("ab:", "", " y"), ("ab:", " x", ""),
            ("ab:", " xyz", " xyw"), ("a:", " z", " zz")]
    pairs = datasets.Dataset.from_dict({k: [r[i] for r in rows]
                                        for i, k in enumerate(("prompt", "chosen", "rejected"))})
    tokenized, report = tokenize_pairs(pairs, CharTokenizer(), max_length=6)
    # row 4: " xyz" and " xyw" are both cut to " xy" (3 tokens of room after the prompt): identical as trained
    assert (report.dropped_identical, report.dropped_empty, report.pairs) == ([1, 4], [2, 3], 2)
    assert tokenized.chosen_ids == [[27, 24], [27, 26]] and tokenized.rejected_ids == [[27, 25], [27, 26, 26]]
    assert report.line().endswith("2 dropped (empty chosen or rejected; rows 2, 3), 2 dropped (chosen = "
                                  "rejected; rows 1, 4)")
    with pytest.raises(DataError, match="no pair left"):
        tokenize_pairs(pairs.select([1, 2]), CharTokenizer(), max_length=8)


def _pairs_file(tmp_path):
    rows = [(f"tweet {i} sentiment:", " positive", " negative") for i in range(40)]
    rows[3] = (rows[3][0], " positive", " positive")
    rows[5], rows[7] = (rows[5][0], "", " x"), (rows[7][0], " x", "")
    _write_pairs(tmp_path / "pairs.jsonl", rows)
    return tmp_path / "pairs.jsonl"


def test_one_pairs_file_holds_out_the_validation_fraction(tmp_path):
    from minift.preference.pairs import load_pairs

    splits = load_pairs(str(_pairs_file(tmp_path)), seed=0, validation_fraction=0.25)
    assert (len(splits["train"]), len(splits["validation"])) == (30, 10)  # datasets' rule: ceil(0.25 * 40)
    rows = list(splits["train"]["row"]) + list(splits["validation"]["row"])
    assert sorted(rows) == list(range(40))  # each pair keeps its row in the file
    _, report = tokenize_pairs(splits["validation"], CharTokenizer(), 64, name="eval")
    assert set(report.dropped_rows) <= {3, 5, 7}  # reported by their row in the file


@pytest.mark.slow
def test_a_dpo_run_on_one_pairs_file_holds_out_the_fraction_and_names_dropped_rows(tmp_path):
    source = f'pairs.source="{_pairs_file(tmp_path)}"'
    with pytest.raises(DataError, match="no 'test' split .* or set data.validation_fraction"):
        run_dpo(_config("dpo", tmp_path / "refused", source), **QUIET)
    lines = []
    run_dpo(_config("dpo", tmp_path / "run", source, "data.validation_fraction=0.25",
                    "pairs.max_train_pairs=0", "pairs.max_eval_pairs=0"), log=lines.append)
    reports = [line for line in lines if line.startswith(("pairs: train:", "pairs: eval:"))]
    assert reports[0].startswith("pairs: train: 30 rows read") and reports[1].startswith("pairs: eval: 10 "
                                                                                         "rows read")
    dropped = {int(r) for line in reports for r in
               ",".join(part.split("rows ")[1].rstrip(")") for part in line.split("dropped "
                                                                                  "(")[2:]).split(",")}
    assert dropped == {3, 5, 7}  # the file's own row numbers, in whichever split they fell


def test_a_null_completion_is_dropped_as_empty_and_a_null_prompt_or_a_missing_split_refused(tmp_path):
    from minift.preference.pairs import load_pairs

    rows = [{"prompt": f"p{i}:", "chosen": " a", "rejected": " b"} for i in range(4)]
    rows[1]["chosen"] = None
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, report = tokenize_pairs(load_pairs(str(tmp_path))["train"], CharTokenizer(), 16)
    assert (report.pairs, report.dropped_empty) == (3, [1])
    rows[2]["prompt"] = None
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="split 'train' row 2: 'prompt' is null — give the prompt"):
        load_pairs(str(tmp_path))
    from minift.preference.recipe import build_pairs

    tweets = tmp_path / "tweets"
    tweets.mkdir()
    for split in ("train", "test"):
        (tweets / f"{split}.jsonl").write_text(json.dumps({"text": "fine", "label_text": "positive"}) + "\n")
    cfg = _config("dpo", tmp_path / "run", f'data.source="{tweets}"', "data.eval_split=nope")
    with pytest.raises(DataError, match=r"tweets: no 'nope' split \(found \['test', 'train'\]\)"):
        build_pairs(cfg, CharTokenizer(), print, "dpo")


def test_a_pairs_max_length_the_model_cannot_hold_is_refused_at_start_up(tmp_path):
    with pytest.raises(DataError, match=r"pairs.max_length \(100\) exceeds the model's n_positions \(64\)"):
        run_dpo(_config("dpo", tmp_path, "pairs.max_length=100"), **QUIET)


def test_labels_the_tokenizer_confuses_are_refused_for_tweet_pairs(tmp_path):
    with pytest.raises(DataError, match="are the same tokens"):
        run_dpo(_config("dpo", tmp_path, "data.labels=['\U0001F622', '\U0001F610', '\U0001F600']"), **QUIET)


def test_overwrite_refuses_a_model_inside_the_folder_it_would_move(tmp_path, capsys):
    out, model = tmp_path / "run", tmp_path / "run" / "model"  # a run, its model the next run's start
    build_model(GPTConfig(vocab_size=10, n_positions=8, n_embd=4, n_layer=1, n_head=1)).save_pretrained(model)
    (out / "metrics.jsonl").write_text("{}\n")
    code, err = cli(capsys, "dpo", REPO / "configs" / "dpo-tiny.toml", "--overwrite", "--set",
                    f"train.output_dir={out}", "--set", f"model.name={model}")
    assert code == 2 and len(err) == 1
    assert f"model.name = {model} is inside train.output_dir {out}, which --overwrite would" in err[0]
    assert (model / "model.safetensors").exists() and not (tmp_path / "run.previous-1").exists()


# -- ipo as TRL computes it -----------------------------------------------------------------------------
def test_ipo_averages_over_every_completion_token_as_trl_even_with_an_empty_prompt():
    """TRL divides the summed log-ratio by the completion mask's count, unshifted: with an empty prompt
    that counts the first token, which no position predicts (so it has no log-prob)."""
    torch.manual_seed(0)
    policy, reference = (build_model(GPTConfig(vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
                         for _ in range(2))
    pairs = TokenizedPairs([[], [5, 6]], [[1, 2, 3], [7, 8]], [[4, 9], [10]])  # pair 0 has an empty prompt
    batch = PairCollator(pad_id=0)([pairs[0], pairs[1]])
    objective = DPOObjective(beta=0.3, loss_type="ipo", reference=SequenceLogProbs(reference).eval())
    got = objective(SequenceLogProbs(policy), batch, torch.device("cpu")).loss_sum

    @torch.no_grad()
    def logps(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
        return sum(float(logp[t - 1, ids[0, t]]) for t in range(max(len(prompt), 1), ids.shape[1]))


    want = 0.0
    for prompt, chosen, rejected in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids):
        ratio_c = logps(policy, prompt, chosen) - logps(reference, prompt, chosen)
        ratio_r = logps(policy, prompt, rejected) - logps(reference, prompt, rejected)
        want += (ratio_c / len(chosen) - ratio_r / len(rejected) - 1 / (2 * 0.3)) ** 2
    assert float(got.detach()) == pytest.approx(want, rel=1e-10)


# -- score -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A reward model and a language model (tiny, random) with the GPT-1 tokenizer, in minift's layout,
    and broken copies of the reward model's folder."""
    root = tmp_path_factory.mktemp("score")
    tokenizer = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-openai-gpt")))
    torch.manual_seed(0)
    config = dict(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=2)
    reward = RewardModel(build_model(GPTConfig(**config)), tokenizer.pad_id)
    lm = build_model(GPTConfig(**config))
    run_config = {"data": {"template": "{text} sentiment: {label}", "labels": ["negative", "positive"]},
                  "pairs": {"append_eos": "auto"}}
    for name, model in (("reward", reward), ("lm", lm), ("no_run_config", reward), ("empty_config", reward),
                        ("list_run_config", reward)):
        model.save_pretrained(root / name)
        tokenizer.save(root / name)
    (root / "reward" / "run_config.json").write_text(json.dumps(run_config))
    (root / "empty_config" / "config.json").write_text("")
    (root / "list_run_config" / "run_config.json").write_text("[1]")
    (root / "no_config").mkdir()
    return root


@pytest.mark.parametrize("args,message", [
    (["hi", "--model", "@/reward", "--policy", "@/lm", "--n", "0"], "--n 0: best-of-n samples between 1 and "
                                                                    "10000"),
    (["hi", "--model", "@/reward", "--policy", "@/lm", "--n", "-2"], "--n -2: best-of-n samples between 1 "
                                                                     "and"),
    (["hi", "--model", "@/reward", "--policy", "@/lm", "--n", "100000"], "--n 100000: best-of-n samples "
                                                                         "between"),
    (["hi", "--model", "@/reward", "--policy", "@/lm", "--max-new-tokens", "0"], "needs at least 1 new "
                                                                                 "token"),
    (["hi", "--model", "@/reward", "--policy", "@/lm", "--temperature", "nan"], "--temperature nan: must be"),
    (["", "", "--model", "@/reward"], "nothing to score: the prompt and a completion are both empty"),
    (["hi", "word " * 40, "--model", "@/reward"], "is 41 tokens; the reward model holds 32 — shorten it"),
    (["hi", "--model", "@/empty_config"], "empty_config/config.json: not valid JSON"),
    (["hi", "--model", "@/no_config"], "model config not found: @/no_config/config.json"),
    (["hi", "--model", "@/lm"], "holds a OpenAIGPTLMHeadModel (a language model), not a reward model"),
    (["hi", "--model", "@/no_run_config"], "has no run_config.json naming its labels"),
    (["hi", "--model", "@/list_run_config"], "run_config.json: not a minift run config (a JSON list)"),
    (["hi", " x", "--model", "@/reward", "--policy", "@/lm"], "give the completions to rank, or --policy to "
                                                            "sample them, not both"),
])
def test_score_refusals_are_one_line(capsys, folders, args, message):
    code, err = cli(capsys, "score", *[a.replace("@", str(folders)) for a in args])
    assert code == 2 and len(err) == 1 and message.replace("@", str(folders)) in err[0], err


@pytest.mark.parametrize("command", [["predict", "so good"], ["generate", "so good"]])
def test_language_model_commands_refuse_a_reward_model(capsys, folders, command):
    code, err = cli(capsys, *command, "--model", folders / "reward")
    assert code == 2 and len(err) == 1
    assert "holds a OpenAIGPTForSequenceClassification (a reward model, minift reward's), not a language" \
        in err[0]


def test_best_of_n_samples_in_batches_and_says_how_far_it_is(capsys, folders, monkeypatch):
    from minift.preference import score

    monkeypatch.setattr(score, "SAMPLE_BATCH", 4)
    code = main(["score", "what a day sentiment:", "--model", str(folders / "reward"), "--policy",
                 str(folders / "lm"), "--n", "10", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.splitlines()) == 10
    assert captured.err.splitlines() == [f"best-of-n: {n}/10 continuations sampled" for n in (4, 8, 10)]


def test_append_eos_auto_is_trls_way_and_old_booleans_still_decide():
    tokenizer = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-gpt2")))  # pad = EOS
    padded = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-gpt2")), "[PAD]")  # pad != EOS
    no_eos = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-openai-gpt")))
    cases = [("auto", tokenizer, "dpo", True), ("auto", tokenizer, "reward", False),
             ("auto", padded, "reward", True), ("auto", no_eos, "dpo", False),
             ("yes", tokenizer, "reward", True), ("no", padded, "dpo", False),
             (True, tokenizer, "reward", True), (False, padded, "dpo", False)]
    for setting, tok, stage, expected in cases:
        assert append_eos_for(setting, tok, stage) == expected, (setting, tok.pad_token, stage)


@pytest.mark.parametrize("setting,with_eos", [("yes", True), ("auto", False), (None, False)])
def test_score_appends_eos_as_the_reward_models_pairs_had_it(tmp_path, setting, with_eos):
    """GPT-2's tokenizer pads with EOS: "auto" then leaves EOS off for a reward model (the reward is
    read at the last real token; transformers' classifier reads the last token that is not the pad).
    No run_config.json (None): a folder minift did not write is scored TRL's way, as "auto"."""
    tokenizer = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-gpt2")))
    torch.manual_seed(0)
    lm = build_model(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=8, n_layer=1,
                                n_head=2))
    RewardModel(lm, tokenizer.pad_id).save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    if setting is not None:
        (tmp_path / "run_config.json").write_text(json.dumps({"pairs": {"append_eos": setting}}))
    ranked = dict((text, reward) for reward, text in rank_completions(str(tmp_path), "so "
                                                                                     "good", [" yes", " no"]))
    model = load_reward_model(tmp_path)
    for completion in (" yes", " no"):
        ids = tokenizer.encode("so good" + completion) + ([tokenizer.eos_id] if with_eos else [])
        with torch.no_grad():
            want = float(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
        assert ranked[completion] == pytest.approx(want, abs=1e-6)


@pytest.mark.requires("transformers")
def test_auto_eos_scores_what_trl_scores(tmp_path):
    """TRL appends EOS to every completion; with GPT-2 (pad = EOS) its reward model — transformers'
    sequence classifier — reads the last token that is not the pad, the one before EOS. minift's reward
    stage leaves EOS off there ("auto") and reads its last real token: the same reward. DPO keeps EOS
    (TRL's add_eos, on the text)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = ensure_pad_token(load_tokenizer(shared_path("fixtures", "tiny-gpt2")))
    assert tokenizer.pad_id == tokenizer.eos_id and not append_eos_for("auto", tokenizer, "reward")
    torch.manual_seed(0)
    RewardModel(build_model(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=8, n_layer=1,
                                       n_head=2)), tokenizer.pad_id).save_pretrained(tmp_path)
    theirs = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    pairs = datasets.Dataset.from_dict({"prompt": ["so good sentiment:", "meh sentiment:"],
                                        "chosen": [" positive", " neutral"],
                                        "rejected": [" negative", " positive"]})
    mine, _ = tokenize_pairs(pairs, tokenizer, 32, append_eos_for("auto", tokenizer, "reward"))
    batch = PairCollator(tokenizer.pad_id)([mine[i] for i in range(2)])
    prompts, chosen, rejected = (list(pairs[c]) for c in ("prompt", "chosen", "rejected"))
    trl_text = [p + c + "<|endoftext|>" for p, c in zip(prompts * 2, chosen + rejected)]  # TRL's add_eos
    trl_ids = [tokenizer.encode(t) for t in trl_text]
    width = max(map(len, trl_ids))
    ids = torch.tensor([row + [tokenizer.pad_id] * (width - len(row)) for row in trl_ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in trl_ids])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        got = load_reward_model(tmp_path)(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    dpo, _ = tokenize_pairs(pairs, tokenizer, 32, append_eos_for("auto", tokenizer, "dpo"))
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    assert [p + c for p, c in zip(prompt_ids, dpo.chosen_ids)] == trl_ids[:2]
    assert [p + r for p, r in zip(prompt_ids, dpo.rejected_ids)] == trl_ids[2:]
    assert math.isfinite(float(got.sum()))
