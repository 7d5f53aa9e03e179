"""TRL's GRPOTrainer / RLOOTrainer and minift's RL update on the same completions.

TRL samples; a reward-function wrapper records every completion it scores (prompt, completion ids,
in generation order) and a wrapper around TRL's ``shuffle_sequence_dict`` records the permutation it
draws (TRL unchanged: the same ``torch.randperm`` runs). minift then replays those completions from
the same checkpoint with its own pieces — ``minift.rl`` advantages, batching and objective — through
``minift.loop.train``, and both sides' per-step numbers and final weights are compared.

The setup (``SETUP``): ``tiny-gpt2`` (fp32, every dropout off), prompts "{text} sentiment:" of the
first tweets with 3..12 GPT-2 tokens, two deterministic reward functions (one returns None for
some completions), AdamW (or SGD) at a constant rate, clipping at 1.0. The random model puts almost
no mass on ``<|endoftext|>``, so every token id ≡ 7 (mod 8) is declared an EOS too
(``generation_config.eos_token_id``): completions then end early or hit the length limit, both.

``python3 tests/trl_rl.py`` (TRL installed) writes ``tests/data/trl_rl_trace.json``: the recorded
completions of every setting in the replay format, TRL's logged numbers and per-tensor digests of its
final weights, so machines without TRL compare minift against it (tests/test_rl.py).
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # conftest imports the harness from there

from conftest import FIXTURES, TWEETS  # noqa: E402

TRACE = HERE / "data" / "trl_rl_trace.json"
SETUP = {"checkpoint": "tiny-gpt2", "n_prompts": 24, "min_prompt_tokens": 3, "max_prompt_tokens": 12,
         "eos_every": 8, "eos_offset": 7, "seed": 0, "max_grad_norm": 1.0}
EOS = 50256

# name -> (trainer, settings) over the defaults of ``config``: per-device batch 4, 4 generations (RLOO:
# TRL's 2), completions of at most 6 tokens, gradient accumulation 2, 3 steps, AdamW at 1e-3, one reward
# function. The settings that clip use SGD at a large rate: Adam turns float32 rounding in near-zero gradients
# into steps of the full rate (up to 4e-5 apart at lr 2e-2), SGD moves each weight by its gradient (weights
# agree to 1e-7).
TWO_REWARDS = ("vowel_share", "short_length")
SETTINGS = {
    "grpo_dapo": ("grpo", {}),
    "grpo_dapo_beta_mu2": ("grpo", {"beta": 0.1, "num_iterations": 2, "epsilon_high": 0.28,
                                     "optimizer": "sgd", "lr": 0.5, "rewards": TWO_REWARDS,
                                     "reward_weights": (1.0, 0.5), "max_steps": 4}),
    "grpo_grpo_sequence": ("grpo", {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                     "num_iterations": 2, "optimizer": "sgd", "lr": 1.0, "max_steps": 4}),
    "grpo_dr_grpo_none": ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none", "temperature": 0.7,
                                    "grad_accum": 1, "schedule": "linear"}),
    "grpo_bnpo_batch_masked": ("grpo", {"loss_type": "bnpo", "scale_rewards": "batch",
                                         "mask_truncated_completions": True, "steps_per_generation": 4,
                                         "optimizer": "sgd", "lr": 3.0, "rewards": TWO_REWARDS,
                                         "max_steps": 4}),
    "grpo_dapo_spg4": ("grpo", {"steps_per_generation": 4, "beta": 0.05, "optimizer": "sgd", "lr": 3.0,
                                 "max_steps": 4}),
    "rloo": ("rloo", {}),
    "rloo_mu2": ("rloo", {"num_generations": 4, "num_iterations": 2, "normalize_advantages": True,
                          "epsilon_high": 0.28, "reward_clip_range": (-1.0, 0.6), "temperature": 0.8,
                          "optimizer": "sgd", "lr": 0.5, "beta": 0.1, "rewards": TWO_REWARDS,
                          "reward_weights": (1.0, 0.5), "max_steps": 4}),
}
# checked against the saved trace in the default suite (the others are marked slow)
DEFAULT_SUITE = ("grpo_dapo_beta_mu2", "grpo_bnpo_batch_masked", "rloo_mu2")
# the per-step numbers compared, when TRL logs them
STEP_KEYS = ("loss", "grad_norm", "learning_rate", "kl", "entropy", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max",
             "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
             "completions/clipped_ratio", "completions/mean_terminated_length")


def random_setting(seed: int) -> tuple[str, dict]:
    """A setting drawn from TRL's option space with ``seed`` (also TRL's seed, so the completions differ too):
    for checking settings and completions no test was written for."""
    import random

    rng = random.Random(seed)
    trainer = rng.choice(["grpo", "grpo", "grpo", "rloo"])
    generations = rng.choice([2, 3, 4])
    grad_accum = rng.choice([1, 2])
    out = {"seed": seed, "num_generations": generations, "per_device": generations * rng.choice([1, 2]),
           "grad_accum": grad_accum, "steps_per_generation": grad_accum * rng.choice([1, 2]),
           "num_iterations": rng.choice([1, 2]), "max_completion_length": rng.choice([4, 6, 8]),
           "epsilon": rng.choice([0.1, 0.2]), "epsilon_high": rng.choice([None, 0.3]),
           "temperature": rng.choice([0.7, 1.0, 1.3]), "mask_truncated_completions": rng.random() < 0.5,
           "beta": rng.choice([0.0, 0.04]), "max_steps": 3}
    out.update(rng.choice([{"optimizer": "adamw", "lr": 1e-3}, {"optimizer": "sgd", "lr": 0.3},
                           {"optimizer": "sgd", "lr": 1.0}]))
    if rng.random() < 0.5:
        out.update(rewards=TWO_REWARDS, reward_weights=(rng.choice([0.5, 1.0]), rng.choice([-1.0, 2.0])))
    if trainer == "grpo":
        out.update(loss_type=rng.choice(["dapo", "grpo", "dr_grpo", "bnpo"]),
                   importance_sampling_level=rng.choice(["token", "sequence"]),
                   scale_rewards=rng.choice(["group", "batch", "none"]))
    else:
        out.update(normalize_advantages=rng.random() < 0.5, reward_clip_range=rng.choice([None, (-1.0, 0.5)]))
    return trainer, out


def config(name: str) -> dict:
    if name.startswith("random_"):
        trainer, overrides = random_setting(int(name.split("_")[1]))
    else:
        trainer, overrides = SETTINGS[name]
    cfg = {"trainer": trainer, "per_device": 4, "num_generations": 4, "max_completion_length": 6,
           "grad_accum": 2, "max_steps": 3, "lr": 1e-3, "optimizer": "adamw", "rewards": ("vowel_share",),
           "reward_weights": None,
           "num_iterations": 1, "steps_per_generation": None, "epsilon": 0.2, "epsilon_high": None,
           "temperature": 1.0, "mask_truncated_completions": False, "schedule": "constant",
           "seed": SETUP["seed"]}
    if trainer == "grpo":  # TRL's defaults
        cfg.update(beta=0.0, loss_type="dapo", importance_sampling_level="token", scale_rewards="group")
    else:
        cfg.update(beta=0.05, num_generations=2, normalize_advantages=False, reward_clip_range=None)
    cfg.update(overrides)
    cfg["steps_per_generation"] = cfg["steps_per_generation"] or cfg["grad_accum"]
    return cfg


def eos_ids() -> list[int]:
    return [EOS] + list(range(SETUP["eos_offset"], EOS, SETUP["eos_every"]))


# -- the reward functions (TRL's signature; deterministic) ---------------------------------------------
def vowel_share(completions, **kwargs):
    """Share of vowels among the completion's letters; None when it has no letter."""
    out = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else None)
    return out


def short_length(completion_ids, **kwargs):
    """Shorter is better; None for completions of 3 or 6 tokens."""
    return [None if len(ids) % 3 == 0 else -len(ids) / 6 for ids in completion_ids]


REWARDS = {"vowel_share": vowel_share, "short_length": short_length}


@functools.lru_cache(maxsize=1)
def minift_tokenizer():
    from minift.tokenizer import load_tokenizer

    return load_tokenizer(FIXTURES / SETUP["checkpoint"])


def prompts() -> list[str]:
    tokenizer = minift_tokenizer()
    out = []
    with open(TWEETS / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            prompt = f"{json.loads(line)['text'].strip()} sentiment:"
            if SETUP["min_prompt_tokens"] <= len(tokenizer.encode(prompt)) <= SETUP["max_prompt_tokens"]:
                out.append(prompt)
            if len(out) == SETUP["n_prompts"]:
                return out
    raise RuntimeError("not enough short tweets")


# -- TRL ------------------------------------------------------------------------------------------------
class Recorder:
    """Records what TRL samples: the first reward function's inputs (one call per generation round) and the
    permutation of each ``shuffle_sequence_dict`` call."""

    def __init__(self):
        self.rounds: list[dict] = []

    def wrap(self, func):
        def recorded(prompts, completions, completion_ids, **kwargs):
            self.rounds.append({"prompts": list(prompts), "permutation": None,
                                "completion_ids": [list(map(int, c)) for c in completion_ids]})
            return func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        recorded.__name__ = func.__name__
        return recorded

    def shuffle(self, original):
        def recorded(batch):
            n = len(next(v for v in batch.values() if v is not None))
            out = original({**batch, "_row": torch.arange(n)})  # the same single randperm as without it
            self.rounds[-1]["permutation"] = out.pop("_row").tolist()
            return out
        return recorded


def run_trl(name: str, out_dir: Path):
    """TRL on one setting. Returns (per-step logs, recorded rounds, final named parameters)."""
    import datasets
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.rloo_trainer as rloo_module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg = config(name)
    fixture = str(FIXTURES / SETUP["checkpoint"])
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    model = AutoModelForCausalLM.from_pretrained(fixture)
    model.generation_config.eos_token_id = eos_ids()
    recorder = Recorder()
    common = {"output_dir": str(out_dir), "per_device_train_batch_size": cfg["per_device"],
              "gradient_accumulation_steps": cfg["grad_accum"],
              "steps_per_generation": cfg["steps_per_generation"], "num_generations": cfg["num_generations"],
              "max_completion_length": cfg["max_completion_length"],
              "num_iterations": cfg["num_iterations"], "beta": cfg["beta"], "epsilon": cfg["epsilon"],
              "epsilon_high": cfg["epsilon_high"], "temperature": cfg["temperature"],
              "mask_truncated_completions": cfg["mask_truncated_completions"],
              "reward_weights": cfg["reward_weights"], "max_steps": cfg["max_steps"],
              "learning_rate": cfg["lr"],
              "lr_scheduler_type": cfg["schedule"], "weight_decay": 0.0,
              "optim": "adamw_torch" if cfg["optimizer"] == "adamw" else "sgd",
              "max_grad_norm": SETUP["max_grad_norm"], "logging_steps": 1, "report_to": "none",
              "save_strategy": "no", "use_cpu": True, "seed": cfg["seed"], "bf16": False,
              "disable_dropout": True, "gradient_checkpointing": False, "dataloader_num_workers": 0}
    if cfg["trainer"] == "grpo":
        args = GRPOConfig(**common, loss_type=cfg["loss_type"], scale_rewards=cfg["scale_rewards"],
                          importance_sampling_level=cfg["importance_sampling_level"])
        trainer_cls, module = GRPOTrainer, grpo_module
    else:
        args = RLOOConfig(**common, normalize_advantages=cfg["normalize_advantages"],
                          reward_clip_range=cfg["reward_clip_range"])
        trainer_cls, module = RLOOTrainer, rloo_module
    funcs = [REWARDS[n] for n in cfg["rewards"]]
    funcs[0] = recorder.wrap(funcs[0])
    original_shuffle = module.shuffle_sequence_dict
    module.shuffle_sequence_dict = recorder.shuffle(original_shuffle)
    try:
        trainer = trainer_cls(model=model, reward_funcs=funcs, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts()}),
                              processing_class=tokenizer)
        trainer.train()
    finally:
        module.shuffle_sequence_dict = original_shuffle
    logs = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    prompt_ids = {p: tokenizer(text=p)["input_ids"] for r in recorder.rounds for p in r["prompts"]}
    for r in recorder.rounds:
        r["prompt_ids"] = [prompt_ids[p] for p in r["prompts"]]
    return logs, recorder.rounds, dict(model.named_parameters())


def replay_rounds(rounds: list[dict]):
    """The recorded rounds as minift's ReplayRound list."""
    from minift.rl.replay import ReplayRound

    return [ReplayRound(step=i + 1, prompts=r["prompts"], completion_ids=r["completion_ids"],
                        prompt_ids=r.get("prompt_ids"), permutation=r["permutation"])
            for i, r in enumerate(rounds)]


def replay_lines(rounds: list[dict], tmp: Path) -> list[dict]:
    """The recorded rounds as the lines of a completions file (written by minift's ReplayWriter)."""
    from minift.rl.replay import write_replay

    path = tmp / "completions.jsonl"
    write_replay(path, replay_rounds(rounds))
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- minift ---------------------------------------------------------------------------------------------
def run_minift(name: str, rounds, dtype: torch.dtype = torch.float32):
    """minift replays the recorded ``rounds`` (ReplayRound list) of one setting. Returns (per-step records
    with TRL's names, final named parameters)."""
    from minift.hub import from_pretrained
    from minift.loop import Hooks, train
    from minift.optim import make_adamw, make_scheduler
    from minift.rl.batching import RoundLoader
    from minift.rl.objective import CompletionLogProbs, GRPOObjective, RLOOObjective, finish_step_metrics
    from minift.rl.round import RoundSettings, prepare_round

    cfg = config(name)
    tokenizer = minift_tokenizer()
    lm = from_pretrained(FIXTURES / SETUP["checkpoint"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lm = lm.to(dtype)
    policy = CompletionLogProbs(lm, cfg["temperature"]).train()
    reference = CompletionLogProbs(copy.deepcopy(lm), cfg["temperature"]).eval().requires_grad_(False) \
        if cfg["beta"] else None
    weights = torch.tensor(cfg["reward_weights"] or [1.0] * len(cfg["rewards"]), dtype=torch.float32)
    spg, mu, ga = cfg["steps_per_generation"], cfg["num_iterations"], cfg["grad_accum"]
    settings = RoundSettings(algorithm=cfg["trainer"], num_generations=cfg["num_generations"],
                             scale_rewards=cfg.get("scale_rewards", "group"),
                             normalize_advantages=cfg.get("normalize_advantages", False),
                             reward_clip_range=cfg.get("reward_clip_range"), beta=cfg["beta"],
                             mask_truncated_completions=cfg["mask_truncated_completions"],
                             steps_per_generation=spg, grad_accum=ga, num_iterations=mu,
                             rows_per_forward=cfg["per_device"])
    round_metrics: dict[int, list[dict]] = {}

    def make_round(r: int) -> list[dict]:
        rnd = rounds[r]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rnd.completion_ids]
        columns = [REWARDS[n](prompts=rnd.prompts, completions=texts, completion_ids=rnd.completion_ids)
                   for n in cfg["rewards"]]
        per_func = torch.tensor([[float("nan") if c[i] is None else c[i] for c in columns]
                                 for i in range(len(texts))], dtype=torch.float32)
        micro_batches, metrics, _ = prepare_round(
            settings, policy, reference, rnd.prompt_ids or [tokenizer.encode(p) for p in rnd.prompts],
            rnd.completion_ids, per_func, weights, list(cfg["rewards"]), EOS, set(eos_ids()) | {EOS},
            rnd.permutation, torch.device("cpu"))
        round_metrics.setdefault(r * spg * mu // ga + 1, []).append(metrics)  # the step that sampled round r
        return micro_batches

    if cfg["trainer"] == "grpo":
        objective = GRPOObjective(loss_type=cfg["loss_type"], epsilon_low=cfg["epsilon"],
                                  epsilon_high=cfg["epsilon_high"], importance_sampling_level=cfg[
                                      "importance_sampling_level"], beta=cfg["beta"],
                                  max_completion_length=cfg["max_completion_length"])
    else:
        objective = RLOOObjective(epsilon_low=cfg["epsilon"], epsilon_high=cfg["epsilon_high"])
    if cfg["optimizer"] == "adamw":
        optimizer = make_adamw(policy, cfg["lr"], 0.0, fused="no")
    else:
        optimizer = torch.optim.SGD(policy.parameters(), lr=cfg["lr"])
    records: list[dict] = []
    train(policy, optimizer, make_scheduler(optimizer, cfg["schedule"], cfg["max_steps"]),
          RoundLoader(make_round, len(rounds), mu), total_steps=cfg["max_steps"], grad_accum=ga,
          max_grad_norm=SETUP["max_grad_norm"], loss=objective, hooks=Hooks(log=records.append))
    out = []
    for record in records:
        step = finish_step_metrics(record)
        step["learning_rate"] = step.pop("lr")
        for key in {k for m in round_metrics.get(step["step"], []) for k in m}:
            values = [m[key] for m in round_metrics[step["step"]] if key in m]
            step[key] = sum(values) / len(values)
        out.append(step)
    return out, dict(lm.named_parameters())


# -- the trace -------------------------------------------------------------------------------------------
def weight_digest(params: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per tensor (the tied head left out): its float64 sum, and a seeded random projection Σ w·r
    (every element counts, with its own sign), so a few numbers stand for the whole tensor."""
    out = {}
    for name, p in params.items():
        if name == "lm_head.weight":
            continue
        values = p.detach().double().flatten()
        seeded = torch.Generator().manual_seed(values.numel())
        r = torch.randn(values.numel(), generator=seeded, dtype=torch.float64)
        out[name] = {"sum": float(values.sum()), "projection": float(values @ r)}
    return out


def main(names: list[str]) -> None:
    import tempfile

    import trl

    trace = json.loads(TRACE.read_text()) if TRACE.exists() and names else {}
    trace.update(setup=SETUP, trl_version=trl.__version__)
    trace.setdefault("settings", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(SETTINGS):
            logs, rounds, params = run_trl(name, Path(tmp) / name)
            trace["settings"][name] = {
                "config": config(name), "completions": replay_lines(rounds, Path(tmp)),
                "steps": [{k: r[k] for k in STEP_KEYS if k in r} for r in logs],
                "final_weights": weight_digest(params)}
            print(f"{name}: {len(rounds)} rounds, {len(logs)} steps")
    TRACE.parent.mkdir(exist_ok=True)
    TRACE.write_text(json.dumps(trace, separators=(",", ":")) + "\n")
    print(f"wrote {TRACE} ({TRACE.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
