"""The preference stage: pairs, collation, DPO and the reward model, against independent references
(hand-written float64 formulas, a full-logits log-prob computation, transformers' sequence
classifier, TRL's trainers live or through their saved trace)."""
from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from minift.config import RunConfigError
from minift.data import DataError
from minift.loop import Hooks, train
from minift.models import GPTConfig, build_model
from minift.optim import make_adamw, make_scheduler
from minift.preference.dpo import DPOObjective, SequenceLogProbs, dpo_losses
from minift.preference.pairs import (
    PairCollator,
    PairObjective,
    TokenizedPairs,
    load_pairs,
    tokenize_pairs,
    tweet_pairs,
)
from minift.preference.recipe import load_preference_config, run_dpo
from minift.preference.reward import RewardModel, load_reward_model
from minift.sampling import SequentialSampler

from conftest import REPO, shared_path
from trl_preference import SETUP, STEP_KEYS, TRACE, run_minift, run_trl, weight_sums

CPU = torch.device("cpu")


class CharTokenizer:
    """One id per character (a=1, b=2, ...; space=27, ':'=28): token boundaries known by hand."""

    source = "chars"
    eos_id = 29
    pad_id = 0

    def encode(self, text):
        return [27 if c == " " else 28 if c == ":" else ord(c) - 96 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def _pairs(rows):
    return datasets.Dataset.from_dict({k: [r[i] for r in rows]
                                       for i, k in enumerate(("prompt", "chosen", "rejected"))})


# -- pairs ----------------------------------------------------------------------------------------------
def test_tweet_pairs_chosen_is_gold_rejected_is_wrong_and_seeded():
    rows = datasets.Dataset.from_dict({"text": ["good day ", "meh", "  ", "awful"],
                                       "label_text": ["positive", "neutral", "neutral", "negative"]})
    labels = ["negative", "neutral", "positive"]
    one = tweet_pairs(rows, "train", "{text} sentiment: {label}", labels, "one", seed=3)
    # empty row 2 skipped
    assert one["prompt"] == ["good day sentiment:", "meh sentiment:", "awful sentiment:"]
    assert one["chosen"] == [" positive", " neutral", " negative"]
    assert all(r != c and r.strip() in labels for r, c in zip(one["rejected"], one["chosen"]))
    assert one["rejected"] == tweet_pairs(rows, "train", "{text} sentiment: {label}", labels, "one",
                                          seed=3)["rejected"]
    both = tweet_pairs(rows, "train", "{text} sentiment: {label}", labels, "both")
    assert both["row"] == [0, 0, 1, 1, 3, 3]
    assert both["rejected"][:2] == [" negative", " neutral"]


def test_tokenize_pairs_truncates_the_end_and_drops_prompts_that_fill_max_length():
    pairs = _pairs([("ab:", " xyz", " q"), ("abcdef:", " x", " y"), ("abcdefgh:", " x", " y")])
    tokenized, report = tokenize_pairs(pairs, CharTokenizer(), max_length=6)
    # pair 0: prompt 3 tokens, room 3: " xyz" (4 tokens) loses its last token; pair 1: prompt 7 >= 6;
    # pair 2 too
    assert tokenized.prompt_ids == [[1, 2, 28]]
    assert tokenized.chosen_ids == [[27, 24, 25]] and tokenized.rejected_ids == [[27, 17]]
    assert (report.pairs, report.truncated, report.dropped_long_prompt,
            report.dropped_rows) == (1, 1, 2, [1, 2])
    with_eos, _ = tokenize_pairs(pairs.select([0]), CharTokenizer(), max_length=20, append_eos=True)
    assert with_eos.chosen_ids == [[27, 24, 25, 26, 29]] and with_eos.rejected_ids == [[27, 17, 29]]


def test_pair_collator_one_batch_chosen_then_rejected_completion_only_labels():
    pairs = TokenizedPairs(prompt_ids=[[5, 6], [7]], chosen_ids=[[8], [9, 10]],
                           rejected_ids=[[11, 12, 13], [14]])
    batch = PairCollator(pad_id=0)([pairs[0], pairs[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 8, 0, 0], [7, 9, 10, 0, 0],
                                           [5, 6, 11, 12, 13], [7, 14, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, -100, -100], [-100, 9, 10, -100, -100],
                                        [-100, -100, 11, 12, 13], [-100, 14, -100, -100, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 3, 5, 2]
    assert (batch["n_pairs"], batch["n_real_tokens"], batch["n_padded_tokens"]) == (2, 13, 20)
    assert batch["pair_index"].tolist() == [0, 1]


def test_load_pairs_reads_trl_format_and_names_a_missing_column(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a",
                                                      "rejected": " b"}) + "\n")
    assert load_pairs(str(tmp_path))["train"]["chosen"] == [" a"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rejected'\]"):
        load_pairs(str(tmp_path))


def test_preference_config_sections_and_errors(tmp_path):
    cfg, pref = load_preference_config(REPO / "configs" / "dpo-tiny.toml",
                                       ["dpo.beta=0.5", "pairs.rejected=both"])
    assert (pref.dpo.beta, pref.pairs.rejected, cfg.train.max_steps) == (0.5, "both", 6)
    with pytest.raises(RunConfigError, match=r"unknown key \[dpo\] betta"):
        load_preference_config(REPO / "configs" / "dpo-tiny.toml", ["dpo.betta=0.5"])
    with pytest.raises(RunConfigError, match="loss_type"):
        load_preference_config(REPO / "configs" / "dpo-tiny.toml", ["dpo.loss_type=kto"])


# -- DPO --------------------------------------------------------------------------------------------------
def _tiny_lm(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_model(GPTConfig(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dtype)


def _random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, 39, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return TokenizedPairs([ids(1, 6) for _ in range(n)], [ids(1, 4) for _ in range(n)],
                          [ids(1, 4) for _ in range(n)])


def test_sequence_log_probs_equal_full_logits_sum_over_completion():
    lm = _tiny_lm()
    batch = PairCollator(pad_id=0)([_random_pairs(5)[i] for i in range(5)])
    got = SequenceLogProbs(lm)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    # every position, float64
    logp = torch.log_softmax(lm(batch["input_ids"], batch["attention_mask"]), dim=-1)
    want = torch.zeros(10, dtype=torch.float64)
    for row in range(10):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][row, t] != -100:
                want[row] += logp[row, t - 1, batch["labels"][row, t]]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_match_the_formulas_in_float64(loss_type):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    nc, nr = torch.tensor([1, 2, 3, 1, 2, 3]), torch.tensor([3, 1, 2, 2, 1, 1])
    beta, eps = 0.3, 0.1
    got = dpo_losses(pc - rc, pr - rr, beta, loss_type, eps if loss_type == "sigmoid" else 0.0, nc, nr)
    for i in range(6):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            want = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * d))) \
                - eps * math.log(1 / (1 + math.exp(beta * d)))
        elif loss_type == "hinge":
            want = max(0.0, 1 - beta * float(d))
        else:
            want = (float((pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]) - 1 / (2 * beta)) ** 2
        assert float(got[i]) == pytest.approx(want, rel=1e-12, abs=1e-14)


def _dpo_run(batch_size, accum, reference):
    lm = _tiny_lm()
    pairs = _random_pairs(12)
    ref = SequenceLogProbs(_tiny_lm(seed=1)).eval()
    objective = DPOObjective(beta=0.5, loss_type="sigmoid", reference=ref)
    if reference == "precomputed":
        batch = PairCollator(0)([pairs[i] for i in range(12)])
        with torch.no_grad():
            objective = DPOObjective(beta=0.5, reference_logps=torch.stack(ref(batch["input_ids"], batch[
                "attention_mask"], batch["labels"]).chunk(2), dim=1))
    module = SequenceLogProbs(lm)
    optimizer = make_adamw(module, 1e-2, 0.0, fused="no")
    records = []
    train(module, optimizer, make_scheduler(optimizer, "constant", 3),
          torch.utils.data.DataLoader(pairs, batch_sampler=SequentialSampler(12, batch_size),
                                      collate_fn=PairCollator(0)),
          total_steps=3, grad_accum=accum, max_grad_norm=0.5, loss=PairObjective(objective),
          hooks=Hooks(log=records.append))
    return lm.state_dict(), records


def test_dpo_accumulation_equals_one_big_batch_and_precomputed_equals_frozen():
    big, big_log = _dpo_run(4, 1, "frozen")
    for batch_size, accum, reference in ((1, 4, "frozen"), (4, 1, "precomputed")):
        small, small_log = _dpo_run(batch_size, accum, reference)
        for key in big:
            torch.testing.assert_close(small[key], big[key], rtol=0, atol=1e-10)
        # the loop sums the loss in float32
        for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert [r[name] for r in small_log] == pytest.approx([r[name] for r in big_log], abs=1e-6)
    assert big_log[0]["rewards/chosen"] != 0.0  # the reference differs from the policy: real rewards logged


# -- reward model --------------------------------------------------------------------------------------------
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("fixture", ["tiny-openai-gpt", "tiny-gpt2"])
def test_reward_model_saved_by_minift_loads_in_transformers(tmp_path, fixture):
    from transformers import AutoModelForSequenceClassification

    import minift

    lm = minift.from_pretrained(shared_path("fixtures", fixture))
    pad = lm.config.vocab_size - 1  # any id; GPT-2 pads with EOS (50256) exactly so
    torch.manual_seed(0)
    rm = RewardModel(lm, pad).eval()
    rm.save_pretrained(tmp_path)
    theirs = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert theirs.config.num_labels == 1
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad, pad], [11, pad, pad, pad]])
    mask = (torch.arange(4)[None] < torch.tensor([[4], [2], [1]])).long()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(rm(ids, mask), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_reward_model(tmp_path)(ids, mask), want, rtol=0, atol=1e-5)


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_llama_family_reward_model_loads_in_transformers_and_back(tmp_path, family):
    """The backbone saved under ``model.*`` with ``score.weight``, as ``LlamaForSequenceClassification``
    (and its Qwen2 / Qwen3 / Mistral kin) hold it: the same scores in transformers and after minift
    reloads it."""
    from transformers import AutoModelForSequenceClassification

    from minift.models import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, build_model

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                 tie_word_embeddings=False)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
              "mistral": MistralConfig}[family]
    torch.manual_seed(0)
    lm = build_model(config(**shape, **({"head_dim": 8} if family == "qwen3" else {})))
    pad = 63
    rm = RewardModel(lm, pad).eval()
    rm.save_pretrained(tmp_path)
    theirs = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(theirs).__name__ == f"{config.architecture[:-len('ForCausalLM')]}ForSequenceClassification"
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, pad, pad], [12, pad, pad, pad, pad]])
    mask = (torch.arange(5)[None] < torch.tensor([[5], [3], [1]])).long()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(rm(ids, mask), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_reward_model(tmp_path)(ids, mask), want, rtol=0, atol=1e-5)


def test_minift_reward_trains_a_llama_shaped_backbone(tmp_path):
    """``minift reward`` on a Llama-family model: trains, and the model/ it exports scores as the model
    in its last checkpoint does (``minift score`` and the RL stage's reward load it so)."""
    from fitting_helpers import base_folder, run_config

    from minift.components import build_model, build_tokenizer
    from minift.preference.recipe import run_reward
    from minift.preference.reward import load_reward_weights

    cfg = run_config(tmp_path / "reward", base_folder(None, "llama"), "train.max_steps=2",
                     "train.checkpoint_every=2", "pairs.max_train_pairs=16", "pairs.max_eval_pairs=8",
                     path=REPO / "configs" / "reward-tiny.toml")
    summary = run_reward(cfg, log=lambda *_: None)
    assert summary["steps"] == 2
    tokenizer = build_tokenizer(cfg)
    lm = build_model(cfg, tokenizer, torch.device("cpu"), say=lambda *_: None)
    trained = RewardModel(lm, tokenizer.pad_id)
    load_reward_weights(trained, tmp_path / "reward" / "checkpoint-2")
    ids = torch.randint(0, tokenizer.pad_id, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = load_reward_model(tmp_path / "reward" / "model")
        assert json.loads((tmp_path / "reward" / "model" / "config.json").read_text())["architectures"] == [
            "LlamaForSequenceClassification"]
        mask = torch.ones_like(ids)
        torch.testing.assert_close(exported(ids, mask), trained.eval()(ids, mask), rtol=0, atol=0)


# -- against TRL --------------------------------------------------------------------------------------------
def _compare_steps(stage, mine, theirs):
    """float32 on both sides, same ids, same order: per-step values agree to float32 rounding of sums
    (observed <= 5e-7 on logps, <= 3e-7 on grad norms); 1e-5 leaves room for other CPUs' kernels."""
    assert len(mine) == len(theirs) == SETUP["steps"]
    for m, t in zip(mine, theirs):
        for key in STEP_KEYS[stage]:
            assert m[key] == pytest.approx(t[key], abs=1e-5, rel=1e-5), (stage, key)


@pytest.mark.shared
@pytest.mark.parametrize("stage,reference", [("dpo", "frozen"), ("dpo", "precomputed"), ("reward", None)])
def test_against_trl_trace(stage, reference):
    """minift against the TRL numbers saved in tests/data (regenerate: python3 tests/trl_preference.py)."""
    trace = json.loads(TRACE.read_text())
    score = torch.tensor(trace["reward"]["initial_score_weight"]).view(1, -1) if stage == "reward" else None
    records, params = run_minift(stage, score, reference or "frozen")
    _compare_steps(stage, records, trace[stage]["steps"])
    mine = weight_sums(params, stage)
    assert mine.keys() == trace[stage]["final_weight_sums"].keys()
    for name, value in trace[stage]["final_weight_sums"].items():  # sums over up to 2.6 M elements
        tolerance = _weight_sum_tolerance(stage, name, params)
        assert mine[name] == pytest.approx(value, abs=tolerance, rel=1e-5), name


def _weight_sum_tolerance(stage: str, name: str, params) -> float:
    """2e-4 on a tensor's sum, except where the exact gradient is zero: the reward model's rewards move
    together with the last norm's bias (the Bradley–Terry loss sees only r_chosen - r_rejected), so its
    gradient is float rounding alone, which Adam normalizes into moves of up to lr per step and element,
    differently on each CPU and thread count."""
    last_layer = max(int(n.split(".")[2]) for n in params if n.startswith("transformer.h."))
    last_norm = f"transformer.h.{last_layer}.ln_2.bias"
    if stage == "reward" and name in (last_norm, "transformer.ln_f.bias"):
        return SETUP["lr"] * SETUP["steps"] * params[name].numel()
    return 2e-4


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.requires("trl", "transformers")
@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_against_trl_live(tmp_path, stage):
    """TRL's DPOTrainer / RewardTrainer run here; final weights compared element by element. Adam turns
    float32 rounding in near-zero gradients into updates of up to lr per step, so a few of 2.6 M
    elements differ by up to ~1.3e-5 after 4 steps at lr 1e-3 (the largest possible move is 4e-3)."""
    logs, their_params, score = run_trl(stage, tmp_path)
    records, my_params = run_minift(stage, score)
    _compare_steps(stage, records, logs)
    for name, mine in my_params.items():
        noise_only = _weight_sum_tolerance(stage, name, my_params) > 2e-4  # a zero exact gradient
        atol = SETUP["lr"] * SETUP["steps"] if noise_only else 5e-5
        torch.testing.assert_close(mine, their_params[name], rtol=0, atol=atol)


# -- the recipe ----------------------------------------------------------------------------------------------
def test_dpo_recipe_resume_is_bit_exact_with_precomputed_reference(tmp_path):
    def config(out, steps_override=()):
        return load_preference_config(REPO / "configs" / "dpo-tiny.toml", [
            f'train.output_dir="{out}"', "train.checkpoint_every=3", "dpo.reference=precomputed",
            "pairs.max_train_pairs=48", "pairs.max_eval_pairs=16", *steps_override])
    quiet = dict(log=lambda *_: None)
    run_dpo(*config(tmp_path / "straight"), **quiet)
    run_dpo(*config(tmp_path / "resumed", ["train.max_steps=3"]), **quiet)
    cfg, pref = config(tmp_path / "resumed")  # max_steps 3 -> 6 (a constant schedule: the same maths)
    run_dpo(cfg, pref, resume=True, resume_with_changes=True, **quiet)
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "step_time" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(key in steps[-1] for key in STEP_KEYS["dpo"])


def _sample_without_cache(policy, prompt_ids, n, steps, generator):
    """n rows sampled token by token from the full forward's logits of every row (no KV cache)."""
    rows = torch.tensor([list(prompt_ids)] * n)
    with torch.no_grad():
        for _ in range(steps):
            probs = torch.softmax(policy.eval()(rows)[:, -1].double(), dim=-1).float()
            rows = torch.cat([rows, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return rows.tolist()


def test_best_of_n_ranks_sampled_continuations_by_their_reward():
    """best-of-n samples in batches (generate_many: the prompt's cache shared by every row): each row is
    what a cache-free recomputation of all rows draws from the same generator; greedy rows are
    generate()'s; the ranking is by the reward model's score of prompt + continuation, best first."""
    from minift import load_tokenizer
    from minift.preference.reward import RewardModel, best_of_n, score_texts

    fixture = shared_path("fixtures", "tiny-openai-gpt")
    tok = load_tokenizer(fixture)
    torch.manual_seed(0)
    policy = build_model(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    reward_model = RewardModel(build_model(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=16,
                                                     n_layer=1, n_head=2)), tok.pad_id)
    prompt = "what a lovely day sentiment:"
    seen = []
    ranked = best_of_n(policy, reward_model, prompt, tok, tok, n=5, max_new_tokens=4, seed=3, batch_size=3,
                       progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 5), (5, 5)]
    generator = torch.Generator().manual_seed(3)
    prompt_ids = tok.encode(prompt)
    rows = _sample_without_cache(policy, prompt_ids, 3, 4, generator) + _sample_without_cache(
        policy, prompt_ids, 2, 4, generator)
    expected = [tok.decode(ids[len(prompt_ids):], skip_special_tokens=True) for ids in rows]
    assert sorted(text for _, text in ranked) == sorted(expected)
    rewards = [r for r, _ in ranked]
    assert rewards == sorted(rewards, reverse=True)
    again = score_texts(reward_model, [tok.encode(f"{prompt} {text}".rstrip()) for _, text in ranked],
                        tok.pad_id, "cpu")
    assert again.tolist() == pytest.approx(rewards, abs=1e-6)
    greedy = policy.generate(prompt_ids, max_new_tokens=6, temperature=0)
    assert policy.generate_many(prompt_ids, 3, max_new_tokens=6, temperature=0) == [greedy] * 3
    first = greedy[len(prompt_ids)]  # as EOS: every row ends after it
    assert policy.generate_many(prompt_ids, 2, max_new_tokens=6, temperature=0, eos_id=first) == [
        prompt_ids + [first]] * 2


def test_a_recipe_trained_reward_model_saves_the_true_vocabulary_and_reloads(tmp_path):
    """The recipe's model pads its vocabulary rows (model.pad_vocab_to); the saved reward model holds the
    real rows only (transformers' layout) and load_reward_model scores exactly as the trained one did."""
    import json

    from safetensors.torch import load_file

    from minift.preference.recipe import load_preference_config, run_reward
    from minift.preference.reward import load_reward_model, score_texts

    cfg, pref = load_preference_config(REPO / "configs" / "reward-tiny.toml", [
        f'train.output_dir="{tmp_path}"', "train.max_steps=2", "train.progress=false", "train.plot=false"])
    run_reward(cfg, pref, log=lambda *_: None)
    vocab = json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"]
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert saved["transformer.tokens_embed.weight"].shape[0] == vocab
    model = load_reward_model(tmp_path / "model")
    sequences = [[5, 6, 7], [8, 9]]
    rewards = score_texts(model, sequences, 0, "cpu")
    padded = load_reward_model(tmp_path / "checkpoint-2")  # the checkpoint's weights, same layout
    assert torch.equal(rewards, score_texts(padded, sequences, 0, "cpu"))


def test_dpo_resume_refuses_changed_settings_as_train_does(tmp_path):
    """The preference recipes resume through the same check as minift train: a changed lr is refused,
    naming it, unless resume_with_changes (then the new lr is used and recorded)."""
    import json

    from minift.errors import ResumeRefused

    overrides = [f'train.output_dir="{tmp_path}"', "train.max_steps=2", "train.checkpoint_every=1",
                 "pairs.max_train_pairs=32", "pairs.max_eval_pairs=8"]
    cfg, pref = load_preference_config(REPO / "configs" / "dpo-tiny.toml", overrides)
    run_dpo(cfg, pref, log=lambda *_: None)
    cfg, pref = load_preference_config(REPO / "configs" / "dpo-tiny.toml", overrides + ["train.lr=1e-5",
                                                                                         "train.max_steps=3"])
    with pytest.raises(ResumeRefused, match="train.lr"):
        run_dpo(cfg, pref, resume=True, log=lambda *_: None)
    summary = run_dpo(cfg, pref, resume=True, resume_with_changes=True, log=lambda *_: None)
    assert summary["steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "step_time" in r][-1] == pytest.approx(1e-5)
    assert json.loads((tmp_path / "checkpoint-3" / "run_config.json").read_text())["train"]["lr"] == 1e-5
