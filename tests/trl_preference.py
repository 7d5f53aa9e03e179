"""TRL's DPOTrainer / RewardTrainer and minift on the same pairs from the same checkpoint.

The setup (SETUP): ``tiny-openai-gpt`` with every dropout 0, the first 32 tweet pairs of train rows
0..31 (prompt "{text} sentiment:", chosen the gold label, rejected one seeded wrong label), token ids
from minift's ``tokenize_pairs`` given to TRL pre-tokenized (so both train on identical ids), 4 pairs
per micro-batch x 2 micro-batches per step, 4 steps in order, AdamW lr 1e-3 constant, no weight
decay, clipping at 1.0.

``python3 tests/trl_preference.py`` (TRL installed) writes ``tests/data/trl_preference_trace.json``:
TRL's per-step numbers, per-tensor sums of its final weights and the reward head's initial weights,
so machines without TRL still compare minift against it (tests/test_preference.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from conftest import FIXTURES, TWEETS  # noqa: E402

TRACE = HERE / "data" / "trl_preference_trace.json"
SETUP = {"checkpoint": "tiny-openai-gpt", "rows": 32, "rejected": "one", "seed": 0, "batch_size": 4,
         "grad_accum": 2, "steps": 4, "lr": 1e-3, "beta": 0.1, "max_grad_norm": 1.0, "max_length": 128}
STEP_KEYS = {"dpo": ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                     "rewards/margins", "logps/chosen", "logps/rejected"),
             "reward": ("loss", "grad_norm", "accuracy", "margin")}


def minift_pairs():
    """The pairs, tokenized by minift (GPT-1 tokenizer of the fixture, [PAD] = 40478)."""
    import datasets

    from minift.data import DEFAULT_LABELS, DEFAULT_TEMPLATE
    from minift.preference.pairs import tokenize_pairs, tweet_pairs
    from minift.tokenizer import load_tokenizer

    rows = datasets.load_dataset("json", data_files=str(TWEETS / "train.jsonl"), split="train")
    rows = rows.select(range(SETUP["rows"]))
    pairs = tweet_pairs(rows, "train", DEFAULT_TEMPLATE, DEFAULT_LABELS, SETUP["rejected"], SETUP["seed"])
    tokenizer = load_tokenizer(FIXTURES / SETUP["checkpoint"])
    tokenized, _ = tokenize_pairs(pairs, tokenizer, SETUP["max_length"])
    return tokenized, tokenizer


# -- minift ---------------------------------------------------------------------------------------------
def run_minift(stage: str, score_weight: torch.Tensor | None = None, reference: str = "frozen",
               dtype: torch.dtype = torch.float32):
    """minift's loop on the setup. Returns (per-step records, final named parameters)."""
    import copy

    from minift.hub import from_pretrained
    from minift.loop import Hooks, train
    from minift.optim import make_adamw, make_scheduler
    from minift.preference.dpo import DPOObjective, SequenceLogProbs, precompute_reference_logps
    from minift.preference.pairs import PairCollator, PairObjective, pair_batches
    from minift.preference.reward import RewardModel, reward_loss
    from minift.sampling import SequentialSampler

    torch.manual_seed(SETUP["seed"])
    pairs, tokenizer = minift_pairs()
    lm = from_pretrained(FIXTURES / SETUP["checkpoint"], resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0).to(dtype)
    collator = PairCollator(tokenizer.pad_id)
    cpu = torch.device("cpu")
    if stage == "dpo":
        module = SequenceLogProbs(lm)
        if reference == "frozen":
            compute_loss = DPOObjective(beta=SETUP["beta"],
                                        reference=SequenceLogProbs(copy.deepcopy(lm)).eval().requires_grad_(False))
        else:
            logps = precompute_reference_logps(module, pair_batches(pairs, collator, 8), len(pairs), cpu,
                                               torch.autocast("cpu", enabled=False))
            compute_loss = DPOObjective(beta=SETUP["beta"], reference_logps=logps)
    else:
        module = RewardModel(lm, tokenizer.pad_id).to(dtype)
        with torch.no_grad():
            module.score.weight.copy_(score_weight)
        compute_loss = reward_loss
    optimizer = make_adamw(module, SETUP["lr"], 0.0, fused="no")
    scheduler = make_scheduler(optimizer, "constant", SETUP["steps"])
    sampler = SequentialSampler(len(pairs), SETUP["batch_size"], seed=SETUP["seed"])
    records: list[dict] = []
    train(module, optimizer, scheduler,
          torch.utils.data.DataLoader(pairs, batch_sampler=sampler, collate_fn=collator),
          total_steps=SETUP["steps"], grad_accum=SETUP["grad_accum"], max_grad_norm=SETUP["max_grad_norm"],
          loss=PairObjective(compute_loss), hooks=Hooks(log=records.append))
    params = dict((module.lm if stage == "dpo" else module).named_parameters())
    return records, params


# -- TRL ------------------------------------------------------------------------------------------------
def _trl_args(config_cls, out_dir: Path, **extra):
    return config_cls(output_dir=str(out_dir), per_device_train_batch_size=SETUP["batch_size"],
                      gradient_accumulation_steps=SETUP["grad_accum"], max_steps=SETUP["steps"],
                      learning_rate=SETUP["lr"], lr_scheduler_type="constant", weight_decay=0.0,
                      max_grad_norm=SETUP["max_grad_norm"], optim="adamw_torch", logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, seed=SETUP["seed"],
                      train_sampling_strategy="sequential", disable_dropout=True, dataloader_num_workers=0,
                      gradient_checkpointing=False, bf16=False, **extra)


def run_trl(stage: str, out_dir: Path):
    """TRL on the setup. Returns (per-step logs, final named parameters, initial score weight)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    pairs, _ = minift_pairs()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(FIXTURES / SETUP["checkpoint"]))
    torch.manual_seed(SETUP["seed"])
    score_weight = None
    if stage == "dpo":
        model = AutoModelForCausalLM.from_pretrained(str(FIXTURES / SETUP["checkpoint"]))
        data = datasets.Dataset.from_dict({"prompt_ids": pairs.prompt_ids, "chosen_ids": pairs.chosen_ids,
                                           "rejected_ids": pairs.rejected_ids})

        class PreTokenized(DPOTrainer):  # the ids are minift's: skip TRL's own tokenization
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset

        trainer = PreTokenized(model=model, args=_trl_args(DPOConfig, out_dir, beta=SETUP["beta"],
                                                            max_length=SETUP["max_length"]),
                               train_dataset=data, processing_class=tokenizer)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(FIXTURES / SETUP["checkpoint"]),
                                                                   num_labels=1)
        score_weight = model.score.weight.detach().clone()
        data = datasets.Dataset.from_dict({
            "chosen_ids": [p + c for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)],
            "rejected_ids": [p + r for p, r in zip(pairs.prompt_ids, pairs.rejected_ids)]})
        trainer = RewardTrainer(model=model,
                                args=_trl_args(RewardConfig, out_dir, max_length=SETUP["max_length"]),
                                train_dataset=data, processing_class=tokenizer)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, dict(model.named_parameters()), score_weight


def weight_sums(params: dict[str, torch.Tensor], stage: str) -> dict[str, float]:
    """Per-tensor float64 sums under transformers' names (minift's names are the same; the LM head
    is tied and left out)."""
    return {name: float(p.detach().double().sum()) for name, p in params.items()
            if name != "lm_head.weight"}


def main() -> None:
    import tempfile

    import trl

    trace = {"setup": SETUP, "trl_version": trl.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("dpo", "reward"):
            logs, params, score_weight = run_trl(stage, Path(tmp) / stage)
            trace[stage] = {"steps": [{k: r[k] for k in STEP_KEYS[stage]} for r in logs],
                            "final_weight_sums": weight_sums(params, stage)}
            if score_weight is not None:
                trace[stage]["initial_score_weight"] = score_weight.flatten().tolist()
    TRACE.parent.mkdir(exist_ok=True)
    TRACE.write_text(json.dumps(trace, indent=1) + "\n")
    print(f"wrote {TRACE}")


if __name__ == "__main__":
    main()
