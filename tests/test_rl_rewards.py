"""Rewards of the RL stage (minift.rl.rewards): the tweet rule, reward model folders against transformers'
sequence classifier, user callables with TRL's signature, weights and None as TRL combines them, and the
one-line refusals."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from minift.errors import InputError
from minift.models import GPT2Config, build_model
from minift.preference.reward import RewardModel
from minift.rl.rewards import (
    RewardError,
    RewardModelReward,
    RewardSet,
    build_reward,
    label_match,
)

from conftest import shared_path

USER_MODULE = "minift_user_rewards"
USER_REWARDS = '''
def length(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def positive_only(prompts, completions, label, **kwargs):
    return [1.0 if gold == "positive" else None for gold in label]

async def constant(prompts, completions, **kwargs):
    return [0.5] * len(prompts)

class Logging:
    def __call__(self, prompts, completions, trainer_state, log_extra, log_metric, **kwargs):
        log_extra("first_char", [c[:1] for c in completions])
        log_metric("step_seen", trainer_state.global_step)
        return [0.0] * len(prompts)

logging = Logging()

def broken(prompts, completions, **kwargs):
    raise ValueError("boom")

def too_few(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(prompts)

def text(prompts, completions, **kwargs):
    return ["high"] * len(prompts)

def no_kwargs(prompts, completions):
    return [0.0] * len(prompts)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def test_label_match_reads_the_first_word():
    completions = [" positive", " Positive.", "positive day", " negative", "", " neutral!", "\nneutral"]
    labels = ["positive", "positive", "positive", "positive", "negative", "neutral", "negative"]
    assert label_match([""] * 7, completions, label=labels) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    rewards = RewardSet([build_reward("label_match")])
    message = "'label_match' raised at step 4: RewardError: label_match needs a 'label'"
    with pytest.raises(RewardError, match=message):
        rewards.score(["a"], [" positive"], [[1]], columns={"answer": ["x"]}, step=4)


def test_rewards_per_function_with_none_as_nan(user_module):
    """A rule, a plain function reading ``completion_ids``, one returning None for non-positive rows and an
    async one: TRL's ``rewards_per_func`` table, None as NaN, the weights kept for the weighted sum."""
    specs = ["label_match"] + [f"{user_module}:{name}" for name in ("length", "positive_only", "constant")]
    rewards = RewardSet.from_specs(specs, weights=[1.0, 0.1, 2.0, -1.0])
    assert rewards.names == ["label_match", "length", "positive_only", "constant"]
    completions = [" positive", " negative!", " neutral", " positive"]
    ids = [[1, 2], [3], [4, 5, 6], [7, 8, 9, 10]]
    labels = ["positive", "negative", "positive", "neutral"]
    scores = rewards.score(["p"] * 4, completions, ids, columns={"label": labels}, step=2)
    table = [[1, 2, 1, 0.5], [1, 1, None, 0.5], [0, 3, 1, 0.5], [0, 4, None, 0.5]]  # by hand
    weights = [1.0, 0.1, 2.0, -1.0]
    for row, values in enumerate(table):
        for f, value in enumerate(values):
            got = scores.per_function[row, f].item()
            assert math.isnan(got) if value is None else got == pytest.approx(value)
    assert scores.weights.tolist() == pytest.approx(weights)


def test_reward_functions_log_extra_columns_and_metrics(user_module):
    rewards = RewardSet.from_specs([f"{user_module}:logging"])
    scores = rewards.score(["p", "q"], ["ab", "cd"], [[1], [2]], step=7)
    assert scores.names == ["Logging"]  # a callable object is named by its class, as TRL names it
    assert scores.extra_columns == {"first_char": ["a", "c"]} and scores.extra_metrics == {"step_seen": [7.0]}


@pytest.mark.parametrize("name,message", [
    ("broken", "reward 'broken' raised at step 3: ValueError: boom"),
    ("too_few", "reward 'too_few' returned 1 values at step 3 for 2 completions"),
    ("nan", "reward 'nan' returned nan for completion 0 at step 3: a reward is a finite number, or None"),
    ("text", "reward 'text' returned 'high' for completion 0 at step 3"),
    ("no_kwargs", ("raised at step 3: TypeError: .*unexpected keyword.* takes \\(prompts, completions, "
                  "completion_ids, \\*\\*kwargs\\)"))])
def test_a_misbehaving_reward_is_one_line_naming_it_and_the_step(user_module, name, message):
    rewards = RewardSet.from_specs([f"{user_module}:{name}"])
    with pytest.raises(RewardError, match=message) as caught:
        rewards.score(["p", "q"], ["a", "b"], [[1], [2]], step=3)
    assert "\n" not in str(caught.value) and isinstance(caught.value, InputError)


def test_rewards_that_cannot_be_built_are_one_line(user_module, tmp_path):
    cases = [("no_such_package.rewards:f", ("cannot import module 'no_such_package.rewards' "
                                           "\\(ModuleNotFoundError")),
             (f"{user_module}:missing", f"{user_module} has no attribute 'missing'"),
             (f"{user_module}:NOT_CALLABLE", "NOT_CALLABLE is a int, not a function"),
             (str(tmp_path / "nowhere"), "is not a usable reward model: .*nowhere: no such directory")]
    for spec, message in cases:
        with pytest.raises(RewardError, match=message) as caught:
            build_reward(spec)
        assert "\n" not in str(caught.value)
    with pytest.raises(RewardError, match="2 reward_weights for 1 rewards"):
        RewardSet([build_reward("label_match")], weights=[1.0, 2.0])


# -- reward model folders ---------------------------------------------------------------------------------
def save_reward_model(directory, append_eos=None, n_positions=32, pad="eos"):
    """A random GPT-2 reward model as ``minift reward`` saves it (config, weights, tokenizer, run config)."""
    from minift.tokenizer import ensure_pad_token, load_tokenizer

    tokenizer = ensure_pad_token(load_tokenizer(shared_path("tokenizers", "gpt2")), pad)
    torch.manual_seed(0)
    lm = build_model(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=16,
                                n_layer=1, n_head=2, initializer_range=0.2))
    model = RewardModel(lm, tokenizer.pad_id)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    run_config = {"data": {"template": "{text} sentiment: {label}"}}
    if append_eos is not None:
        run_config["pairs"] = {"append_eos": append_eos}
    (directory / "run_config.json").write_text(json.dumps(run_config))
    return directory


@pytest.mark.shared
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("append_eos,pad,expected", [(None, "eos", False), (True, "eos", True),
                                                     ("yes", "eos", True), ("auto", "eos", False),
                                                     ("auto", "[PAD]", True)])
def test_reward_model_scores_prompt_plus_completion_as_transformers_does(tmp_path, append_eos, pad, expected):
    """transformers' GPT2ForSequenceClassification on the same text, one row at a time (no padding), with
    EOS appended exactly when the run config says the pairs had it ("auto" or no pairs entry: TRL's
    choice, no EOS where it is GPT-2's pad); a row longer than the positions keeps its start."""
    from tokenizers import Tokenizer
    from transformers import GPT2ForSequenceClassification

    folder = save_reward_model(tmp_path, append_eos, pad=pad)
    reward = build_reward(str(folder), batch_size=2)
    assert reward.kind == "model" and reward.function.append_eos is expected
    prompts = ["what a lovely day sentiment:", "meh sentiment:", "long " * 40 + "sentiment:"]
    completions = [" positive", " neutral", " negative"]
    scores = RewardSet([reward]).score(prompts, completions, [[0]] * 3).per_function[:, 0]
    hf = GPT2ForSequenceClassification.from_pretrained(folder).eval()
    hf.config.pad_token_id = None  # one row at a time: the score is read at its last token
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = backend.encode(prompt + completion, add_special_tokens=False).ids
        ids += [50256] if expected else []
        with torch.no_grad():
            reference = hf(torch.tensor([ids[:32]])).logits[0, 0]
        assert scores[row].item() == pytest.approx(reference.item(), abs=1e-5)
    assert reward.function.truncated == 1


@pytest.mark.shared
def test_reward_model_folders_that_are_not_one_are_refused_in_one_line(tmp_path):
    lm_folder = shared_path("fixtures", "tiny-gpt2")
    with pytest.raises(RewardError, match="holds a GPT2LMHeadModel, not a reward model"):
        RewardModelReward(str(lm_folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="has no config.json"):
        RewardModelReward(str(tmp_path / "empty"))
    folder = save_reward_model(tmp_path / "three", None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(RewardError, match="a classifier with 3 labels"):
        RewardModelReward(str(folder))
    folder = save_reward_model(tmp_path / "headless", None)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "score.weight"}, str(folder / "model.safetensors"))
    with pytest.raises(RewardError, match="not a usable reward model: .*missing key score.weight") as caught:
        RewardModelReward(str(folder))
    assert "\n" not in str(caught.value)


@pytest.mark.shared
def test_reward_model_name_is_the_folders_last_part(tmp_path):
    folder = save_reward_model(tmp_path / "sentiment-rm", False)
    reward = build_reward(str(folder) + "/")
    assert reward.name == "sentiment-rm" and reward.function.append_eos is False
