"""The RL stage as a command (``minift grpo`` / ``minift rloo``, minift/rl/recipe.py): replayed completions
through the whole recipe against TRL's GRPOTrainer / RLOOTrainer (live, or their saved trace), SIGKILL then
--resume bit-identical with sampling, two gloo ranks against one process, the three kinds of reward, and
bad input refused in one line."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from trl_rl import SETTINGS, STEP_KEYS, TRACE, config, eos_ids, prompts, weight_digest

from minift import checkpoint as ckpt
from minift.hub import from_pretrained
from minift.orchestration import run_stage
from minift.rl.recipe import build_grpo_stage, load_rl_config, run_rl
from minift.rl.replay import ReplayRound, write_replay

from conftest import FIXTURES, REPO, shared_path

QUIET = dict(log=lambda *_: None)


# -- the recipe replays TRL's completions -------------------------------------------------------------------
def replay_overrides(setting: dict, tmp_path, completions) -> list[str]:
    """``--set`` values that make the recipe TRL's run of ``setting`` (trl_rl.config): its model, prompts,
    batch, sampling and update settings, fp32, TRL's loss positions, the recorded completions."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
    out = [f'model.name="{FIXTURES / "tiny-gpt2"}"', f'train.output_dir="{tmp_path / "run"}"',
           f"train.max_steps={setting['max_steps']}", f"train.batch_size={setting['per_device']}",
           f"train.grad_accum={setting['grad_accum']}", f"train.lr={setting['lr']}",
           f'train.schedule="{setting["schedule"]}"', "train.max_grad_norm=1.0", 'train.fused_adamw="no"',
           f"train.seed={setting['seed']}", 'train.device="cpu"', "train.progress=false", "train.plot=false",
           "eval.before_training=false",
           f'rl.algorithm="{setting["trainer"]}"', f"rl.num_generations={setting['num_generations']}",
           f"rl.max_completion_length={setting['max_completion_length']}",
           f"rl.steps_per_generation={setting['steps_per_generation']}",
           f"rl.num_iterations={setting['num_iterations']}", f"rl.temperature={setting['temperature']}",
           f"rl.beta={setting['beta']}", f"rl.epsilon={setting['epsilon']}",
           f"rl.epsilon_high={setting['epsilon_high'] or 0.0}",
           f"rl.mask_truncated_completions={str(setting['mask_truncated_completions']).lower()}",
           'rl.positions="padded"', f"rl.eos_token_ids={eos_ids()[1:]}",
           f"rl.reward_funcs={json.dumps([f'trl_rl:{name}' for name in setting['rewards']])}",
           f"rl.reward_weights={list(setting['reward_weights'] or [])}",
           f'rl.prompts="{tmp_path / "prompts.jsonl"}"', f'rl.completions="{completions}"']
    if setting["trainer"] == "grpo":
        out += [f'rl.loss_type="{setting["loss_type"]}"', f'rl.scale_rewards="{setting["scale_rewards"]}"',
                f'rl.importance_sampling_level="{setting["importance_sampling_level"]}"']
    else:
        out += [f"rl.normalize_advantages={str(setting['normalize_advantages']).lower()}",
                f"rl.reward_clip_range={list(setting['reward_clip_range'] or [])}"]
    return out


def run_recipe_replay(setting: dict, tmp_path, completions, monkeypatch) -> tuple[list[dict], dict]:
    """The recipe on recorded completions: its logged step records (TRL's names) and final weights."""
    cfg = load_rl_config(None, replay_overrides(setting, tmp_path, completions), setting["trainer"])
    if setting["optimizer"] == "sgd":  # the stage's optimizer component swapped, as a user would swap it
        def sgd(cfg, model):
            return torch.optim.SGD(model.parameters(), lr=cfg.train.lr)

        run_stage(cfg, lambda ctx: dataclasses.replace(build_grpo_stage(ctx), build_optimizer=sgd), **QUIET)
    else:
        run_rl(cfg, **QUIET)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "step_time" in r]
    params = dict(from_pretrained(tmp_path / "run" / "model").named_parameters())
    return [{**r, "learning_rate": r["lr"]} for r in records], params


def compare_steps(mine: list[dict], theirs: list[dict]) -> None:
    assert len(mine) == len(theirs)
    for step, (m, t) in enumerate(zip(mine, theirs), start=1):
        for key in STEP_KEYS:
            if key in t and t[key] is not None:
                assert m.get(key) is not None, (step, key)
                assert m[key] == pytest.approx(t[key], abs=1e-5, rel=1e-5), (step, key)


@pytest.mark.shared
@pytest.mark.parametrize("name", [n if n in ("grpo_dapo_beta_mu2", "rloo_mu2") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in SETTINGS])
def test_recipe_replay_equals_trl_trace(name, tmp_path, monkeypatch):
    """``minift grpo`` / ``rloo`` on the completions TRL sampled (tests/data/trl_rl_trace.json) logs TRL's
    per-step loss, grad norm, lr, KL, entropy, clip ratios and rewards, and ends at TRL's weights."""
    shared_path("fixtures", "tiny-gpt2")
    setting = json.loads(TRACE.read_text())["settings"][name]
    assert setting["config"] == json.loads(json.dumps(config(name)))
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt_ids"}) + "\n"
                                   for r in setting["completions"]))
    records, params = run_recipe_replay(setting["config"], tmp_path, completions, monkeypatch)
    compare_steps(records, setting["steps"])
    assert_digests_close(params, setting["final_weights"])


def assert_digests_close(params: dict, digests: dict) -> None:
    """Final weights against TRL's per-tensor digests (float64 sum, seeded projection). Elements within
    1e-5 of TRL's with independent signs move a digest of n elements by about 1e-5 * sqrt(n): the bound."""
    mine = weight_digest(params)
    assert mine.keys() == digests.keys()
    for tensor, digest in digests.items():
        bound = max(2e-4, 1e-5 * params[tensor].numel() ** 0.5)
        for kind in ("sum", "projection"):
            assert mine[tensor][kind] == pytest.approx(digest[kind], abs=bound, rel=0), (tensor, kind)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.requires("trl", "transformers")
@pytest.mark.parametrize("name", [*SETTINGS, *(f"random_{seed}" for seed in (3, 5, 8, 23, 31))])
def test_recipe_replay_equals_trl_live(name, tmp_path, monkeypatch):
    """TRL samples here; the recipe replays the completions file written from what it sampled (with its
    shuffle as ``position``): per-step numbers, and final weights element by element (<= 1e-5)."""
    from trl_rl import replay_rounds, run_trl

    logs, rounds, their_params = run_trl(name, tmp_path / "trl")
    completions = tmp_path / "completions.jsonl"
    write_replay(completions, [ReplayRound(r.step, r.prompts, r.completion_ids, None, r.permutation)
                               for r in replay_rounds(rounds)])
    records, my_params = run_recipe_replay(config(name), tmp_path, completions, monkeypatch)
    compare_steps(records, logs)
    assert_weights_close(my_params, their_params, config(name))


def assert_weights_close(mine: dict, theirs: dict, setting: dict) -> None:
    """Every element within 1e-5. Under AdamW, an element whose gradient is at float32 rounding level gets
    a step of up to lr either way (Adam divides the gradient by its own magnitude), so there a few elements
    (at most 1 in 1000) may differ by up to lr; the per-step loss and grad norm are compared at 1e-5."""
    for tensor, values in mine.items():
        diff = (values.detach() - theirs[tensor].detach()).abs()
        if setting["optimizer"] == "sgd":
            assert diff.max() <= 1e-5, (tensor, diff.max().item())
        else:
            share_off = (diff > 1e-5).float().mean().item()
            assert share_off <= 1e-3 and diff.max() <= setting["lr"], (tensor, share_off, diff.max().item())


# -- resume -----------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def tiny(out, *overrides, algorithm="grpo"):
    """configs/grpo-tiny.toml (random GPT-1, synthetic tweets) with a reward that has a signal there."""
    return load_rl_config(REPO / "configs" / "grpo-tiny.toml", [
        f'train.output_dir="{out}"', f'rl.algorithm="{algorithm}"', 'rl.reward_funcs=["rl_rewards:vowels"]',
        "eval.before_training=false", "eval.max_examples=8", *overrides], algorithm)


# a round serves 4 steps (2 micro-batches x 2 iterations, 1 per step): checkpoint 3 falls inside round 1;
# dropout on, so the global RNG matters too; beta > 0: a reference
MID_ROUND = ["train.grad_accum=1", "rl.steps_per_generation=2", "rl.num_iterations=2", "train.max_steps=8",
             "train.checkpoint_every=3", "rl.disable_dropout=false", "model.config.resid_pdrop=0.1",
             "model.config.attn_pdrop=0.1", "rl.beta=0.05", "rl.temperature=1.3"]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _step_records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step_time" in r]


SAME = ("loss", "grad_norm", "reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean",
        "completions/mean_length")


def _assert_same_run(a, b):
    for name, tensor in _weights(a / "checkpoint-8").items():
        assert torch.equal(tensor, _weights(b / "checkpoint-8")[name]), name
    ra, rb = _step_records(a), _step_records(b)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb):
        assert {k: x.get(k) for k in SAME} == {k: y.get(k) for k in SAME}, x["step"]
    assert (a / "completions.jsonl").read_text() == (b / "completions.jsonl").read_text()


@pytest.mark.parametrize("algorithm", ["grpo", pytest.param("rloo", marks=pytest.mark.slow)])
def test_crash_then_resume_inside_a_round_is_bit_identical(tmp_path, monkeypatch, algorithm):
    """Sampling, dropout, a reference and a round that spans 4 steps: a crash at step 5 resumed from the
    checkpoint of step 3 (inside the round: its micro-batches are in the checkpoint) ends at the
    uninterrupted run's weights bit for bit, with the same logged numbers and completions."""
    from minift import metrics

    run_rl(tiny(tmp_path / "full", *MID_ROUND, algorithm=algorithm), **QUIET)
    original = metrics.MetricsLogger.__call__

    def crash_at_5(self, record):
        if record.get("step") == 5:
            raise Crash()
        original(self, record)

    monkeypatch.setattr(metrics.MetricsLogger, "__call__", crash_at_5)
    with pytest.raises(Crash):
        run_rl(tiny(tmp_path / "resumed", *MID_ROUND, algorithm=algorithm), **QUIET)
    monkeypatch.setattr(metrics.MetricsLogger, "__call__", original)
    state = ckpt.load_training_state(tmp_path / "resumed" / "checkpoint-3")["sampler"][0]
    assert state["micro_step"] == 3 and len(state["micro_batches"]) == 2  # the round in flight is saved
    run_rl(tiny(tmp_path / "resumed", *MID_ROUND, algorithm=algorithm), resume=True, **QUIET)
    _assert_same_run(tmp_path / "full", tmp_path / "resumed")


def _cli(config_overrides, *extra, algorithm="grpo", config=REPO / "configs" / "grpo-tiny.toml"):
    sets = [x for o in config_overrides for x in ("--set", o)]
    return [sys.executable, "-m", "minift", algorithm, str(config), *sets, *extra]


def _env():
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])  # rl_rewards is importable
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """``minift grpo`` SIGKILLed after its 5th step (checkpoints every 3 steps), then ``--resume``: the final
    weights, logged numbers and completions are the uninterrupted run's."""
    common = ['rl.algorithm="grpo"', 'rl.reward_funcs=["rl_rewards:vowels"]', "eval.before_training=false",
              "eval.max_examples=8", *MID_ROUND]
    full = subprocess.run(_cli([*common, f'train.output_dir="{tmp_path / "full"}"']), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = [*common, f'train.output_dir="{tmp_path / "killed"}"']
    proc = subprocess.Popen(_cli(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file, deadline = tmp_path / "killed" / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics_file.exists() and
                                          metrics_file.read_text().count('"step_time"') >= 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.find_resumable(tmp_path / "killed", log=lambda *_: None) is not None
    resumed = subprocess.run(_cli(killed, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(tmp_path / "full", tmp_path / "killed")


# -- DDP ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("name", ["grpo_dapo_beta_mu2", "rloo_mu2"])
def test_two_ranks_equal_one_process_under_replay(tmp_path, name):
    """``torchrun --nproc-per-node 2 -m minift grpo`` (gloo, 2 completions per micro-batch and rank) on a
    completions file equals one process with 4 per micro-batch: per-step numbers and final weights."""
    shared_path("fixtures", "tiny-gpt2")
    setting = json.loads(TRACE.read_text())["settings"][name]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in setting["completions"]))
    cfg = {**setting["config"], "optimizer": "adamw", "lr": 1e-3}
    outs, no_file = {}, tmp_path / "defaults.toml"
    no_file.write_text("")
    for ranks in (1, 2):
        (tmp_path / f"r{ranks}").mkdir()
        per_rank = {**cfg, "per_device": cfg["per_device"] // ranks}
        overrides = replay_overrides(per_rank, tmp_path / f"r{ranks}", completions)
        command = _cli(overrides, algorithm=cfg["trainer"], config=no_file)
        if ranks == 2:
            command[1:3] = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29561",
                            "-m", "minift"]
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[ranks] = tmp_path / f"r{ranks}" / "run"
    one, two = (_step_records(outs[n]) for n in (1, 2))
    assert len(one) == len(two) == cfg["max_steps"]
    for a, b in zip(one, two):
        for key in STEP_KEYS:
            if key in a and a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-6, rel=1e-6), (a["step"], key)
    for tensor, values in _weights(outs[1] / "model").items():
        torch.testing.assert_close(_weights(outs[2] / "model")[tensor], values, rtol=0, atol=1e-6)


# -- bad input: one line, exit 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["rl.num_generations=1"], r"rl.num_generations must be >= 2"),
    (["rl.generation_batch_size=18"], r"generation_batch_size 18 is not a multiple of rl.num_generations 4"),
    (["rl.generation_batch_size=16", "rl.steps_per_generation=2"], r"both set: give one"),
    (['rl.algorithm="rloo"'], r"this is minift grpo: run minift rloo"),
    (['rl.loss_type="ppo"'], r"rl.loss_type 'ppo': one of"),
    (["rl.top_p=0.0", "rl.top_k=-1"], r"^rl.top_p must be in \(0, 1\], got 0.0; rl.top_k must be >= 0"),
    (["rl.reward_weights=[1.0, 2.0]"], r"2 weights for 1 rewards"),
    (["rl.reward_funcs=[]"], r"rl.reward_funcs: a list of one or more rewards"),
])
def test_bad_settings_are_refused_when_the_config_is_read(overrides, message):
    from minift.config import RunConfigError

    with pytest.raises(RunConfigError, match=message) as err:
        load_rl_config(REPO / "configs" / "grpo-tiny.toml", overrides, "grpo")
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_a_grpo_option_is_an_unknown_key_for_rloo():
    from minift.config import RunConfigError

    with pytest.raises(RunConfigError, match=r"unknown key \[rl\] loss_type"):
        load_rl_config(REPO / "configs" / "grpo-tiny.toml", ['rl.algorithm="rloo"', 'rl.loss_type="dapo"'],
                       "rloo")


@pytest.mark.parametrize("overrides,message", [
    (["train.batch_size=5"], r"a round of 10 completions .* is not a multiple of rl.num_generations 4"),
    (['rl.reward_funcs=["no_such_module_xyz:reward"]'], r"cannot import module 'no_such_module_xyz'"),
    (['rl.reward_funcs=["rl_rewards:NOT_CALLABLE"]'], r"NOT_CALLABLE is a int, not a function"),
    (['rl.reward_funcs=["rl_rewards:raises"]'], r"reward 'raises' raised at step 0: KeyError: 'no such "
                                                r"column'"),
    (['rl.reward_funcs=["rl_rewards:wrong_length"]'], r"returned 15 values at step 0 for 16 completions"),
    (['rl.reward_funcs=["rl_rewards:not_a_number"]'], r"returned nan for completion 0 at step 0"),
    (["rl.max_completion_length=64"], r"leaves no room for a prompt in the model's 64 positions"),
    (["rl.max_completion_length=62"], r"no prompt left .* 256 dropped"),
    (["rl.mask_truncated_completions=true"], r"the tokenizer has no EOS and rl.eos_token_ids is empty"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, overrides, message):
    from minift.errors import InputError

    with pytest.raises(InputError, match=message) as err:
        run_rl(tiny(tmp_path, "train.max_steps=1", *overrides), **QUIET)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@pytest.mark.shared
def test_a_model_that_is_no_reward_model_is_refused(tmp_path):
    from minift.rl.rewards import RewardError

    with pytest.raises(RewardError, match=r"holds a GPT2LMHeadModel, not a reward model"):
        run_rl(tiny(tmp_path, f'rl.reward_funcs=["{shared_path("fixtures", "tiny-gpt2")}"]'), **QUIET)


@pytest.mark.slow  # a fresh process: several seconds
def test_the_command_prints_one_line_and_exits_2(tmp_path):
    command = _cli([f'train.output_dir="{tmp_path}"', 'rl.reward_funcs=["rl_rewards:raises"]',
                    "train.max_steps=1"])
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("minift: error: reward 'raises' raised at step 0: "
                                                      "KeyError: 'no such column'")


def test_prompts_too_long_are_dropped_and_counted(tmp_path):
    """Prompts with more than n_positions - max_completion_length tokens are left out, counted in the summary
    (recounted here with the tokenizer); the rest train."""
    from minift.tokenizer import load_tokenizer

    summary = run_rl(tiny(tmp_path, "rl.max_completion_length=56", "train.max_steps=1"), **QUIET)
    tokenizer = load_tokenizer(tmp_path / "synthetic" / "tokenizer")
    texts = [json.loads(line)["text"] for line in
             (tmp_path / "synthetic" / "data" / "train.jsonl").read_text().splitlines()[:256]]
    too_long = sum(len(tokenizer.encode(f"{t.strip()} sentiment:")) > 64 - 56 for t in texts)
    assert 0 < too_long < 256
    assert summary["prompts_dropped"] == too_long and summary["prompts"] == 256 - too_long


# -- the three kinds of reward -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.requires("transformers")
def test_a_rule_a_reward_model_and_a_callable_through_the_recipe(tmp_path):
    """``minift reward`` trains a reward model; ``minift grpo`` then scores with the label rule, that model
    and a callable using the tweets' ``label`` column (weights 1, 0.5, 2): every logged completion's
    rewards recomputed here (the rule by hand, the model by transformers' classifier, the callable's
    formula), and each step's ``rewards/<name>/mean`` and ``reward`` are their means."""
    import math

    from transformers import AutoModelForSequenceClassification

    from minift.preference.config import PreferenceConfig
    from minift.preference.recipe import run_reward
    from minift.tokenizer import load_tokenizer

    rm_cfg = load_config_with(REPO / "configs" / "reward-tiny.toml", PreferenceConfig,
                              [f'train.output_dir="{tmp_path / "rm"}"', "train.max_steps=2"])
    run_reward(rm_cfg, **QUIET)
    rm_dir = tmp_path / "rm" / "model"
    run_rl(tiny(tmp_path / "rl", "train.max_steps=3", "rl.log_completions=true",
                f'rl.reward_funcs=["label_match", "{rm_dir}", "rl_rewards:longer_prompt"]',
                "rl.reward_weights=[1.0, 0.5, 2.0]"), **QUIET)
    gold = {f"{json.loads(line)['text'].strip()} sentiment:": json.loads(line)["label_text"]
            for line in (tmp_path / "rl" / "synthetic" / "data" / "train.jsonl").read_text().splitlines()}
    theirs = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    rm_tokenizer = load_tokenizer(rm_dir)
    samples = [json.loads(line) for line in (tmp_path / "rl" / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3} and len(samples) == 3 * 16
    for s in samples:
        words = s["completion"].split()
        assert s["label_match"] == float(bool(words) and words[0].strip(".,!?").lower() == gold[s["prompt"]])
        ids = torch.tensor([rm_tokenizer.encode(s["prompt"] + s["completion"])])
        with torch.no_grad():
            assert s["model"] == pytest.approx(theirs(input_ids=ids).logits[0, 0].item(), abs=1e-5)
        want = None if gold[s["prompt"]] == "neutral" else len(s["prompt"]) / 100 - len(s["completion"]) / 50
        assert s["longer_prompt"] == (want if want is None else pytest.approx(want, abs=1e-6))
        total = s["label_match"] + 0.5 * s["model"] + 2.0 * (s["longer_prompt"] or 0.0)
        assert s["reward"] == pytest.approx(total, abs=1e-5)
    for record in _step_records(tmp_path / "rl"):
        mine = [s for s in samples if s["step"] == record["step"]]
        for name in ("label_match", "model", "longer_prompt"):
            values = [s[name] for s in mine if s[name] is not None]
            assert record[f"rewards/{name}/mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert record["reward"] == pytest.approx(math.fsum(s["reward"] for s in mine) / len(mine), abs=1e-5)


def load_config_with(path, stage, overrides):
    from minift.config import load_config

    return load_config(path, overrides, stage=stage)


@pytest.mark.parametrize("name,algorithm", [("grpo-tiny", "grpo"), ("grpo-tiny", "rloo"),
                                            ("grpo-tweets", "grpo"), ("rloo-tweets", "rloo")])
def test_shipped_rl_configs_load(name, algorithm):
    cfg = load_rl_config(REPO / "configs" / f"{name}.toml", [], algorithm)
    assert cfg.stage.rl.ALGORITHM == algorithm and cfg.stage.rl.reward_funcs[0] == "label_match"


@pytest.mark.shared
@pytest.mark.parametrize("change,message", [
    ("train.seed=1", r"round 1, completion 1: prompt .* is not the prompt this run drew"),
    ("train.max_steps=9", r"2 rounds, but 9 steps need 5 — record more rounds"),
])
def test_a_completions_file_from_other_settings_is_refused(tmp_path, change, message):
    from minift.errors import InputError

    shared_path("fixtures", "tiny-gpt2")
    setting = json.loads(TRACE.read_text())["settings"]["grpo_dapo_beta_mu2"]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in setting["completions"]))
    overrides = replay_overrides({**setting["config"], "optimizer": "adamw"}, tmp_path, completions)
    with pytest.raises(InputError, match=message):
        run_rl(load_rl_config(None, [*overrides, change], "grpo"), **QUIET)
